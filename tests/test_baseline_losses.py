"""Tests of dfa_jax.losses.baselines against NumPy (float64) re-derivations of the reference code.

Each `_np_*` function restates the PyTorch reference named in the loss's docstring (RepDistiller
`distiller_zoo`, Knowledge-Distillation-Zoo `kd_losses/sobolev.py`) in NumPy, independently of
the JAX code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import losses

RTOL = 1e-5
ATOL = 1e-7
SHAPE = (4, 8, 8, 6)  # B, H, W, C


def _maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def _normal(seed, shape=SHAPE, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# --- NumPy references (float64) ---------------------------------------------------------------


def _np_normalize(x):
    """torch F.normalize(x, dim=1): x / max(||x||, 1e-12)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_kd(s, t, temp):
    """RepDistiller DistillKL: kl_div(log p_s, p_t, size_average=False) * T^2 / B."""
    log_p_s = _np_log_softmax(np.asarray(s, np.float64) / temp)
    log_p_t = _np_log_softmax(np.asarray(t, np.float64) / temp)
    return (np.exp(log_p_t) * (log_p_t - log_p_s)).sum() * temp**2 / s.shape[0]


def _np_adaptive_pool(x, out_h, out_w):
    """torch adaptive_avg_pool2d, NHWC: cell (i, j) averages rows [floor(iH/h), ceil((i+1)H/h))."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    out = np.zeros((b, out_h, out_w, c))
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, int(np.ceil((i + 1) * h / out_h))
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, int(np.ceil((j + 1) * w / out_w))
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def _np_pool_larger(s, t):
    """RepDistiller at_loss / factor_loss: pool the taller map to the other's size."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    if s.shape[1] > t.shape[1]:
        s = _np_adaptive_pool(s, t.shape[1], t.shape[2])
    elif s.shape[1] < t.shape[1]:
        t = _np_adaptive_pool(t, s.shape[1], s.shape[2])
    return s, t


def _np_at_map(f, p):
    """RepDistiller Attention.at: F.normalize(f.pow(p).mean(1).view(B, -1)), NHWC."""
    f = np.asarray(f, np.float64)
    return _np_normalize((f**p).mean(axis=-1).reshape(f.shape[0], -1))


def _np_at(s, t, p=2):
    s, t = _np_pool_larger(s, t)
    return ((_np_at_map(s, p) - _np_at_map(t, p)) ** 2).mean()


def _np_ft(s, t, p1=2, p2=1):
    """RepDistiller FactorTransfer.factor_loss."""
    s, t = _np_pool_larger(s, t)
    diff = _np_at_map(s, p1) - _np_at_map(t, p1)
    return np.abs(diff).mean() if p2 == 1 else (diff**p2).mean()


def _np_sp(s, t):
    """RepDistiller Similarity: G = normalize(f f^T), sum((G_t - G_s)^2) / B^2."""
    b = s.shape[0]
    fs = np.asarray(s, np.float64).reshape(b, -1)
    ft = np.asarray(t, np.float64).reshape(b, -1)
    g_s, g_t = _np_normalize(fs @ fs.T), _np_normalize(ft @ ft.T)
    return ((g_t - g_s) ** 2).sum() / (b * b)


def _np_ab(s, t, m=1.0):
    """RepDistiller ABLoss.criterion_alternative_l2: abs(...).sum()."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    loss = (s + m) ** 2 * ((s > -m) & (t <= 0)) + (s - m) ** 2 * ((s <= m) & (t > 0))
    return np.abs(loss).sum()


def _np_jacobian(gs, gt):
    """Knowledge-Distillation-Zoo Sobolev: mse_loss(normalize(g_s), normalize(g_t))."""
    b = gs.shape[0]
    return ((_np_normalize(gs.reshape(b, -1)) - _np_normalize(gt.reshape(b, -1))) ** 2).mean()


# --- values against the references ---------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 16.0])
def test_kd_matches_reference(jit, temperature):
    s, t = _normal(0, (5, 10), 3.0), _normal(1, (5, 10), 3.0)
    out = _maybe_jit(lambda a, b: losses.kd_loss(a, b, temperature), jit)(s, t)
    assert out.dtype == jnp.float32 and out.shape == ()
    _close(out, _np_kd(s, t, temperature))


def test_kd_traced_temperature():
    s, t = _normal(0, (5, 10), 3.0), _normal(1, (5, 10), 3.0)
    _close(jax.jit(losses.kd_loss)(s, t, 4.0), _np_kd(s, t, 4.0))


def test_kd_zero_when_equal_and_grows_with_disagreement():
    t = _normal(2, (8, 10), 3.0)
    noise = _normal(3, (8, 10))
    assert float(losses.kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    # A per-sample constant shift of the logits leaves the softmax, hence the loss, unchanged.
    shift = _normal(4, (8, 1), 5.0)
    assert float(losses.kd_loss(t + shift, t, 4.0)) == pytest.approx(0.0, abs=1e-5)
    values = [float(losses.kd_loss(t + eps * noise, t, 4.0)) for eps in (0.5, 1.0, 2.0, 4.0)]
    assert np.all(np.diff(values) > 0), values
    # With the T^2 factor the loss tends to the logit MSE / 2 (T -> inf), not to 0.
    # Not higher than 128: the T^2 / B factor magnifies float32 rounding (at T = 512 one ulp of
    # one example's logsumexp is ~1.4 % of the loss, which depends on the CPU's exp and sums).
    soft = [float(losses.kd_loss(t + noise, t, temp)) for temp in (8.0, 32.0, 128.0)]
    centred = noise - noise.mean(axis=1, keepdims=True)
    limit = (centred.astype(np.float64) ** 2).sum() / (2 * 10 * 8)
    assert abs(soft[-1] - limit) < abs(soft[0] - limit)
    assert soft[-1] == pytest.approx(limit, rel=1e-2)


@pytest.mark.parametrize("jit", [False, True])
def test_fitnets_matches_reference(jit):
    s, t = _normal(5), _normal(6)
    out = _maybe_jit(losses.fitnets_loss, jit)(s, t)
    _close(out, ((s.astype(np.float64) - t) ** 2).mean())


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("p", [1, 2, 3, 2.0])
def test_at_matches_reference(jit, p):
    s, t = _normal(7, (4, 8, 8, 6)), _normal(8, (4, 8, 8, 10))  # channel counts may differ
    out = _maybe_jit(lambda a, b: losses.at_loss(a, b, p), jit)(s, t)
    _close(out, _np_at(s, t, p))
    amap = losses.attention_map(s, p)
    assert amap.shape == (4, 64)
    _close(amap, _np_at_map(s, p))
    _close(jnp.linalg.norm(amap, axis=1), np.ones(4))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "s_hw,t_hw", [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((6, 6), (4, 4)), ((7, 5), (3, 2))]
)
def test_at_pools_the_larger_map(jit, s_hw, t_hw):
    s, t = _normal(9, (3, *s_hw, 5)), _normal(10, (3, *t_hw, 7))
    out = _maybe_jit(losses.at_loss, jit)(s, t)
    _close(out, _np_at(s, t))
    # The pooled map is the NumPy adaptive average pool of the features (not of the attention).
    if s_hw[0] > t_hw[0]:
        s = _np_adaptive_pool(s, *t_hw).astype(np.float32)
    else:
        t = _np_adaptive_pool(t, *s_hw).astype(np.float32)
    _close(out, losses.at_loss(s, t))


def test_adaptive_pool_divisible_is_block_mean():
    x = _normal(11, (2, 8, 8, 3))
    block = x.astype(np.float64).reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(_np_adaptive_pool(x, 4, 4), block, rtol=1e-12)


@pytest.mark.parametrize("jit", [False, True])
def test_sp_matches_reference(jit):
    s, t = _normal(12, (6, 4, 4, 8)), _normal(13, (6, 8, 8, 3))
    out = _maybe_jit(losses.sp_loss, jit)(s, t)
    _close(out, _np_sp(s, t))
    assert float(losses.sp_loss(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_sp_scale_behaviour():
    s, t = _normal(14, (6, 4, 4, 8)), _normal(15, (6, 4, 4, 8))
    base = float(losses.sp_loss(s, t))
    # Row normalisation of G removes any global scale of either network's features ...
    _close(losses.sp_loss(s * 7.5, t * 0.01), base)
    # ... and each sample's own scale from its row; G_bj keeps the other sample's scale c_j, so a
    # per-sample rescaling changes the loss exactly as the reference predicts.
    c = np.abs(_normal(16, (6, 1, 1, 1))) + 0.5
    _close(losses.sp_loss(s * c, t), _np_sp(s * c, t))
    _close(losses.sp_loss(s, t * c), _np_sp(s, t * c))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("p1,p2", [(2, 1), (2, 2), (1, 1)])
def test_ft_matches_reference(jit, p1, p2):
    s, t = _normal(17, (4, 8, 8, 6)), _normal(18, (4, 4, 4, 9))
    out = _maybe_jit(lambda a, b: losses.ft_loss(a, b, p1, p2), jit)(s, t)
    _close(out, _np_ft(s, t, p1, p2))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("margin", [1.0, 0.5, 0.0])
def test_ab_matches_reference(jit, margin):
    s, t = _normal(19, scale=2.0), _normal(20, scale=2.0)
    out = _maybe_jit(lambda a, b: losses.ab_loss(a, b, margin), jit)(s, t)
    _close(out, _np_ab(s, t, margin))
    assert float(out) > 0


def test_ab_zero_when_signs_agree_beyond_margin():
    margin = 1.0
    t = _normal(21)
    magnitude = margin + np.abs(_normal(22))  # strictly beyond the margin
    s = np.where(t > 0, magnitude, -magnitude).astype(np.float32)
    assert float(losses.ab_loss(s, t, margin)) == 0.0
    # Right side of the boundary but inside the margin is still penalised (hinge with margin).
    inside = np.where(t > 0, 0.5, -0.5).astype(np.float32)
    _close(losses.ab_loss(inside, t, margin), 0.25 * t.size)


@pytest.mark.parametrize("jit", [False, True])
def test_jacobian_loss_matches_reference(jit):
    gs, gt = _normal(23, (4, 6, 6, 3)), _normal(24, (4, 6, 6, 3), 1e-3)
    out = _maybe_jit(losses.jacobian_loss, jit)(gs, gt)
    _close(out, _np_jacobian(gs, gt))
    # Per-sample normalisation: rescaling either gradient per sample changes nothing.
    c = np.abs(_normal(25, (4, 1, 1, 1))) + 0.1
    _close(losses.jacobian_loss(gs * c, gt / c), _np_jacobian(gs, gt))


def test_bf16_inputs_give_float32():
    s, t = jnp.asarray(_normal(26), jnp.bfloat16), jnp.asarray(_normal(27), jnp.bfloat16)
    for fn in (losses.fitnets_loss, losses.at_loss, losses.sp_loss, losses.ft_loss):
        assert fn(s, t).dtype == jnp.float32
    assert losses.ab_loss(s, t).dtype == jnp.float32
    assert losses.jacobian_loss(s, t).dtype == jnp.float32
    assert losses.kd_loss(s[:, 0, 0], t[:, 0, 0], 4.0).dtype == jnp.float32


# --- gradients -----------------------------------------------------------------------------------


_FEATURE_LOSSES = {
    "fitnets": losses.fitnets_loss,
    "at": losses.at_loss,
    "sp": losses.sp_loss,
    "ft": losses.ft_loss,
    "ab": losses.ab_loss,
    "jacobian": losses.jacobian_loss,
}


@pytest.mark.parametrize("name", sorted(_FEATURE_LOSSES))
def test_feature_loss_gradients_finite(name):
    fn = _FEATURE_LOSSES[name]
    s, t = _normal(28), _normal(29)
    grad = jax.jit(jax.grad(fn))(s, t)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    # An all-zero map must not give NaN through the clamped normalisation.
    zero_grad = jax.grad(fn)(np.zeros(SHAPE, np.float32), t)
    assert np.all(np.isfinite(zero_grad))


def test_ft_l1_leaves_factors_that_already_match_alone():
    """|x|'s gradient at 0 is torch's 0: a student factor equal to the teacher's is not pushed
    (JAX's own is 1, which pushed every matching entry)."""
    t = _normal(32)
    s = np.where(np.arange(SHAPE[-1]) % 2 == 0, t, _normal(33))  # Half the channels match.
    grad = np.asarray(jax.grad(lambda z: losses.ft_loss(z, t))(s))
    np.testing.assert_array_equal(jax.grad(lambda z: losses.ft_loss(z, t))(t), 0.0)
    assert np.any(grad != 0)


def test_kd_gradient_finite():
    s, t = _normal(30, (5, 10), 50.0), _normal(31, (5, 10), 50.0)  # p_t underflows to 0 in places
    grad = jax.grad(losses.kd_loss)(s, t, 1.0)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


# --- input gradient helper --------------------------------------------------------------------


class _TinyNet(nn.Module):
    """Conv -> tanh -> global mean -> Dense: smooth, so second derivatives are non-zero."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), dtype=self.dtype, param_dtype=self.dtype)(x)
        x = jnp.tanh(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(5, dtype=self.dtype, param_dtype=self.dtype)(x)


def _tiny_setup(dtype, seed=0):
    model = _TinyNet(dtype=dtype)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), dtype)
    labels = jnp.asarray([1, 3], jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), images)
    return model, params, images, labels


def test_target_logit_input_grad_matches_finite_differences():
    with jax.enable_x64(True):
        model, params, images, labels = _tiny_setup(jnp.float64)
        grad = losses.target_logit_input_grad(model.apply, params, images, labels)
        assert grad.shape == images.shape and grad.dtype == jnp.float64

        def objective(x):
            logits = model.apply(params, x)
            return jnp.sum(logits[jnp.arange(2), labels])

        h = 1e-5
        eye = jnp.eye(images.size, dtype=jnp.float64).reshape(-1, *images.shape)
        plus = jax.vmap(lambda e: objective(images + h * e))(eye)
        minus = jax.vmap(lambda e: objective(images - h * e))(eye)
        fd = ((plus - minus) / (2 * h)).reshape(images.shape)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(fd), rtol=1e-6, atol=1e-9)
        # Samples do not interact: row b is the gradient of sample b's own target logit.
        one = losses.target_logit_input_grad(model.apply, params, images[:1], labels[:1])
        np.testing.assert_allclose(np.asarray(one), np.asarray(grad[:1]), rtol=1e-12)


def test_jacobian_loss_differentiable_wrt_params():
    model, params, images, labels = _tiny_setup(jnp.float32)
    teacher_params = model.init(jax.random.PRNGKey(1), images)
    t_grad = losses.target_logit_input_grad(model.apply, teacher_params, images, labels)

    def loss(p):
        s_grad = losses.target_logit_input_grad(model.apply, p, images, labels)
        return losses.jacobian_loss(s_grad, t_grad)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    _close(
        value,
        _np_jacobian(
            np.asarray(losses.target_logit_input_grad(model.apply, params, images, labels)),
            np.asarray(t_grad),
        ),
    )
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(np.asarray(g) != 0) for g in leaves)


def test_jacobian_second_order_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        model, params, images, labels = _tiny_setup(jnp.float64)
        teacher_params = model.init(jax.random.PRNGKey(1), images)
        t_grad = losses.target_logit_input_grad(model.apply, teacher_params, images, labels)

        def loss(p):
            s_grad = losses.target_logit_input_grad(model.apply, p, images, labels)
            # jacobian_loss computes in float32; re-derive it in float64 for a tight check.
            b = images.shape[0]
            u_s = s_grad.reshape(b, -1) / jnp.linalg.norm(s_grad.reshape(b, -1), axis=1)[:, None]
            u_t = t_grad.reshape(b, -1) / jnp.linalg.norm(t_grad.reshape(b, -1), axis=1)[:, None]
            return jnp.mean((u_s - u_t) ** 2)

        grads = jax.grad(loss)(params)
        direction = jax.tree_util.tree_map(
            lambda x: jnp.asarray(np.random.default_rng(3).normal(size=x.shape)), params
        )
        h = 1e-6
        shifted = [
            loss(jax.tree_util.tree_map(lambda p, d, k=k: p + k * h * d, params, direction))
            for k in (1, -1)
        ]
        fd = (shifted[0] - shifted[1]) / (2 * h)
        analytic = sum(
            jnp.vdot(g, d)
            for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction))
        )
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-5)


# --- validation --------------------------------------------------------------------------------


def test_invalid_options_raise():
    s, t = _normal(32), _normal(33)
    with pytest.raises(ValueError, match=r"\(1, 2\)"):
        losses.ft_loss(s, t, p2=3)
    with pytest.raises(ValueError, match="positive"):
        losses.at_loss(s, t, p=0)
    with pytest.raises(ValueError, match="positive"):
        losses.attention_map(s, p=-1)
    with pytest.raises(ValueError, match="positive"):
        losses.kd_loss(s[:, 0, 0], t[:, 0, 0], 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        losses.ab_loss(s, t, margin=-1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        losses.fitnets_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="shape mismatch"):
        losses.ab_loss(s, t[..., :3])
    with pytest.raises(ValueError, match="shape mismatch"):
        losses.jacobian_loss(s, t[:2])
    with pytest.raises(ValueError, match="batch mismatch"):
        losses.sp_loss(s, t[:2])
    with pytest.raises(ValueError, match="cannot pool"):
        losses.at_loss(_normal(34, (2, 8, 4, 3)), _normal(35, (2, 4, 8, 3)))


def test_constants_are_the_reference_weights():
    assert losses.AT_BETA == 1000.0
    assert losses.SP_GAMMA == 3000.0
    assert losses.FT_BETA == 200.0
    assert losses.FITNETS_BETA == 100.0
    assert losses.AB_GAMMA == pytest.approx(3 / 1000)


def test_the_runs_default_weights_are_the_losses_constants():
    """A run reads its weights from the config: its defaults are the constants the losses
    publish (and the tests above pin), not literals that could drift from them."""
    from dfa_jax import config_lib

    config = config_lib.base_config()
    base = config.baselines
    assert (base.at_weight, base.sp_weight, base.ft_weight, base.fitnets_weight) == (
        losses.AT_BETA,
        losses.SP_GAMMA,
        losses.FT_BETA,
        losses.FITNETS_BETA,
    )
    assert config.distill.gamma_fd == losses.GAMMA_FD
    assert (config.search.gamma_st, config.search.gamma_ts) == (losses.GAMMA_ST, losses.GAMMA_TS)
