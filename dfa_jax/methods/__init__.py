"""Every distillation method of Table 2 as a w loss on the shared bilevel step (beta frozen).

A distillation run is named by a *label*: a registered method (`method_registry`: `none`, `kd`,
`fitnets`, `at`, `jacobian`, `ft`, `ab`, `sp`, `margin`; the later logit baselines `dkd`, `dist`,
`kd_ls`, `dkd_ls`) or, for DFA, its aggregation (`dfa`, `last`, `average`, `random`, `file`,
`start`: Table 5, DFA-T and the search's unsearched start). Each method's `Implementation` builds
the learned helpers it trains beside the student (connectors, FitNets' regressor, FT's
translator), its loss `(params, batch_stats, beta, batch, rng, aux=teacher variables) -> (loss,
(batch_stats, metrics))`, and what runs before its student trains: FT pre-trains a paraphraser
of the teacher's last map and AB initialises the student by its activation-boundary loss (first
stages of their own), DFA freezes its aggregation's alpha, Margin reads the teacher's margins.

One module per family: `logits.py` (none, KD, Jacobian), `feature_maps.py` (FitNets, AT, SP,
FT), `boundaries.py` (AB, Margin), `logit_targets.py` (DKD, DIST, KD+LS, DKD+LS), `dfa.py` (DFA
and its aggregations); `common.py` holds what
they share.

Feature positions: the group ends. AB, Margin and DFA take them pre-ReLU (they are about the
sign/value of pre-activations; Margin's margins come from the teacher's BN, or are -1 for a
teacher without a BN producing its group ends). The methods from RepDistiller (FitNets, AT, SP,
FT) take the *raw* group outputs, the residual stream before the BN that consumes it
(`models.raw_group_ends`).
"""

from dfa_jax.method_registry import method_of
from dfa_jax.methods.boundaries import (
    ab_connectors,
    ab_init_trainable,
    initialise_by_ab,
    make_ab_init_loss,
    teacher_margins,
)
from dfa_jax.methods.common import (
    STEM,
    Implementation,
    Pair,
    Setup,
    Start,
    Step,
    apply_helper,
    connector_helpers,
    group_key,
    implementation,
    init_helpers,
    init_module,
    make_loss_fn,
    positions,
    student_loss,
    teacher_variables,
)
from dfa_jax.methods.dfa import aggregation_alpha, frozen_beta, init_beta
from dfa_jax.methods.feature_maps import (
    Paraphraser,
    Translator,
    fitnets_group,
    make_paraphraser_loss,
    paraphraser_factor,
    pretrain_paraphraser,
)
from dfa_jax.methods.logits import jacobian_term

__all__ = [
    "STEM",
    "Implementation",
    "Pair",
    "Paraphraser",
    "Setup",
    "Start",
    "Step",
    "Translator",
    "ab_connectors",
    "ab_init_trainable",
    "aggregation_alpha",
    "apply_helper",
    "connector_helpers",
    "fitnets_group",
    "frozen_beta",
    "group_key",
    "implementation",
    "init_beta",
    "init_helpers",
    "init_module",
    "initialise_by_ab",
    "jacobian_term",
    "make_ab_init_loss",
    "make_loss_fn",
    "make_paraphraser_loss",
    "method_of",
    "paraphraser_factor",
    "positions",
    "pretrain_paraphraser",
    "student_loss",
    "teacher_margins",
    "teacher_variables",
]
