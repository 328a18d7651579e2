"""RepDistiller's feature-map methods: FitNets, AT, SP and FT (with its paraphraser stage).

They read the *raw* group outputs, the residual stream before the BN that consumes it, as
RepDistiller's `train_student.py` hands them `model(x, is_feat=True, preact=False)`'s features
(`models.raw_group_ends`); under the 'authors' preset AT reads the pre-ReLU maps for WRN_28_4 ->
WRN_16_2 (their one AT script with `--preReLU`) and AT and SP also a WRN's stem (`baseline_presets.py`). Helpers are built as RepDistiller's `models/util.py`
builds them.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfa_jax import baseline_presets
from dfa_jax import features
from dfa_jax import losses
from dfa_jax import models
from dfa_jax.methods import common

# ------------------------------------------------------------------------------------- FitNets


def fitnets_group(pair: common.Pair) -> int:
    """FitNets' hint position: the middle group (RepDistiller hints at feat[2] of a WRN)."""
    return _middle(len(pair.t_groups))


def _middle(num_groups: int) -> int:
    return (num_groups + 1) // 2


def fitnets_regressor(pair: common.Pair, dtype) -> models.Connector:
    """RepDistiller's `ConvReg` to the teacher's hint map: its channels and its size."""
    t_shape = pair.t_shapes()[fitnets_group(pair) - 1]
    return models.Connector(t_shape[-1], out_hw=t_shape[1:3], dtype=dtype, initialiser="torch")


def _fitnets_helpers(pair, config, seed, mesh):
    g, s_shapes = fitnets_group(pair), pair.s_shapes()
    params, stats = common.init_module(
        fitnets_regressor(pair, jnp.dtype(config.dtype)), seed, mesh, s_shapes[g - 1]
    )
    return {"regressor": params}, {"regressor": stats}


def _fitnets_loss(pair, config, constants):
    """CE + fitnets_weight * MSE(ConvReg(s_raw[g]), t_raw[g]) at the middle group g."""
    del constants
    g = fitnets_group(pair)
    regressor = fitnets_regressor(pair, pair.student.dtype)
    weight = config.baselines.fitnets_weight

    def term(step):
        s_raw, t_raw = step.student_maps("raw"), step.teacher_maps("raw")
        regressed, stats = common.apply_helper(
            regressor, step.params, step.batch_stats, "regressor", s_raw[g - 1]
        )
        step.new_stats["regressor"] = stats
        # RepDistiller's ConvReg: conv, BN, ReLU (`models/util.py`, `use_relu=True` as
        # `train_student.py` builds it); the conv's bias is left out, as the BN's batch mean
        # cancels it in training, the regressor's only use. The target is the raw map,
        # negative values included.
        regressed = nn.relu(regressed)
        hint = losses.fitnets_loss(regressed, t_raw[g - 1])
        step.metrics["fitnets_loss"] = hint
        return step.ce + weight * hint

    return common.student_loss(pair, config, term)


FITNETS = common.Implementation(
    loss=_fitnets_loss,
    helpers=_fitnets_helpers,
    check=lambda config: (
        common.non_negative(config, "fitnets_weight")
        + common.resize_problems(config, "fitnets", lambda n: [_middle(n)])
    ),
)

# ------------------------------------------------------------------------------------------ AT


def _at_loss(pair, config, constants):
    """CE + at_weight * sum of AT losses over every group's output (RepDistiller: feat[1:-1])."""
    del constants
    preset = baseline_presets.settings(config)
    kind, stem = preset.at_maps, common.with_stem(pair, preset.with_stem)

    def term(step):
        s_at, t_at = step.student_maps(kind, stem), step.teacher_maps(kind, stem)
        at = sum(losses.at_loss(s, t, preset.at_p) for s, t in zip(s_at, t_at))
        step.metrics["at_loss"] = at
        return step.ce + preset.at_weight * at

    return common.student_loss(pair, config, term)


AT = common.Implementation(
    loss=_at_loss, check=lambda config: common.non_negative(config, "at_weight")
)

# ------------------------------------------------------------------------------------------ SP


def _sp_loss(pair, config, constants):
    """CE + sp_weight * SP on the last group's output (RepDistiller: feat[-2]; the 'authors'
    preset: every position's)."""
    del constants
    preset = baseline_presets.settings(config)
    stem = common.with_stem(pair, preset.with_stem)

    def term(step):
        s_raw, t_raw = step.student_maps("raw", stem), step.teacher_maps("raw", stem)
        pairs = list(zip(s_raw, t_raw)) if preset.sp_every_position else [(s_raw[-1], t_raw[-1])]
        sp = sum(losses.sp_loss(s, t) for s, t in pairs)
        step.metrics["sp_loss"] = sp
        return step.ce + preset.sp_weight * sp

    return common.student_loss(pair, config, term)


SP = common.Implementation(
    loss=_sp_loss, check=lambda config: common.non_negative(config, "sp_weight")
)

# ------------------------------------------------------------------------------------------ FT


class Paraphraser(nn.Module):
    """FT's paraphraser (Kim et al. 2018): a conv autoencoder of the teacher's last map.

    encode: [B, H, W, C] -> factor [B, H, W, int(C * rate)]; decode maps it back to C channels.
    As RepDistiller's `Paraphraser(t_shape)` (`models/util.py`, built with its default
    `use_bn=False`): three 3x3 conv (with bias) + LeakyReLU(0.1) layers each way, C -> C -> F -> F
    and F -> F -> C -> C. (The decoder's stride-1 `ConvTranspose2d(3, 1, 1)` layers are 3x3 convs:
    a transposed kernel `W[in, out, a, b]` is the conv kernel `K[2 - a, 2 - b, in, out]`.)
    """

    channels: int
    rate: float
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        factor = int(self.channels * self.rate)
        widths_in = (self.channels, factor, factor)
        widths_out = (factor, self.channels, self.channels)
        self.enc = [_ConvAct(c, batch_norm=False, dtype=self.dtype) for c in widths_in]
        # PyTorch initialises them as the transposed convs they are there.
        self.dec = [
            _ConvAct(c, batch_norm=False, transposed=True, dtype=self.dtype) for c in widths_out
        ]

    def encode(self, x, train: bool = False):
        for layer in self.enc:
            x = layer(x, train)
        return x

    def __call__(self, x, train: bool = False):
        """Reconstruction [B, H, W, C] and factor [B, H, W, int(C * rate)]."""
        factor = self.encode(x, train)
        y = factor
        for layer in self.dec:
            y = layer(y, train)
        return y, factor


class Translator(nn.Module):
    """FT's translator: the student's last map [B, H, W, Cs] -> a factor [B, H, W, F].

    As RepDistiller's `Translator(s_shape, t_shape)` (default `use_bn=True`): 3x3 conv + BN +
    LeakyReLU(0.1) three times, Cs -> Cs -> F -> F. (The convs' biases are left out: BN's batch
    mean cancels them in training, the translator's only use.)
    """

    factor_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in (x.shape[-1], self.factor_channels, self.factor_channels):
            x = _ConvAct(width, batch_norm=True, dtype=self.dtype)(x, train)
        return x


class _ConvAct(nn.Module):
    """3x3 conv, then BN (`batch_norm`) or the conv's own bias, then LeakyReLU(0.1); initialised
    as PyTorch initialises RepDistiller's (`transposed`: a stride-1 `ConvTranspose2d`)."""

    features: int
    batch_norm: bool
    transposed: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        layers = models.layers
        fan_in = 9 * (self.features if self.transposed else x.shape[-1])
        x = layers.Conv3x3(
            self.features,
            use_bias=not self.batch_norm,
            kernel_init=layers.torch_transposed_as_conv_init
            if self.transposed
            else layers.torch_conv_init,
            bias_init=layers.torch_bias_init(fan_in),
            dtype=self.dtype,
            name="conv",
        )(x)
        if self.batch_norm:
            x = models.layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(
                x
            )
        return nn.leaky_relu(x, 0.1)


def paraphraser_factor(pair: common.Pair, paraphraser_vars, teacher_map, base) -> jax.Array:
    """The frozen paraphraser's factor of the teacher's raw last map."""
    module = Paraphraser(teacher_map.shape[-1], base.ft_rate, dtype=pair.teacher.dtype)
    factor = module.apply(paraphraser_vars, teacher_map, train=False, method=Paraphraser.encode)
    return factor.astype(jnp.float32)


def _ft_helpers(pair, config, seed, mesh):
    factor = int(pair.t_shapes()[-1][-1] * config.baselines.ft_rate)
    translator = Translator(factor, dtype=jnp.dtype(config.dtype))
    params, stats = common.init_module(translator, seed, mesh, pair.s_shapes()[-1])
    return {"translator": params}, {"translator": stats}


def _ft_loss(pair, config, constants):
    """CE + ft_weight * FT(translator(s_raw[-1]), paraphraser factor of t_raw[-1]) (RepDistiller:
    feat[-2] through the translator and the paraphraser)."""
    del constants
    base = config.baselines

    def term(step):
        s_raw, t_raw = step.student_maps("raw"), step.teacher_maps("raw")
        factor_t = paraphraser_factor(pair, step.aux["paraphraser"], t_raw[-1], base)
        factor_s, stats = common.apply_helper(
            Translator(factor_t.shape[-1], dtype=pair.student.dtype),
            step.params,
            step.batch_stats,
            "translator",
            s_raw[-1],
        )
        step.new_stats["translator"] = stats
        ft = losses.ft_loss(factor_s, jax.lax.stop_gradient(factor_t))
        step.metrics["ft_loss"] = ft
        return step.ce + base.ft_weight * ft

    return common.student_loss(pair, config, term)


def make_paraphraser_loss(pair: common.Pair, base):
    """FT's first-stage loss: MSE between the teacher's raw last map and the paraphraser's
    reconstruction of it (RepDistiller `helper/pretrain.py`, `nn.MSELoss()` on `feat_t[-2]`)."""
    module = Paraphraser(pair.t_shapes()[-1][-1], base.ft_rate, dtype=pair.teacher.dtype)

    def loss_fn(params, batch_stats, beta, batch, rng, aux):
        del beta, rng
        _, mut = pair.teacher.apply(aux, batch["image"], train=False, mutable=[models.FEATURES])
        target = jax.lax.stop_gradient(
            features.read(mut, common.positions(pair.teacher, "raw")[-1:])[0].astype(jnp.float32)
        )
        recon, _ = module.apply({"params": params, "batch_stats": batch_stats}, target)
        loss = jnp.mean((recon.astype(jnp.float32) - target) ** 2)
        return loss, (batch_stats, {"reconstruction_loss": loss})

    return module, loss_fn


def pretrain_paraphraser(setup: common.Setup) -> dict:
    """FT's first stage: train the paraphraser to reconstruct the teacher's raw last map."""
    config, pair = setup.config, setup.pair
    base = config.baselines
    module, loss_fn = make_paraphraser_loss(pair, base)
    params, batch_stats = common.init_module(
        module, config.seed + 300, setup.mesh, pair.t_shapes()[-1]
    )
    final = setup.run_stage(
        "distill/ft/paraphraser",
        os.path.join(setup.directory, "paraphraser"),
        base.ft_pretrain_epochs,
        base.ft_pretrain_lr,
        params,
        batch_stats,
        loss_fn,
    )
    return {"params": final.params, "batch_stats": final.batch_stats}


def _ft_start(setup: common.Setup, start: common.Start) -> common.Start:
    # The paraphraser rides in the step's aux beside the teacher: frozen, one per student.
    return dataclasses.replace(start, aux={**start.aux, "paraphraser": pretrain_paraphraser(setup)})


def _ft_check(config) -> list[str]:
    base = config.baselines
    problems = []
    if not base.ft_rate > 0:
        problems.append(
            f"baselines.ft_rate = {base.ft_rate}: must be positive (RepDistiller: 0.5)."
        )
    problems += common.positive_lr(config, "ft_pretrain_lr")
    problems += common.positive_epochs(config, "ft_pretrain_epochs")
    return problems + common.non_negative(config, "ft_weight")


FT = common.Implementation(
    loss=_ft_loss, helpers=_ft_helpers, start=_ft_start, check=_ft_check, trains_alone=True
)
