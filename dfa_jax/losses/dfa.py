"""DFA's stage-1 pieces: the feature aggregation (Eq. 2) and the bridge loss (Eqs. 10-12).

Pure functions on NHWC arrays; every result is computed in float32 whatever the input dtype, so
bf16 activations do not degrade the loss or the architecture gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

GAMMA_ST = 1e-3
"""Weight of the student-to-teacher loss in the bridge loss (paper §3.4, Eq. 12)."""

GAMMA_TS = 1.0
"""Weight of the teacher-to-student loss in the bridge loss (paper §3.4, Eq. 12)."""

# Keeps the per-sample normalisation of Eq. 11 finite (and differentiable) for an all-zero map.
_NORM_EPS = 1e-12


AGGREGATION_FORMS = ("platform", "reduction", "chain")


def aggregate(
    features: Sequence[jax.Array] | jax.Array, alpha: jax.Array, form: str = "platform"
) -> jax.Array:
    """Feature aggregation of one group, paper Eq. 2: `A = sum_j alpha_j T_j`.

    Args:
      features: the group's N teacher maps, a sequence of [B, H, W, C] arrays or one stacked
        [N, B, H, W, C] array.
      alpha: [N] aggregation weights (the softmax of beta, Eq. 6); used as given, not renormalised.
      form: how the sum is written for XLA: 'platform' (the chain on the CPU, the reduction
        elsewhere: see below), or 'reduction' / 'chain' on every platform (for measuring).

    Returns:
      [B, H, W, C] float32, the alpha-weighted sum over the N maps.
    """
    maps = list(features)  # iterating a stacked array yields its N maps
    alpha = jnp.asarray(alpha, jnp.float32)
    if not maps or alpha.shape != (len(maps),):
        raise ValueError(f"alpha has shape {alpha.shape}, expected ({len(maps)},): one per map")
    if form not in AGGREGATION_FORMS:
        raise ValueError(f"form {form!r} is unknown; use one of {AGGREGATION_FORMS}")
    maps = [m.astype(jnp.float32) for m in maps]
    if form != "platform":
        return (_sum_as_reduction if form == "reduction" else _sum_as_chain)(maps, alpha)
    # Two forms of the same sum, chosen where the step is lowered. A chain of multiply-adds is
    # fused by XLA into each of its consumers (the feature loss and that loss's gradient), which
    # keeps all N maps alive until the backward; one reduction over the stacked maps leaves one
    # output for both to read (ShuffleNetV2 2.0's distillation step: 14 % less temp memory in
    # XLA's accounting, BENCHMARKS.md). XLA:CPU runs that reduction through YNNPACK about 15x
    # slower than the fused chain (~7 % of a DFA step), so the CPU, where memory is plentiful,
    # keeps the chain. Neither is a tensordot: a dot may run at reduced precision on TPU/GPU.
    return jax.lax.platform_dependent(maps, alpha, cpu=_sum_as_chain, default=_sum_as_reduction)


def _sum_as_reduction(maps: Sequence[jax.Array], alpha: jax.Array) -> jax.Array:
    """`sum_j alpha_j maps_j` as one reduction over the stacked maps: [N] x N [B, H, W, C] ->
    [B, H, W, C]."""
    stacked = jnp.stack(maps)
    return jnp.sum(alpha.reshape((-1,) + (1,) * (stacked.ndim - 1)) * stacked, axis=0)


def _sum_as_chain(maps: Sequence[jax.Array], alpha: jax.Array) -> jax.Array:
    """The same sum as a chain of multiply-adds (XLA fuses it into its consumers)."""
    out = alpha[0] * maps[0]
    for j in range(1, len(maps)):
        out = out + alpha[j] * maps[j]
    return out


def _unit(x: jax.Array) -> jax.Array:
    """Per-sample L2 normalisation of the flattened map: [B, ...] -> [B, D]."""
    flat = x.astype(jnp.float32).reshape(x.shape[0], -1)
    return flat / jnp.sqrt(jnp.sum(flat * flat, axis=1, keepdims=True) + _NORM_EPS)


def st_loss(student: jax.Array, aggregated: jax.Array) -> jax.Array:
    """Student-to-teacher loss, paper Eq. 11: `mean_b || u(s_b) - u(a_b) ||^2`.

    `u(x_b) = vec(x_b) / sqrt(||vec(x_b)||^2 + 1e-12)` normalises each sample's flattened map, so
    the loss is scale invariant per sample and lies in [0, 4]. Per sample is our reading: Eq. 11
    normalises "vec of the tensor", which could also be the whole batch's (another value, and
    another scale for γ_ST).

    Args:
      student: [B, H, W, C] ST-connector output `F_s(S_i)` (student map in teacher channels).
      aggregated: [B, H, W, C] teacher aggregation `A_i`.

    Returns:
      float32 scalar: squared difference summed over H*W*C, mean over the batch.
    """
    if student.shape != aggregated.shape:
        raise ValueError(
            f"shape mismatch: student {student.shape} vs aggregated {aggregated.shape}"
        )
    diff = _unit(student) - _unit(aggregated)
    return jnp.mean(jnp.sum(diff * diff, axis=1))


def ts_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Teacher-to-student loss, paper Eq. 10 (with Eq. 5): cross-entropy on integer labels.

    Args:
      logits: [B, K] student logits from the TS path (A_i injected at the group-i boundary).
      labels: [B] integer class labels in [0, K).

    Returns:
      float32 scalar: `-log softmax(logits)[label]`, mean over the batch.
    """
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    )
    return jnp.mean(per_example)


def bridge_loss(
    student: jax.Array,
    aggregated: jax.Array,
    logits: jax.Array,
    labels: jax.Array,
    gamma_st: float = GAMMA_ST,
    gamma_ts: float = GAMMA_TS,
) -> jax.Array:
    """Bridge loss of group i, paper Eq. 12: `gamma_st * L_ST + gamma_ts * L_TS`.

    Both the training loss (for w) and the validation loss (for beta) of the search.

    Args:
      student: [B, H, W, C] ST-connector output, as in `st_loss`.
      aggregated: [B, H, W, C] aggregation `A_i`, as in `st_loss`.
      logits: [B, K] TS-path logits, as in `ts_loss`.
      labels: [B] integer labels.
      gamma_st: weight of `st_loss` (paper: 1e-3).
      gamma_ts: weight of `ts_loss` (paper: 1).

    Returns:
      float32 scalar (each term already a batch mean).
    """
    return gamma_st * st_loss(student, aggregated) + gamma_ts * ts_loss(logits, labels)
