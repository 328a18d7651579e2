"""Later logit baselines: DKD, DIST, and KD and DKD on standardised logits (KD+LS, DKD+LS).

* `dkd`: mdistiller's DKD (`mdistiller/distillers/DKD.py`): `dkd_ce_weight * CE + min(epoch /
  dkd_warmup, 1) * (dkd_alpha * TCKD + beta * NCKD)` at T = `dkd_temperature`; defaults
  mdistiller's `engine/cfg.py` (CE_WEIGHT 1, ALPHA 1, BETA 8, T 4, WARMUP 20), beta the pair's
  (`dkd_beta`) unless `baselines.dkd_beta` is set.
* `dist`: DIST (hunto/DIST_KD's `DIST`): `dist_ce_weight * CE + T^2 (dist_beta * inter +
  dist_gamma * intra)`; defaults the DIST paper's CIFAR-100 setting (beta = gamma = 2, T = 4,
  CE weight 1). mdistiller has no DIST.
* `kd_ls`, `dkd_ls`: logit-standardization-KD, which is mdistiller with a `normalize` of both
  networks' logits before the temperature. Its `tools/train.py --logit-stand --base-temp 2
  --kd-weight 9` (the README's CIFAR-100 command) sets KD's weight to 9 and T to 2, with the
  CE weight of its own `engine/cfg.py`, 1 (mdistiller's is 0.1): `ls_kd_*`. For DKD it sets ALPHA to 1 * 9 and BETA to the
  new ALPHA * 9 = 81 whatever the pair, and its `--base-temp` goes to `KD.TEMPERATURE`, which
  DKD does not read: DKD+LS runs at `dkd_temperature` (4) with `ls_dkd_alpha` 9 and
  `ls_dkd_beta` 81, and DKD's CE weight and warm-up. Standardisation is a method of its own
  (not a switch on kd/dkd) so that a run can train KD, KD+LS, DKD and DKD+LS side by side,
  each with its own report column, and so that KD+LS's weights (9, T 2) cannot leak into KD.

The warm-up. mdistiller passes its 1-based epoch to the loss (`trainer.py`) and holds the factor
for the whole epoch. The jitted step hands a loss no step count, so a DKD loss keeps its own: a
`dkd_clock` helper with no parameters whose one int32 statistic (`batch_stats['dkd_clock']
['steps']`) counts the steps taken. It is checkpointed and restored with the student's
statistics, so a resumed run continues its warm-up where it was. The epoch of a step is `steps
// steps_per_epoch + 1` (`losses.dkd_warmup`), with the distill stage's steps per epoch, which
the method's `start` reads from the run's data.

RepDistiller, whose settings the Table 2 baselines follow, has none of these methods; these
follow mdistiller (and the two codes built on it) where they differ: DKD's loss weights, beta
and temperature are mdistiller's CIFAR-100 ones, and its warm-up is counted in mdistiller's
1-based epochs. What the run shares with the other methods stays the run's: the student's
recipe (`distill.optim`, not mdistiller's SOLVER) and the teacher's BatchNorm
(`distill.teacher_bn`, 'eval' as mdistiller's `Distiller.train` keeps its teacher). KD itself
is the same in both (summed KL over classes, batch mean, T^2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dfa_jax import losses
from dfa_jax import parallel
from dfa_jax.data import loader
from dfa_jax.methods import common

CLOCK = "dkd_clock"
"""The helper key of DKD's step counter in `batch_stats`."""

DEFAULT_DKD_BETA = 8.0
"""mdistiller's `CFG.DKD.BETA` (`engine/cfg.py`): a pair its configs do not list."""

MDISTILLER_DKD_BETA = {
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("resnet32x4", "resnet8x4"): 8.0,
    ("resnet32x4", "ShuffleV1"): 8.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
    ("ResNet50", "MobileNetV2"): 8.0,
    ("vgg13", "vgg8"): 6.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    ("wrn_40_2", "ShuffleV1"): 8.0,
}
"""DKD's beta per (teacher, student) of mdistiller's `configs/cifar100/dkd/*.yaml`, in its
model names (a yaml without a `DKD.BETA` runs the default 8)."""

DKD_BETA = MDISTILLER_DKD_BETA
"""In our model names: RepDistiller's and mdistiller's CIFAR networks keep their names here."""


def dkd_beta(teacher: str, student: str) -> float:
    """DKD's beta of the pair (our model names): mdistiller's for its pairs, else its 8."""
    return DKD_BETA.get((teacher, student), DEFAULT_DKD_BETA)


def resolved_dkd_beta(config) -> float:
    """`baselines.dkd_beta`, or the pair's when it is None."""
    beta = config.baselines.dkd_beta
    return dkd_beta(config.teacher.model, config.student.model) if beta is None else beta


# ------------------------------------------------------------------------------------- DKD


def _clock_helpers(pair, config, seed, mesh):
    """DKD's step counter: no parameters, one int32 statistic, replicated over `mesh`."""
    del pair, config, seed
    zeros = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=parallel.replicated(mesh))
    steps = zeros()
    return {}, {CLOCK: {"steps": steps}}


def _steps_per_epoch(setup: common.Setup, start: common.Start) -> common.Start:
    """The distill stage's steps per epoch, for the warm-up (the loss's constants)."""
    steps = loader.steps_per_epoch(
        len(setup.data.train.labels), setup.config.distill.optim.batch_size
    )
    return dataclasses.replace(start, constants=steps)


def _warmup_factor(step: common.Step, steps_per_epoch, warmup: int):
    """This step's warm-up factor; advances the clock in `step.new_stats`."""
    if steps_per_epoch is None:
        raise ValueError("DKD's loss needs the stage's steps per epoch (its start's constants)")
    steps = step.batch_stats[CLOCK]["steps"]
    step.new_stats[CLOCK] = {"steps": steps + 1}
    factor = losses.dkd_warmup(steps, steps_per_epoch, warmup)
    step.metrics["dkd_warmup"] = factor
    return factor


def _dkd_term(config, steps_per_epoch, alpha, beta, standardize: bool):
    base = config.baselines
    temperature, warmup = base.dkd_temperature, base.dkd_warmup

    def term(step):
        t_logits, _ = step.teacher()
        s_logits = step.logits
        if standardize:
            s_logits, t_logits = losses.standardize(s_logits), losses.standardize(t_logits)
        dkd = losses.dkd_loss(s_logits, t_logits, step.labels, alpha, beta, temperature)
        step.metrics["dkd_loss"] = dkd
        factor = _warmup_factor(step, steps_per_epoch, warmup)
        return base.dkd_ce_weight * step.ce + factor * dkd

    return term


def _dkd_loss(pair, config, constants):
    """dkd_ce_weight * CE + warm-up * (alpha TCKD + beta NCKD); `constants`: steps per epoch."""
    base = config.baselines
    term = _dkd_term(config, constants, base.dkd_alpha, resolved_dkd_beta(config), False)
    return common.student_loss(pair, config, term, teacher_features=False)


def _dkd_ls_loss(pair, config, constants):
    """DKD on standardised logits with logit-standardization-KD's alpha and beta."""
    base = config.baselines
    term = _dkd_term(config, constants, base.ls_dkd_alpha, base.ls_dkd_beta, True)
    return common.student_loss(pair, config, term, teacher_features=False)


def _positive(config, field: str, source: str) -> list[str]:
    value = config.baselines[field]
    if not value > 0:
        return [f"baselines.{field} = {value}: must be positive ({source})."]
    return []


def _dkd_check(config) -> list[str]:
    base = config.baselines
    problems = _positive(config, "dkd_temperature", "mdistiller: 4")
    if not base.dkd_warmup >= 1:
        problems.append(
            f"baselines.dkd_warmup = {base.dkd_warmup}: must be a positive number of epochs"
            " (mdistiller: 20; 1 = no warm-up)."
        )
    if base.dkd_beta is not None and base.dkd_beta < 0:
        problems.append(
            f"baselines.dkd_beta = {base.dkd_beta}: must be >= 0, or None for the pair's"
            " (mdistiller's configs: 8, 6 for its WRN pairs)."
        )
    return problems + common.non_negative(config, "dkd_ce_weight", "dkd_alpha")


DKD = common.Implementation(
    loss=_dkd_loss, helpers=_clock_helpers, start=_steps_per_epoch, check=_dkd_check
)

DKD_LS = common.Implementation(
    loss=_dkd_ls_loss,
    helpers=_clock_helpers,
    start=_steps_per_epoch,
    check=lambda config: common.non_negative(config, "ls_dkd_alpha", "ls_dkd_beta"),
)


# ------------------------------------------------------------------------------------ DIST


def _dist_loss(pair, config, constants):
    """dist_ce_weight * CE + T^2 (dist_beta inter + dist_gamma intra)."""
    del constants
    base = config.baselines

    def term(step):
        t_logits, _ = step.teacher()
        dist = losses.dist_loss(
            step.logits, t_logits, base.dist_beta, base.dist_gamma, base.dist_temperature
        )
        step.metrics["dist_loss"] = dist
        return base.dist_ce_weight * step.ce + dist

    return common.student_loss(pair, config, term, teacher_features=False)


def _dist_check(config) -> list[str]:
    problems = _positive(config, "dist_temperature", "DIST on CIFAR-100: 4")
    return problems + common.non_negative(config, "dist_ce_weight", "dist_beta", "dist_gamma")


DIST = common.Implementation(loss=_dist_loss, check=_dist_check)


# ----------------------------------------------------------------------------------- KD+LS


def _kd_ls_loss(pair, config, constants):
    """ls_kd_ce_weight * CE + ls_kd_weight * T^2 KL on standardised logits, T = ls_kd_temperature."""
    del constants
    base = config.baselines

    def term(step):
        t_logits, _ = step.teacher()
        kd = losses.kd_loss(
            losses.standardize(step.logits), losses.standardize(t_logits), base.ls_kd_temperature
        )
        step.metrics["kd_loss"] = kd
        return base.ls_kd_ce_weight * step.ce + base.ls_kd_weight * kd

    return common.student_loss(pair, config, term, teacher_features=False)


def _kd_ls_check(config) -> list[str]:
    problems = _positive(config, "ls_kd_temperature", "logit-standardization-KD: 2")
    return problems + common.non_negative(config, "ls_kd_ce_weight", "ls_kd_weight")


KD_LS = common.Implementation(loss=_kd_ls_loss, check=_kd_ls_check)
