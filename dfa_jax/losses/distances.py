"""Feature distances and margins (overhaul-distillation's), and DFA's stage-2 distillation loss.

The partial L2 distance and the BN-derived margin follow Heo et al., "A Comprehensive Overhaul of
Feature Distillation" (ICCV 2019), as in their public code (`distiller.py`): the distance is summed
over every element and divided by the batch size. DFA uses the same distance with the constant
margin -1 (paper §3.4: "values no smaller than -1 are preserved"); the BN margin is the Margin
baseline's. All functions are pure, take NHWC arrays and compute in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

GAMMA_FD = 1e-3
"""Weight of the feature distillation loss in `L = CE + GAMMA_FD * L_fd` (paper Eq. 4's γ_fd,
which the paper gives no number for): overhaul's `/ batch_size / 1000` and the DFA authors'
`MarginReLULoss` weight 1e-3, our reading for the WRN pairs."""

DISTANCES = ("partial_l2", "l2")
"""Valid `distance` names of `feature_distillation_loss` (config `distill.distance`)."""

# Below this negative-tail mass overhaul treats the tail as negligible and uses -3 sigma instead of
# the truncated-normal mean, whose ratio pdf/cdf would be ill-conditioned there.
_TAIL_MIN = 1e-3


def _per_sample_sum_mean(x: jax.Array) -> jax.Array:
    """Sum over all non-batch axes, mean over the batch: [B, ...] -> scalar."""
    return jnp.mean(jnp.sum(x, axis=tuple(range(1, x.ndim))))


def bn_margin(gamma: jax.Array, beta: jax.Array) -> jax.Array:
    """Overhaul's per-channel margin `E[x | x < 0]`, x ~ N(beta, gamma^2) from the pre-ReLU BN.

    With `s = |gamma|`, `z = beta / s`, the truncated-normal mean is
    `beta - s * pdf(z) / cdf(-z)`; where the negative tail `cdf(-z) <= 1e-3` the margin is `-3 s`.

    Args:
      gamma: [C] BN scale (its sign is irrelevant: only |gamma| is the std).
      beta: [C] BN shift.

    Returns:
      [C] float32 margins, all <= 0.
    """
    beta = jnp.asarray(beta, jnp.float32)
    # A zero gamma is clamped to the smallest normal float: the limit gives beta for beta < 0 and
    # ~0 otherwise, instead of 0/0 (the value only: the gradient w.r.t. gamma at 0 is NaN, and
    # nothing differentiates margins; overhaul divides by zero there).
    s = jnp.maximum(jnp.abs(jnp.asarray(gamma, jnp.float32)), jnp.finfo(jnp.float32).tiny)
    z = beta / s
    tail = norm.cdf(-z)
    has_tail = tail > _TAIL_MIN
    # The untaken branch still gets a safe denominator so neither value nor gradient is NaN.
    truncated_mean = beta - s * norm.pdf(z) / jnp.where(has_tail, tail, 1.0)
    return jnp.where(has_tail, truncated_mean, -3.0 * s)


def empirical_margin(features: jax.Array) -> jax.Array:
    """Sample estimate of `E[x | x < 0]` per channel: the mean of the negative values.

    Args:
      features: [B, H, W, C] (pre-ReLU) maps.

    Returns:
      [C] float32; 0 for a channel without negative values.
    """
    x = features.astype(jnp.float32)
    negative = x < 0
    axes = tuple(range(x.ndim - 1))
    total = jnp.sum(jnp.where(negative, x, 0.0), axis=axes)
    count = jnp.sum(negative, axis=axes)
    return total / jnp.maximum(count, 1)


def partial_l2(student: jax.Array, teacher: jax.Array, margin: float | jax.Array) -> jax.Array:
    """Overhaul's partial L2 distance: squared error to `t' = max(teacher, margin)`, masked.

    The error `(s - t')^2` is kept where `s > t'` or `t' > 0`: a student value already at or below
    a non-positive target is not pushed further (the ReLU would zero both anyway).

    Args:
      student: [B, H, W, C] student map in teacher channels.
      teacher: [B, H, W, C] teacher target (a map or an aggregation A_i).
      margin: scalar (DFA: -1) or [C] per-channel margin, broadcast on the last axis.

    Returns:
      float32 scalar: sum over H*W*C, mean over the batch.
    """
    s = student.astype(jnp.float32)
    target = jnp.maximum(teacher.astype(jnp.float32), jnp.asarray(margin, jnp.float32))
    kept = (s > target) | (target > 0)
    return _per_sample_sum_mean(jnp.where(kept, jnp.square(s - target), 0.0))


def l2(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Plain squared error `(s - t)^2` (`distill.distance='l2'`).

    Args:
      student: [B, H, W, C] student map in teacher channels.
      teacher: [B, H, W, C] teacher target.

    Returns:
      float32 scalar: sum over H*W*C, mean over the batch (the same reduction as `partial_l2`).
    """
    return _per_sample_sum_mean(
        jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32))
    )


def group_weights(num_groups: int) -> jax.Array:
    """Per-group distillation weights `w_i = 1 / 2^(G - i)`, i = 1..G (overhaul's).

    Returns:
      [G] float32, e.g. [1/4, 1/2, 1] for G = 3: the deepest group weighs most.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    return 2.0 ** (jnp.arange(1, num_groups + 1, dtype=jnp.float32) - num_groups)


def feature_distillation_loss(
    student_feats: Sequence[jax.Array],
    targets: Sequence[jax.Array],
    distance: str = "partial_l2",
    margin: float | jax.Array | Sequence[float | jax.Array] = -1.0,
    weights: Sequence[float] | jax.Array | None = None,
) -> jax.Array:
    """Feature distillation loss, paper Eq. 3 as we read it: `L_fd = sum_i w_i D(F_s(S_i), A_i)`.

    The student objective `L = CE + GAMMA_FD * L_fd` (Eq. 4; GAMMA_FD = 1e-3 is our reading, see
    its note) is assembled by the caller. Targets are used as given: the caller freezes alpha
    and keeps teacher gradients out.

    Args:
      student_feats: G arrays [B, H_i, W_i, C_i], the student maps already passed through the
        student transform (to teacher channels).
      targets: G arrays of the same shapes, the teacher aggregations A_i.
      distance: 'partial_l2' (default) or 'l2'.
      margin: partial_l2's margin, one for every group (a scalar, default -1, or a [C] array), or a
        sequence of G per-group margins (scalars or [C_i] arrays). Ignored by 'l2'.
      weights: G group weights; default `group_weights(G)`.

    Returns:
      float32 scalar: the weighted sum over groups of per-group losses (each summed over H*W*C,
      mean over the batch).
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    num_groups = len(student_feats)
    if num_groups == 0 or len(targets) != num_groups:
        raise ValueError(
            f"need one target per student group, got {num_groups} groups and {len(targets)} targets"
        )
    margins = list(margin) if isinstance(margin, (list, tuple)) else [margin] * num_groups
    if len(margins) != num_groups:
        raise ValueError(f"got {len(margins)} margins for {num_groups} groups")
    weights = group_weights(num_groups) if weights is None else jnp.asarray(weights, jnp.float32)
    if weights.shape != (num_groups,):
        raise ValueError(f"weights have shape {weights.shape}, expected ({num_groups},)")

    total = jnp.zeros((), jnp.float32)
    for i, (s, t) in enumerate(zip(student_feats, targets)):
        if s.shape != t.shape:
            raise ValueError(f"group {i}: student {s.shape} vs target {t.shape}")
        d = partial_l2(s, t, margins[i]) if distance == "partial_l2" else l2(s, t)
        total = total + weights[i] * d
    return total
