"""Baseline distillation losses of the paper's Table 2: KD, FitNets, AT, SP, FT, AB, Jacobian.

Each function re-derives the loss of the public PyTorch code the community compares against
(RepDistiller `distiller_zoo/*.py`; Knowledge-Distillation-Zoo `kd_losses/sobolev.py` for the
Jacobian), reductions and constants included, so that a weight tuned there means the same here.
The `*_BETA`/`*_GAMMA` constants are RepDistiller's loss weights (`scripts/run_cifar_distill.sh`);
the DFA authors' own settings are noted per loss for the presets.

All functions are pure and jit-able, take NHWC features and [B, K] logits, and compute in float32.
Teacher inputs are used as given: as in `distances.py`, the caller keeps teacher gradients out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

AT_BETA = 1000.0
"""RepDistiller's AT weight (`-b 1000`): `L = CE + AT_BETA * sum_positions at_loss`."""

SP_GAMMA = 3000.0
"""RepDistiller's SP weight (`-b 3000`), also the DFA authors' `SPLoss.gamma`."""

FT_BETA = 200.0
"""RepDistiller's FT weight (`-b 200`): `L = CE + FT_BETA * ft_loss`."""

FITNETS_BETA = 100.0
"""RepDistiller's FitNets weight (`-b 100`): `L = CE + FITNETS_BETA * fitnets_loss`."""

AB_GAMMA = 3e-3
"""RepDistiller `ABLoss`'s scale `3 / 1000`: group i contributes `w_i * ab_loss / B * AB_GAMMA`."""

# F.normalize's default eps: the norm is clamped to at least this, so an all-zero row stays zero.
_NORM_EPS = 1e-12

# Gram matrices as exact float32 products: the default dot precision may use TF32/bf16 passes on
# GPU/TPU, which would move SP away from the reference by far more than float32 rounding.
_HIGHEST = jax.lax.Precision.HIGHEST


def _l2_normalize(x: jax.Array) -> jax.Array:
    """Row-wise `x / max(||x||_2, 1e-12)` of a [N, D] array (torch `F.normalize(x, dim=1)`)."""
    # max(sqrt(s), eps) == sqrt(max(s, eps^2)); the latter keeps the gradient finite at s = 0.
    sq = jnp.sum(x * x, axis=1, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))


def _check_power(name: str, p: float) -> float:
    """Checks a static exponent; an integral one becomes an int so `x ** p` keeps negative bases."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or p <= 0:
        raise ValueError(f"{name} must be a positive number, got {p!r}")
    return int(p) if float(p).is_integer() else float(p)


def adaptive_avg_pool(x: jax.Array, hw) -> jax.Array:
    """[B, H, W, C] -> [B, *hw, C]: torch's `F.adaptive_avg_pool2d(x, hw)` on an NHWC map.

    Where a teacher's group ends larger than the student's, DFA, Margin and the search pool the
    teacher's maps to the student's size with it, as mdistiller's OFD does; AT and FT pool the
    larger of their two maps (`_match_spatial`). Unlike the losses, it keeps `x`'s dtype.
    """
    return _adaptive_avg_pool_axis(_adaptive_avg_pool_axis(x, 1, hw[0]), 2, hw[1])


def _adaptive_avg_pool_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """torch `adaptive_avg_pool` along one axis: bin i averages [floor(i n/s), ceil((i+1) n/s))."""
    n = x.shape[axis]
    if n == size:
        return x
    if n % size == 0:  # Equal bins: one reduction over a reshape instead of `size` slices.
        shape = x.shape[:axis] + (size, n // size) + x.shape[axis + 1 :]
        return jnp.mean(x.reshape(shape), axis=axis + 1)
    bins = []
    for i in range(size):
        start, stop = (i * n) // size, -((-(i + 1) * n) // size)
        bins.append(jnp.mean(jax.lax.slice_in_dim(x, start, stop, axis=axis), axis=axis))
    return jnp.stack(bins, axis=axis)


def _match_spatial(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adaptive-average-pools the spatially larger NHWC map down to the other's H x W.

    RepDistiller (`Attention.at_loss`, `FactorTransfer.factor_loss`) pools the larger map to
    (H, H) after comparing heights only; for the square maps it handles this is the same.
    """
    s_hw, t_hw = student.shape[1:3], teacher.shape[1:3]
    if s_hw == t_hw:
        return student, teacher
    if s_hw[0] >= t_hw[0] and s_hw[1] >= t_hw[1]:
        return adaptive_avg_pool(student, t_hw), teacher
    if t_hw[0] >= s_hw[0] and t_hw[1] >= s_hw[1]:
        return student, adaptive_avg_pool(teacher, s_hw)
    raise ValueError(
        f"cannot pool: student {s_hw} is neither larger nor smaller than teacher {t_hw}"
    )


def _check_same_shape(student: jax.Array, teacher: jax.Array) -> None:
    """Raises ValueError unless the two arrays have identical shapes."""
    if student.shape != teacher.shape:
        raise ValueError(f"shape mismatch: student {student.shape} vs teacher {teacher.shape}")


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Hinton et al. 2015 KD term: `T^2 / B * sum_{b,k} p_t (log p_t - log p_s)`.

    `p = softmax(z / T)`; the KL of the teacher's to the student's soft distribution, summed over
    classes and batch and divided by the batch size, scaled by `T^2` so the gradient magnitude does
    not shrink with T. Matches RepDistiller `DistillKL` (`kl_div(log p_s, p_t, size_average=False)
    * T**2 / B`); RepDistiller uses T = 4 and `L = 0.1 CE + 0.9 kd_loss`. The DFA authors'
    `KDLoss` uses the soft cross-entropy `-sum p_t log p_s` (= this + the constant teacher entropy,
    same gradient) as `alpha CE + (1 - alpha) T^2 soft-CE`, alpha = 0.8, T = 4 on CIFAR-100 and
    16 on CINIC-10 (their scripts).

    Args:
      student_logits: [B, K] student logits.
      teacher_logits: [B, K] teacher logits.
      temperature: T > 0 (a Python number or a traced scalar).

    Returns:
      float32 scalar: summed over K, mean over the batch.
    """
    _check_same_shape(student_logits, teacher_logits)
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    # log p_t from log_softmax stays finite where p_t underflows to 0, so those terms are exactly
    # 0 like torch's `kl_div` (which defines 0 * log 0 = 0).
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s))
    return kl * (temperature**2) / student_logits.shape[0]


def fitnets_loss(student_regressed: jax.Array, teacher_feat: jax.Array) -> jax.Array:
    """Romero et al. 2015 FitNets hint loss: `mean (r(s) - t)^2` over every element.

    Matches RepDistiller `HintLoss` (`nn.MSELoss()`, mean over B*H*W*C), used there on one hint
    layer with `FITNETS_BETA` = 100; the regressor r (a conv + BN + ReLU `ConvReg`) is the
    caller's.

    Args:
      student_regressed: [B, H, W, C] student hint after the regressor, in teacher shape.
      teacher_feat: [B, H, W, C] teacher hint.

    Returns:
      float32 scalar: mean over all B*H*W*C elements.
    """
    _check_same_shape(student_regressed, teacher_feat)
    diff = student_regressed.astype(jnp.float32) - teacher_feat.astype(jnp.float32)
    return jnp.mean(diff * diff)


def attention_map(feat: jax.Array, p: float = 2) -> jax.Array:
    """Zagoruyko & Komodakis 2017 attention map: `normalize(mean_c x_c^p)` per sample.

    Matches RepDistiller `Attention.at` (`F.normalize(f.pow(p).mean(1).view(B, -1))`, L2 norm
    clamped at 1e-12). It is the paper's `sum_c |x_c|^p` for even p (the mean's 1/C cancels in
    the normalisation); for odd p the signed power is kept as in the reference, so p = 1 on
    pre-ReLU maps is the DFA authors' AT map (signed channel sum, normalised per sample).

    Args:
      feat: [B, H, W, C] feature map.
      p: positive exponent (static).

    Returns:
      [B, H*W] float32, unit L2 norm per sample (row-major over H, W).
    """
    p = _check_power("p", p)
    x = feat.astype(jnp.float32)
    return _l2_normalize(jnp.mean(x**p, axis=-1).reshape(x.shape[0], -1))


def at_loss(student_feat: jax.Array, teacher_feat: jax.Array, p: float = 2) -> jax.Array:
    """Attention-transfer loss of one position: `mean (a_s - a_t)^2` of `attention_map`s.

    When the spatial sizes differ, the larger feature map (not its attention map) is
    adaptive-average-pooled to the smaller H x W first, as RepDistiller `Attention.at_loss` does;
    channel counts may differ. Matches RepDistiller `Attention.at_loss` (`.pow(2).mean()` over
    B*H*W). RepDistiller sums it over the inner group outputs with weight `AT_BETA` = 1000
    (`L = CE + 1000 * sum_i at_loss_i`). The DFA authors' `ATLoss` instead uses (pre-ReLU maps
    in their WRN_28_4 -> WRN_16_2 script alone, the one with `--preReLU`) the signed channel sum (here p = 1) and `CE + (beta / 2) * sum_i at_loss_i` with beta = 60 over
    4 WRN positions.

    Args:
      student_feat: [B, Hs, Ws, Cs] student map.
      teacher_feat: [B, Ht, Wt, Ct] teacher map.
      p: positive exponent of `attention_map` (static).

    Returns:
      float32 scalar: mean over B and the (common) H*W positions.
    """
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"batch mismatch: {student_feat.shape} vs {teacher_feat.shape}")
    s, t = _match_spatial(student_feat.astype(jnp.float32), teacher_feat.astype(jnp.float32))
    diff = attention_map(s, p) - attention_map(t, p)
    return jnp.mean(diff * diff)


def sp_loss(student_feat: jax.Array, teacher_feat: jax.Array) -> jax.Array:
    """Tung & Mori 2019 similarity-preserving loss: `||G_s - G_t||_F^2 / B^2`.

    `G = normalize_rows(f f^T)` with f the [B, H*W*C] flattened features (the flattening order
    does not change G). The row normalisation removes a global scale of either network's features
    (and each row's own sample scale, but not the other samples' scales in that row, so the loss
    is not invariant to per-sample rescaling). Matches RepDistiller `Similarity.similarity_loss`
    (`(G_diff * G_diff).sum() / (bsz * bsz)`, row normalisation by `F.normalize`) and the DFA
    authors' `SPLoss.get_g` (rows divided by their norm, no eps). RepDistiller applies it to the
    last group output with `SP_GAMMA` = 3000; the DFA authors sum it over all positions with the
    same gamma.

    Args:
      student_feat: [B, Hs, Ws, Cs] student map.
      teacher_feat: [B, Ht, Wt, Ct] teacher map (only the batch size must match).

    Returns:
      float32 scalar: squared Frobenius norm of the [B, B] difference, divided by B^2.
    """
    batch = student_feat.shape[0]
    if teacher_feat.shape[0] != batch:
        raise ValueError(f"batch mismatch: {student_feat.shape} vs {teacher_feat.shape}")

    def gram(feat: jax.Array) -> jax.Array:
        f = feat.astype(jnp.float32).reshape(batch, -1)
        return _l2_normalize(jnp.matmul(f, f.T, precision=_HIGHEST))

    diff = gram(teacher_feat) - gram(student_feat)
    return jnp.sum(diff * diff) / (batch * batch)


def ft_loss(
    student_factor: jax.Array, teacher_factor: jax.Array, p1: float = 2, p2: int = 1
) -> jax.Array:
    """Kim et al. 2018 factor-transfer loss, RepDistiller's form: `mean |F_s - F_t|^p2`.

    The factor map is `F = attention_map(factor, p1)`, i.e. `normalize(mean_c x_c^p1)` per
    sample: RepDistiller `FactorTransfer.factor` is `F.normalize(f.pow(p1).mean(1).view(B, -1))`,
    the same function as its `Attention.at`. (Knowledge-Distillation-Zoo `kd_losses/ft.py` and the
    FT authors instead L2-normalise the whole flattened [B, H*W*C] factor; not this.) Spatial
    sizes are matched by pooling the larger factor, as in `at_loss`. p2 = 1 is `(.).abs().mean()`
    (= `F.l1_loss`), p2 = 2 is `(.).pow(2).mean()`. RepDistiller weighs it by `FT_BETA` = 200;
    the translator (student) and the pre-trained paraphraser (teacher) are the caller's.

    Args:
      student_factor: [B, Hs, Ws, Cs] translator output.
      teacher_factor: [B, Ht, Wt, Ct] paraphraser factor.
      p1: positive exponent of the factor map (static).
      p2: 1 (L1, default) or 2 (squared).

    Returns:
      float32 scalar: mean over B and the (common) H*W positions.
    """
    if p2 not in (1, 2):
        raise ValueError(f"p2 must be one of (1, 2), got {p2!r}")
    if student_factor.shape[0] != teacher_factor.shape[0]:
        raise ValueError(f"batch mismatch: {student_factor.shape} vs {teacher_factor.shape}")
    s, t = _match_spatial(student_factor.astype(jnp.float32), teacher_factor.astype(jnp.float32))
    diff = attention_map(s, p1) - attention_map(t, p1)
    if p2 == 2:
        return jnp.mean(diff * diff)
    # |x|'s gradient at 0: torch's 0, not JAX's 1, so entries that already match are left alone.
    return jnp.mean(jnp.where(diff == 0, 0.0, jnp.abs(diff)))


def ab_loss(student_pre: jax.Array, teacher_pre: jax.Array, margin: float = 1.0) -> jax.Array:
    """Heo et al. AAAI 2019 activation-boundary loss, alternative squared-hinge form (sum).

    `sum (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]` over every element: a
    student neuron is pushed to the teacher's side of the ReLU boundary with margin m, and is not
    penalised once beyond it. Matches RepDistiller `ABLoss.criterion_alternative_l2`
    (`torch.abs(loss).sum()`, batch included). The caller normalises as `ABLoss.forward` does:
    over G positions, `sum_i w_i * ab_loss_i / B * AB_GAMMA` with `w_i = 2^(i - G)`, i = 1..G
    (`distances.group_weights`), `AB_GAMMA` = 3/1000. RepDistiller uses this only in its 30-epoch
    initialisation stage (student body + connector), then trains with CE alone (its script's
    `-a 0`: no KL term).

    Args:
      student_pre: [B, H, W, C] pre-ReLU student map after the connector, in teacher shape.
      teacher_pre: [B, H, W, C] pre-ReLU teacher map.
      margin: m >= 0 (default 1, RepDistiller's).

    Returns:
      float32 scalar: summed over all B*H*W*C elements (not divided by B).
    """
    _check_same_shape(student_pre, teacher_pre)
    if isinstance(margin, (int, float)) and margin < 0:
        raise ValueError(f"margin must be non-negative, got {margin}")
    s = student_pre.astype(jnp.float32)
    t = teacher_pre.astype(jnp.float32)
    teacher_on = t > 0
    off_violation = (s > -margin) & ~teacher_on
    on_violation = (s <= margin) & teacher_on
    # The masked terms are already non-negative, so the reference's abs() is a no-op.
    loss = jnp.where(off_violation, jnp.square(s + margin), 0.0) + jnp.where(
        on_violation, jnp.square(s - margin), 0.0
    )
    return jnp.sum(loss)


def jacobian_loss(student_input_grad: jax.Array, teacher_input_grad: jax.Array) -> jax.Array:
    """Srinivas & Fleuret 2018 Jacobian matching: `mean (u(g_s) - u(g_t))^2`, u = L2 normalise.

    The input gradients of the target-class logit (`target_logit_input_grad`) are flattened per
    sample and normalised to unit L2 norm (norm clamped at 1e-12), then compared by the mean
    squared error over all B*H*W*C elements, i.e. the mean over the batch of the squared L2
    distance divided by H*W*C. Matches Knowledge-Distillation-Zoo `kd_losses/sobolev.py`
    (`Sobolev`: `F.mse_loss(normalize(grad_s), normalize(grad_t).detach())`).

    Args:
      student_input_grad: [B, H, W, C] d(student target logit)/d(images).
      teacher_input_grad: [B, H, W, C] d(teacher target logit)/d(images).

    Returns:
      float32 scalar: mean over all B*H*W*C elements.
    """
    _check_same_shape(student_input_grad, teacher_input_grad)
    batch = student_input_grad.shape[0]
    u_s = _l2_normalize(student_input_grad.astype(jnp.float32).reshape(batch, -1))
    u_t = _l2_normalize(teacher_input_grad.astype(jnp.float32).reshape(batch, -1))
    diff = u_s - u_t
    return jnp.mean(diff * diff)


def target_logit_input_grad(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    variables: Any,
    images: jax.Array,
    labels: jax.Array,
) -> jax.Array:
    """Input gradient of the true-class logit: `d(sum_b z_b[y_b]) / d images`, one `jax.grad`.

    The raw logit, not its log-softmax, as Knowledge-Distillation-Zoo `Sobolev` (`grad` of
    `gather(out, 1, target)` with `grad_outputs=ones`). In an inference-mode model samples do not
    interact, so row b of the result is sample b's own gradient; the Jacobian method passes the
    student in training mode, as that reference does, where BatchNorm's batch statistics couple
    the samples. The result is differentiable
    w.r.t. `variables` (the `create_graph=True` of the reference): `jax.grad` of a loss on it
    gives the second-order parameter gradient.

    Args:
      apply_fn: `apply_fn(variables, images) -> [B, K]` logits; bind train flags and discard
        mutable state (the new BN statistics of a training-mode model) before passing it.
      variables: the model's variables (a pytree).
      images: [B, H, W, C] float inputs.
      labels: [B] integer class labels in [0, K).

    Returns:
      [B, H, W, C] gradient, in the dtype of `images`.
    """

    def target_logit_sum(x: jax.Array) -> jax.Array:
        logits = apply_fn(variables, x)
        # At least float32 for the sum, without narrowing a float64 model (used by gradient checks).
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        return jnp.sum(jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=1))

    return jax.grad(target_logit_sum)(images)
