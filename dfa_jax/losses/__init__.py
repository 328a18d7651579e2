"""Pure loss functions of DFA: aggregation and bridge loss (stage 1), feature distances (stage 2).

Usage: `from dfa_jax import losses; losses.st_loss(student, aggregated)`.
"""

from dfa_jax.losses.dfa import GAMMA_ST, GAMMA_TS, aggregate, bridge_loss, st_loss, ts_loss
from dfa_jax.losses.distances import (
    DISTANCES,
    GAMMA_FD,
    bn_margin,
    empirical_margin,
    feature_distillation_loss,
    group_weights,
    l2,
    partial_l2,
)

__all__ = [
    "DISTANCES",
    "GAMMA_FD",
    "GAMMA_ST",
    "GAMMA_TS",
    "aggregate",
    "bn_margin",
    "bridge_loss",
    "empirical_margin",
    "feature_distillation_loss",
    "group_weights",
    "l2",
    "partial_l2",
    "st_loss",
    "ts_loss",
]
