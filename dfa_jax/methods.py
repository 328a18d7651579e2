"""Every distillation method of Table 2 as a w loss on the shared bilevel step (beta frozen).

A distillation run is named by a *label*: a method (`none`, `kd`, `fitnets`, `at`, `jacobian`,
`ft`, `ab`, `sp`, `margin`) or, for DFA, its aggregation (`dfa`, `last`, `average`, `random`,
`file`: Table 5 and DFA-T). For each method this module builds the learned helpers it trains
beside the student (connectors, FitNets' regressor, FT's translator) and its loss
`(params, batch_stats, beta, batch, rng, aux=teacher variables) -> (loss, (batch_stats, metrics))`.
Two methods start with a stage of their own (see `distill.py`): FT pre-trains a paraphraser of
the teacher's last map, AB initialises the student by its activation-boundary loss.

Feature positions: the group ends. AB, Margin and DFA take them pre-ReLU (they are about the
sign/value of pre-activations; Margin's margins come from the teacher's BN, or are -1 for a
teacher without a BN producing its group ends). The methods from RepDistiller (FitNets, AT, SP,
FT) take the *raw* group outputs, the residual stream before the BN that consumes it, as
RepDistiller's `train_student.py` hands them `model(x, is_feat=True, preact=False)`'s features
(`models.raw_group_ends`). Helpers are built as RepDistiller's `models/util.py` builds them.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dfa_jax import baseline_presets
from dfa_jax import config_lib
from dfa_jax import features
from dfa_jax import losses
from dfa_jax import models
from dfa_jax import parallel


def method_of(label: str) -> str:
    """The method a run label trains: DFA for an aggregation label, else the label itself."""
    return "dfa" if label in config_lib.AGGREGATIONS else label


@dataclasses.dataclass(frozen=True)
class Pair:
    """The teacher and student networks and where their layer groups end."""

    teacher: nn.Module
    student: nn.Module

    @property
    def t_groups(self):
        return self.teacher.feature_groups()

    @property
    def t_ends(self):
        return [names[-1] for names in self.teacher.feature_groups()]

    @property
    def s_ends(self):
        return [names[-1] for names in self.student.feature_groups()]

    def t_shapes(self):
        return features.group_shapes(self.teacher)

    def s_shapes(self):
        return features.group_shapes(self.student)


def group_key(group: int) -> str:
    """The pytree key of 1-based group `group` (beta, connectors)."""
    return f"g{group}"


# ------------------------------------------------------------------------------------------------
# Learned helpers
# ------------------------------------------------------------------------------------------------


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
        self.dec = [_ConvAct(c, batch_norm=False, dtype=self.dtype) for c in widths_out]

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
    """3x3 conv, then BN (`batch_norm`) or the conv's own bias, then LeakyReLU(0.1)."""

    features: int
    batch_norm: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = models.layers.Conv3x3(
            self.features, use_bias=not self.batch_norm, dtype=self.dtype, name="conv"
        )(x)
        if self.batch_norm:
            x = models.layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(
                x
            )
        return nn.leaky_relu(x, 0.1)


def _init(module, seed, mesh, *shapes, **kwargs):
    variables = parallel.init_replicated(module, seed, mesh, *shapes, **kwargs)
    return variables["params"], variables.get("batch_stats", {})


def connector_helpers(in_shapes, out_channels, seed: int, mesh, dtype) -> tuple[dict, dict]:
    """Per group, a Connector from `in_shapes[i]` to `out_channels[i]`: (params, batch_stats)."""
    params, batch_stats = {}, {}
    for i, (shape, channels) in enumerate(zip(in_shapes, out_channels)):
        p, b = _init(models.Connector(channels, dtype=dtype), seed + i, mesh, shape)
        params[group_key(i + 1)], batch_stats[group_key(i + 1)] = p, b
    return params, batch_stats


def init_helpers(label: str, pair: Pair, config, seed: int, mesh) -> tuple[dict, dict]:
    """The learned helpers of `label`'s method, trained with the student: (params, batch_stats)."""
    method, dtype = method_of(label), jnp.dtype(config.dtype)
    t_shapes, s_shapes = pair.t_shapes(), pair.s_shapes()
    if method in ("dfa", "margin"):
        st_params, st_stats = connector_helpers(
            s_shapes, [s[-1] for s in t_shapes], seed, mesh, dtype
        )
        if reads_stem(method, config):
            (t_stem,) = features.shapes_of(pair.teacher, pair.teacher.stem_features()[:1])
            (s_stem,) = features.shapes_of(pair.student, pair.student.stem_features()[:1])
            connector = models.Connector(t_stem[-1], dtype=dtype)
            st_params[STEM], st_stats[STEM] = _init(connector, seed + 50, mesh, s_stem)
        return {"st": st_params}, {"st": st_stats}
    if method == "ab":
        # RepDistiller's AB `Connector` (`models/util.py`): the identity where the student's map
        # already has the teacher's shape, else ConvReg without its ReLU (conv + BN).
        groups = [i for i, (s, t) in enumerate(zip(s_shapes, t_shapes)) if s != t]
        st_params, st_stats = connector_helpers(
            [s_shapes[i] for i in groups], [t_shapes[i][-1] for i in groups], seed, mesh, dtype
        )
        rename = {group_key(j + 1): group_key(i + 1) for j, i in enumerate(groups)}
        return (
            {"st": {rename[k]: v for k, v in st_params.items()}},
            {"st": {rename[k]: v for k, v in st_stats.items()}},
        )
    if method == "fitnets":
        g = fitnets_group(pair)
        params, stats = _init(
            models.Connector(t_shapes[g - 1][-1], dtype=dtype), seed, mesh, s_shapes[g - 1]
        )
        return {"regressor": params}, {"regressor": stats}
    if method == "ft":
        factor = int(t_shapes[-1][-1] * config.baselines.ft_rate)
        params, stats = _init(Translator(factor, dtype=dtype), seed, mesh, s_shapes[-1])
        return {"translator": params}, {"translator": stats}
    return {}, {}


STEM = "stem"
"""The pytree key of a WRN's stem position (its connector), beside the groups' `g{i}`."""


def reads_stem(method: str, config) -> bool:
    """Whether `method` also distills at a WRN's stem (`distill.positions` for DFA, the 'authors'
    preset for AT, SP and Margin)."""
    if method == "dfa":
        return config.distill.positions == "stem_and_groups"
    return method in ("at", "sp", "margin") and baseline_presets.settings(config).with_stem


def positions(model, kind: str, with_stem: bool = False) -> list[str]:
    """Sown names of the maps a method reads: every group end, 'pre_relu' (the consumer BN's
    output) or 'raw' (before it), after a WRN's stem when `with_stem`."""
    if kind == "pre_relu":
        names = [group[-1] for group in model.feature_groups()]
    else:
        names = list(model.raw_group_ends())
    stem = model.stem_features()
    if with_stem and stem is not None:
        names.insert(0, stem[0] if kind == "pre_relu" else stem[1])
    return names


def ab_connectors(pair: Pair, params: dict) -> list:
    """Per group, AB's connector module, or None where it is the identity (see init_helpers)."""
    return [
        models.Connector(pair.t_shapes()[i][-1], dtype=pair.student.dtype)
        if group_key(i + 1) in params.get("st", {})
        else None
        for i in range(len(pair.t_groups))
    ]


def fitnets_group(pair: Pair) -> int:
    """FitNets' hint position: the middle group (RepDistiller hints at feat[2] of a WRN)."""
    return (len(pair.t_groups) + 1) // 2


def teacher_margins(pair: Pair, teacher_vars, with_stem: bool = False) -> list[jax.Array]:
    """Per group end (after the stem when `with_stem`), overhaul's margin E[t | t < 0] from the
    BN that produces it ([C] each).

    Only WRNs have one BatchNorm producing each group end (the consumer BN). A teacher without
    one (ShuffleNetV2: a unit ends in a concatenation and a channel shuffle) gets the constant
    margin -1 on every channel, as the DFA authors' Margin runs had it (their ShuffleNetV2's
    `get_margin()` returns None, which their `MarginReLU` turns into -1;
    github.com/PkuDavidGuan/Distillation, `framework/modeling/kd/margin_ReLU.py`).
    """
    if not isinstance(pair.teacher, models.WideResNet):
        return [jnp.full((shape[-1],), -1.0, jnp.float32) for shape in pair.t_shapes()]
    params = teacher_vars["params"]
    num_groups = len(pair.t_groups)
    first = 0 if with_stem else 1  # block1_layer0's bn1 consumes the stem.
    bns = [params[f"block{i + 1}_layer0"]["bn1"] for i in range(first, num_groups)]
    bns.append(params["bn1"])
    return [losses.bn_margin(bn["scale"], bn["bias"]) for bn in bns]


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


def _apply_helper(module, params, batch_stats, name, x, key=None):
    p = params[name] if key is None else params[name][key]
    b = batch_stats[name] if key is None else batch_stats[name][key]
    out, mut = module.apply({"params": p, "batch_stats": b}, x, train=True, mutable=["batch_stats"])
    return out.astype(jnp.float32), mut["batch_stats"]


def make_loss_fn(label: str, pair: Pair, config, margins=None):
    """The w loss of run `label` (see the module docstring); `margins` for Margin only."""
    method = method_of(label)
    base = config.baselines
    preset = baseline_presets.settings(config)
    stem = reads_stem(method, config)
    clamp_min = config.features.clamp_min
    t_channels = [s[-1] for s in pair.t_shapes()]
    # Margin's and DFA's connector positions: the group ends, after the stem when it is read.
    fd_keys = ([STEM] if stem else []) + [group_key(i + 1) for i in range(len(t_channels))]
    fd_channels = [
        s[-1] for s in features.shapes_of(pair.teacher, positions(pair.teacher, "pre_relu", stem))
    ]
    connectors = [models.Connector(c, dtype=pair.student.dtype) for c in fd_channels]
    teacher_train = teacher_bn(method, config) == "batch"
    needs_teacher_features = method not in ("none", "kd", "jacobian")

    def student_forward(params, batch_stats, images):
        logits, mut = pair.student.apply(
            {"params": params["student"], "batch_stats": batch_stats["student"]},
            images,
            train=True,
            mutable=["batch_stats", models.FEATURES],
        )
        return logits.astype(jnp.float32), mut

    def teacher_forward(aux, images):
        mutable = [models.FEATURES] if needs_teacher_features else []
        out = pair.teacher.apply(
            teacher_variables(aux),
            images,
            train=teacher_train,
            mutable=mutable + (["batch_stats"] if teacher_train else []),
        )
        logits, mut = out if isinstance(out, tuple) else (out, {})
        return jax.lax.stop_gradient(logits.astype(jnp.float32)), mut

    def group_end_maps(mutated, names):
        return [m.astype(jnp.float32) for m in features.read(mutated, names)]

    def loss_fn(params, batch_stats, beta, batch, rng, aux):
        del rng
        images, labels = batch["image"], batch["label"]
        logits, s_mut = student_forward(params, batch_stats, images)
        new_stats = {**batch_stats, "student": s_mut["batch_stats"]}
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        metrics = {"ce_loss": ce, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
        if method in ("none", "ab"):  # AB distills in its initialisation stage only.
            return ce, (new_stats, metrics)

        t_logits, t_mut = teacher_forward(aux, images)

        def teacher_maps(names):
            return [jax.lax.stop_gradient(m) for m in group_end_maps(t_mut, names)]

        def maps(kind):
            """(student, teacher) maps at this method's positions: 'pre_relu' or 'raw'."""
            s_names, t_names = (
                positions(pair.student, kind, stem),
                positions(pair.teacher, kind, stem),
            )
            return group_end_maps(s_mut, s_names), (
                teacher_maps(t_names) if needs_teacher_features else []
            )

        # RepDistiller's methods read the raw group outputs (see the module docstring).
        s_raw, t_raw = maps("raw")
        if method == "kd":
            kd = losses.kd_loss(logits, t_logits, preset.kd_temperature)
            metrics["kd_loss"] = kd
            return preset.kd_ce_weight * ce + preset.kd_weight * kd, (new_stats, metrics)
        if method == "jacobian":
            jac = jacobian_term(pair, params, batch_stats, aux, images, labels)
            metrics["jacobian_loss"] = jac
            return ce + base.jacobian_weight * jac, (new_stats, metrics)
        if method == "at":  # RepDistiller: feat[1:-1], every group's output.
            s_at, t_at = (s_raw, t_raw) if preset.at_maps == "raw" else maps("pre_relu")
            at = sum(losses.at_loss(s, t, preset.at_p) for s, t in zip(s_at, t_at))
            metrics["at_loss"] = at
            return ce + preset.at_weight * at, (new_stats, metrics)
        if method == "sp":  # RepDistiller: feat[-2], the last group's output.
            pairs = (
                list(zip(s_raw, t_raw)) if preset.sp_every_position else [(s_raw[-1], t_raw[-1])]
            )
            sp = sum(losses.sp_loss(s, t) for s, t in pairs)
            metrics["sp_loss"] = sp
            return ce + preset.sp_weight * sp, (new_stats, metrics)
        if method == "fitnets":  # RepDistiller: feat[hint_layer = 2].
            g = fitnets_group(pair)
            regressed, stats = _apply_helper(
                models.Connector(t_channels[g - 1], dtype=pair.student.dtype),
                params,
                batch_stats,
                "regressor",
                s_raw[g - 1],
            )
            new_stats["regressor"] = stats
            # RepDistiller's ConvReg for maps of one size: 1x1 conv, BN, ReLU (`models/util.py`,
            # `use_relu=True` as `train_student.py` builds it); the conv's bias is left out, as
            # the BN's batch mean cancels it in training, the regressor's only use. The target
            # is the raw map, negative values included.
            regressed = nn.relu(regressed)
            hint = losses.fitnets_loss(regressed, t_raw[g - 1])
            metrics["fitnets_loss"] = hint
            return ce + base.fitnets_weight * hint, (new_stats, metrics)
        if method == "ft":  # RepDistiller: feat[-2] through the translator and the paraphraser.
            factor_t = paraphraser_factor(pair, aux["paraphraser"], t_raw[-1], base)
            factor_s, stats = _apply_helper(
                Translator(factor_t.shape[-1], dtype=pair.student.dtype),
                params,
                batch_stats,
                "translator",
                s_raw[-1],
            )
            new_stats["translator"] = stats
            ft = losses.ft_loss(factor_s, jax.lax.stop_gradient(factor_t))
            metrics["ft_loss"] = ft
            return ce + base.ft_weight * ft, (new_stats, metrics)

        # Connector methods over every group end: Margin (overhaul) and DFA (Eqs. 3-4).
        s_pre, t_pre = maps("pre_relu")
        mapped, st_stats = [], {}
        for key, connector, s_map in zip(fd_keys, connectors, s_pre):
            out, stats = _apply_helper(connector, params, batch_stats, "st", s_map, key)
            mapped.append(out)
            st_stats[key] = stats
        new_stats["st"] = st_stats
        if method == "margin":
            fd = losses.feature_distillation_loss(mapped, t_pre, margin=list(margins))
            gamma = preset.margin_gamma
        else:
            # The stem is one map: its target is that map itself.
            targets = [features.clamp(t_pre[0], clamp_min)] if stem else []
            for i, names in enumerate(pair.t_groups):
                candidates = [
                    jax.lax.stop_gradient(features.clamp(m, clamp_min))
                    for m in group_end_maps(t_mut, names)
                ]
                alpha = jax.nn.softmax(beta[group_key(i + 1)])
                targets.append(losses.aggregate(candidates, alpha))
            fd = losses.feature_distillation_loss(
                mapped, targets, distance=config.distill.distance, margin=config.distill.margin
            )
            gamma = config.distill.gamma_fd
        metrics["fd_loss"] = fd
        return ce + gamma * fd, (new_stats, metrics)

    return loss_fn


def teacher_bn(method: str, config) -> str:
    """How the teacher's BatchNorm runs while `method` distills: 'eval' or 'batch'.

    Margin runs as overhaul-distillation's `train_with_distillation.py` does, with the teacher in
    train mode (`baselines.margin_teacher_bn`; eval mode under the 'authors' preset); every other
    method follows `distill.teacher_bn` (RepDistiller keeps its teacher in eval mode).
    """
    if method == "margin":
        return baseline_presets.settings(config).margin_teacher_bn
    return config.distill.teacher_bn


def teacher_variables(aux) -> dict:
    """The teacher's own variables out of a step's `aux` (which may also carry FT's paraphraser)."""
    return {"params": aux["params"], "batch_stats": aux["batch_stats"]}


def jacobian_term(pair: Pair, params, batch_stats, aux, images, labels) -> jax.Array:
    """Jacobian matching: distance of the normalised input gradients of the true-class logit."""

    def student_logits(variables, x):
        return pair.student.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    def teacher_logits(variables, x):
        return pair.teacher.apply(variables, x, train=False)

    s_vars = {"params": params["student"], "batch_stats": batch_stats["student"]}
    grad_s = losses.target_logit_input_grad(student_logits, s_vars, images, labels)
    grad_t = jax.lax.stop_gradient(
        losses.target_logit_input_grad(teacher_logits, teacher_variables(aux), images, labels)
    )
    return losses.jacobian_loss(grad_s, grad_t)


def paraphraser_factor(pair: Pair, paraphraser_vars, teacher_map, base) -> jax.Array:
    """The frozen paraphraser's factor of the teacher's raw last map."""
    module = Paraphraser(teacher_map.shape[-1], base.ft_rate, dtype=pair.teacher.dtype)
    factor = module.apply(paraphraser_vars, teacher_map, train=False, method=Paraphraser.encode)
    return factor.astype(jnp.float32)
