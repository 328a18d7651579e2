"""Later logit baselines: DKD (Zhao et al., CVPR 2022), DIST (Huang et al., NeurIPS 2022) and
logit standardisation (Sun et al., CVPR 2024).

Each function re-derives the loss of the authors' public PyTorch code, reductions and constants
included: DKD as mdistiller has it (github.com/megvii-research/mdistiller,
`mdistiller/distillers/DKD.py`), DIST as DIST_KD has it (github.com/hunto/DIST_KD, `DIST`:
Pearson correlations of the tempered softmaxes, `tau^2`-scaled), logit standardisation as
logit-standardization-KD has it (github.com/sunshangquan/logit-standardization-KD, its
`normalize` in `mdistiller/distillers/KD.py` and `DKD.py`). RepDistiller has none of the three.

All functions are pure and jit-able, take [B, K] logits and [B] integer labels, and compute in
float32. Teacher inputs are used as given: the caller keeps teacher gradients out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STANDARDIZE_EPS = 1e-7
"""logit-standardization-KD's `normalize`: `(z - mean) / (1e-7 + std)`."""

DIST_EPS = 1e-8
"""DIST_KD's `cosine_similarity` eps: `<a, b> / (|a| |b| + 1e-8)`."""

DKD_MASK = 1000.0
"""mdistiller's DKD: the target logit (already divided by T) minus 1000 leaves the non-target
distribution of the other K - 1 classes."""


def _check_logits(student_logits: jax.Array, teacher_logits: jax.Array) -> None:
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits {teacher_logits.shape}"
            " must both be [B, K]"
        )


def _check_temperature(temperature) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def standardize(logits: jax.Array) -> jax.Array:
    """Logit standardisation (Sun et al. 2024): per sample, `(z - mean_k z) / (1e-7 + std_k z)`.

    `std` is the unbiased sample standard deviation over the K classes (torch's `Tensor.std`
    default, ddof=1), as logit-standardization-KD's `normalize` computes it.

    Args:
      logits: [B, K] logits (K >= 2).

    Returns:
      [B, K] float32: each row with mean 0 and standard deviation just under 1 (a constant row
      becomes 0).
    """
    z = logits.astype(jnp.float32)
    mean = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.sum((z - mean) ** 2, axis=-1, keepdims=True) / (z.shape[-1] - 1)
    # sqrt's gradient at 0 is infinite: a constant row (std 0) gets the reference's value and
    # torch's finite gradient by taking sqrt of positive variances only.
    positive = var > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return (z - mean) / (STANDARDIZE_EPS + std)


def _kl_sum(p_target: jax.Array, log_q: jax.Array) -> jax.Array:
    """torch `kl_div(log_q, p_target, reduction='sum')`: `sum p (log p - log q)`, 0 where p = 0."""
    return jnp.sum(jax.scipy.special.xlogy(p_target, p_target) - p_target * log_q)


def dkd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    alpha: float,
    beta: float,
    temperature: float,
) -> jax.Array:
    """Decoupled KD (Zhao et al. 2022): `alpha * TCKD + beta * NCKD`, each `T^2 / B * KL`.

    TCKD is the KL between the binary (target, non-target) probabilities of teacher and student
    at temperature T: `b = [p_gt, sum_{k != gt} p_k]` of `p = softmax(z / T)`, the student's
    log taken directly (mdistiller's `torch.log` of the summed probabilities). NCKD is the KL
    between the distributions over the non-target classes, `softmax(z / T - 1000 * gt_mask)`
    (mdistiller's masking; the target class keeps a probability of ~exp(-1000), i.e. 0). Both
    are summed over classes and batch and divided by the batch size, times `T^2`.

    Args:
      student_logits: [B, K] student logits.
      teacher_logits: [B, K] teacher logits.
      labels: [B] integer labels in [0, K).
      alpha: weight of TCKD (mdistiller: 1.0).
      beta: weight of NCKD (mdistiller: 8.0, or the pair's; `DKD_BETA`).
      temperature: T > 0 (mdistiller: 4.0).

    Returns:
      float32 scalar.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    s = student_logits.astype(jnp.float32) / temperature
    t = teacher_logits.astype(jnp.float32) / temperature
    gt = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.float32)  # mdistiller's gt_mask.
    other = 1.0 - gt  # Its other_mask.
    p_s, p_t = jax.nn.softmax(s, axis=-1), jax.nn.softmax(t, axis=-1)
    b_s = jnp.stack([jnp.sum(p_s * gt, -1), jnp.sum(p_s * other, -1)], axis=-1)
    b_t = jnp.stack([jnp.sum(p_t * gt, -1), jnp.sum(p_t * other, -1)], axis=-1)
    scale = temperature**2 / s.shape[0]
    tckd = _kl_sum(b_t, jnp.log(b_s)) * scale
    nckd_t = jax.nn.softmax(t - DKD_MASK * gt, axis=-1)
    nckd_log_s = jax.nn.log_softmax(s - DKD_MASK * gt, axis=-1)
    nckd = _kl_sum(nckd_t, nckd_log_s) * scale
    return alpha * tckd + beta * nckd


def dkd_warmup(step, steps_per_epoch: int, warmup_epochs: int) -> jax.Array:
    """mdistiller's DKD warm-up factor `min(epoch / warmup, 1)` after `step` completed steps.

    mdistiller counts epochs from 1 and holds the factor for a whole epoch; the epoch a step
    belongs to is `step // steps_per_epoch + 1`, so the first epoch's steps weigh DKD by
    `1 / warmup` and every step from epoch `warmup` on by 1.

    Args:
      step: int scalar (traced or not): the steps completed before this one.
      steps_per_epoch: steps in an epoch (> 0).
      warmup_epochs: mdistiller's `DKD.WARMUP` (> 0; 20).

    Returns:
      float32 scalar in (0, 1].
    """
    epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch + 1
    return jnp.minimum(epoch.astype(jnp.float32) / warmup_epochs, 1.0)


def _pearson_rows(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per row, DIST_KD's `pearson_correlation`: the cosine (eps 1e-8) of the centred rows."""
    a = a - jnp.mean(a, axis=1, keepdims=True)
    b = b - jnp.mean(b, axis=1, keepdims=True)
    norms = _norm_rows(a) * _norm_rows(b)
    return jnp.sum(a * b, axis=1) / (norms + DIST_EPS)


def _norm_rows(x: jax.Array) -> jax.Array:
    """Each row's L2 norm, with torch's gradient 0 (not JAX's NaN) at a zero row: a centred row
    is zero for a batch of one (the intra-class term's columns) or a class equally likely for
    every sample, and one NaN gradient would ruin the student."""
    squares = jnp.sum(x * x, axis=1)
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def dist_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    beta: float,
    gamma: float,
    temperature: float,
) -> jax.Array:
    """DIST (Huang et al. 2022): `T^2 * (beta * inter + gamma * intra)` on `y = softmax(z / T)`.

    inter (inter-class relation) is `1 - mean_b pearson(y_s[b, :], y_t[b, :])`, each sample's
    class distribution correlated; intra (intra-class relation) the same over the transposed
    [K, B] predictions, each class's scores across the batch correlated. Pearson is DIST_KD's:
    the cosine of the centred vectors with 1e-8 added to the product of norms.

    Args:
      student_logits: [B, K] student logits.
      teacher_logits: [B, K] teacher logits.
      beta: weight of the inter-class term (the DIST paper's CIFAR-100 setting: 2).
      gamma: weight of the intra-class term (2).
      temperature: T > 0 (4).

    Returns:
      float32 scalar.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    y_s = jax.nn.softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    y_t = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    inter = 1.0 - jnp.mean(_pearson_rows(y_s, y_t))
    intra = 1.0 - jnp.mean(_pearson_rows(y_s.T, y_t.T))
    return temperature**2 * (beta * inter + gamma * intra)
