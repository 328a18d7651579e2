"""Pure loss functions of DFA: aggregation and bridge loss (stage 1), feature distances (stage 2),
and the baseline distillation losses of Table 2 (`baselines.py`).

Usage: `from dfa_jax import losses; losses.st_loss(student, aggregated)`.
"""

from dfa_jax.losses.baselines import (
    AB_GAMMA,
    AT_BETA,
    FITNETS_BETA,
    FT_BETA,
    SP_GAMMA,
    ab_loss,
    at_loss,
    attention_map,
    fitnets_loss,
    ft_loss,
    jacobian_loss,
    kd_loss,
    sp_loss,
    target_logit_input_grad,
)
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
    "AB_GAMMA",
    "AT_BETA",
    "DISTANCES",
    "FITNETS_BETA",
    "FT_BETA",
    "GAMMA_FD",
    "GAMMA_ST",
    "GAMMA_TS",
    "SP_GAMMA",
    "ab_loss",
    "aggregate",
    "at_loss",
    "attention_map",
    "bn_margin",
    "bridge_loss",
    "empirical_margin",
    "feature_distillation_loss",
    "fitnets_loss",
    "ft_loss",
    "group_weights",
    "jacobian_loss",
    "kd_loss",
    "l2",
    "partial_l2",
    "sp_loss",
    "st_loss",
    "target_logit_input_grad",
    "ts_loss",
]
