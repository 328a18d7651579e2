"""Tests of dfa_jax.losses against independent NumPy/SciPy re-derivations of each formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dfa_jax import losses

RTOL = 1e-5
SHAPE = (4, 8, 8, 6)  # B, H, W, C


def _maybe_jit(fn, jit, **jit_kwargs):
    return jax.jit(fn, **jit_kwargs) if jit else fn


def _normal(seed, shape=SHAPE, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# --- NumPy references (float64) ---------------------------------------------------------------


def _np_unit(x):
    flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    return flat / np.sqrt((flat**2).sum(axis=1, keepdims=True) + 1e-12)


def _np_st(s, a):
    return ((_np_unit(s) - _np_unit(a)) ** 2).sum(axis=1).mean()


def _np_ce(logits, labels):
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels].mean()


def _np_partial_l2(s, t, margin):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    target = np.maximum(t, np.asarray(margin, np.float64))
    mask = (s > target) | (target > 0)
    return (((s - target) ** 2) * mask).reshape(s.shape[0], -1).sum(axis=1).mean()


def _np_l2(s, t):
    d = np.asarray(s, np.float64) - np.asarray(t, np.float64)
    return (d**2).reshape(d.shape[0], -1).sum(axis=1).mean()


def _scipy_margin(gamma, beta):
    """E[x | x < 0] for x ~ N(beta, gamma^2) from scipy's truncated normal; -3|gamma| if no tail."""
    out = []
    for g, b in zip(gamma, beta):
        s = abs(float(g))
        if scipy.stats.norm.cdf(-b / s) > 1e-3:
            out.append(scipy.stats.truncnorm(a=-np.inf, b=-b / s, loc=b, scale=s).mean())
        else:
            out.append(-3 * s)
    return np.array(out)


# --- aggregate --------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_aggregate_matches_numpy(jit, stacked):
    maps = [_normal(i) for i in range(4)]
    alpha = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    features = jnp.stack(maps) if stacked else [jnp.asarray(m) for m in maps]
    out = _maybe_jit(losses.aggregate, jit)(features, jnp.asarray(alpha))
    expected = np.tensordot(alpha.astype(np.float64), np.stack(maps).astype(np.float64), axes=1)
    assert out.shape == SHAPE and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("form", ["reduction", "chain"])
def test_both_forms_of_the_aggregation_match_numpy(form):
    """The reduction (what a GPU or TPU lowers) and the chain (what the CPU lowers) are the same
    sum; the platform's form alone runs by default, so each is forced here."""
    maps = [jnp.asarray(_normal(i)) for i in range(4)]
    alpha = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    out = jax.jit(lambda m, a: losses.aggregate(m, a, form=form))(maps, jnp.asarray(alpha))
    expected = np.tensordot(alpha.astype(np.float64), np.stack(maps).astype(np.float64), axes=1)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-6)
    # On the CPU, `aggregate` lowers the chain: no reduction in its program.
    if form == "chain":
        assert "reduce" not in jax.jit(losses.aggregate).lower(maps, jnp.asarray(alpha)).as_text()


def test_aggregate_one_hot_and_uniform():
    maps = [jnp.asarray(_normal(i)) for i in range(3)]
    for j in range(3):
        one_hot = jnp.zeros(3).at[j].set(1.0)
        chex.assert_trees_all_close(losses.aggregate(maps, one_hot), maps[j])
    # alpha = e_N: plain last-map distillation, the special case of §3.1.
    chex.assert_trees_all_close(losses.aggregate(maps, jnp.array([0.0, 0.0, 1.0])), maps[-1])
    uniform = losses.aggregate(maps, jnp.full((3,), 1 / 3))
    chex.assert_trees_all_close(uniform, jnp.mean(jnp.stack(maps), axis=0), rtol=RTOL, atol=1e-6)


def test_aggregate_bf16_in_float32_out():
    maps = [jnp.asarray(_normal(i), jnp.bfloat16) for i in range(2)]
    out = losses.aggregate(maps, jnp.array([0.5, 0.5]))
    assert out.dtype == jnp.float32


def test_aggregate_rejects_wrong_alpha():
    with pytest.raises(ValueError, match="one per map"):
        losses.aggregate([jnp.zeros(SHAPE)] * 3, jnp.ones(2) / 2)
    with pytest.raises(ValueError, match="form 'dot' is unknown"):
        losses.aggregate([jnp.zeros(SHAPE)] * 2, jnp.ones(2) / 2, form="dot")


# --- st / ts / bridge -------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_st_loss_matches_numpy(jit):
    s, a = _normal(0, scale=3.0), _normal(1)
    out = _maybe_jit(losses.st_loss, jit)(jnp.asarray(s), jnp.asarray(a))
    assert out.shape == () and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _np_st(s, a), rtol=RTOL)


def test_st_loss_scale_invariant_and_bounded():
    x = jnp.asarray(_normal(0))
    np.testing.assert_allclose(losses.st_loss(2.0 * x, x), 0.0, atol=1e-6)
    # Per-sample scales differ: still 0, since u normalises each sample on its own.
    scales = jnp.array([0.1, 1.0, 5.0, 100.0])[:, None, None, None]
    np.testing.assert_allclose(losses.st_loss(scales * x, x), 0.0, atol=1e-6)
    # Opposite maps reach the bound 4; random ones stay below.
    np.testing.assert_allclose(losses.st_loss(-x, x), 4.0, rtol=RTOL)
    assert losses.st_loss(jnp.asarray(_normal(1)), x) <= 4.0


def test_st_loss_zero_student_has_finite_gradient():
    a = jnp.asarray(_normal(1))
    value, grads = jax.value_and_grad(losses.st_loss, argnums=(0, 1))(jnp.zeros(SHAPE), a)
    np.testing.assert_allclose(value, 1.0, rtol=RTOL)  # ||0 - u(a)||^2 = 1
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("jit", [False, True])
def test_ts_loss_matches_numpy(jit):
    logits = _normal(2, shape=(8, 10), scale=4.0)
    labels = np.random.default_rng(3).integers(0, 10, size=8)
    out = _maybe_jit(losses.ts_loss, jit)(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(out, _np_ce(logits, labels), rtol=RTOL)


@pytest.mark.parametrize("jit", [False, True])
def test_bridge_loss_is_weighted_sum(jit):
    s, a = _normal(0), _normal(1)
    logits = _normal(2, shape=(4, 10))
    labels = np.array([0, 3, 9, 5])
    args = (jnp.asarray(s), jnp.asarray(a), jnp.asarray(logits), jnp.asarray(labels))
    fn = _maybe_jit(losses.bridge_loss, jit)
    np.testing.assert_allclose(
        fn(*args), 1e-3 * _np_st(s, a) + 1.0 * _np_ce(logits, labels), rtol=RTOL
    )
    np.testing.assert_allclose(
        fn(*args, gamma_st=0.5, gamma_ts=2.0),
        0.5 * _np_st(s, a) + 2.0 * _np_ce(logits, labels),
        rtol=RTOL,
    )
    assert (losses.GAMMA_ST, losses.GAMMA_TS, losses.GAMMA_FD) == (1e-3, 1.0, 1e-3)


# --- margins ----------------------------------------------------------------------------------

# (gamma, beta): wide tails (incl. negative gamma), a thin tail, the -3|gamma| branch (beta >>
# gamma) and both sides of its threshold Phi(-beta/|gamma|) = 1e-3 (beta/|gamma| = 3.05 and 3.1).
GAMMA = np.array([1.0, -2.0, 0.5, 0.3, 1.0, -0.2, 2.0, 2.0], np.float32)
BETA = np.array([0.0, 1.0, -0.7, 0.8, 5.0, 1.0, 6.1, 6.2], np.float32)
NO_TAIL = [4, 5, 7]


@pytest.mark.parametrize("jit", [False, True])
def test_bn_margin_matches_scipy_truncnorm(jit):
    out = _maybe_jit(losses.bn_margin, jit)(jnp.asarray(GAMMA), jnp.asarray(BETA))
    assert out.shape == GAMMA.shape and out.dtype == jnp.float32
    out = np.asarray(out)
    # 3e-5: at beta/|gamma| = 3.05 the tail's mean divides by a CDF of ~1e-3, where float32's
    # erfc / log reach ~9e-6 relative.
    np.testing.assert_allclose(out, _scipy_margin(GAMMA, BETA), rtol=3e-5, atol=1e-6)
    np.testing.assert_allclose(out[NO_TAIL], -3 * np.abs(GAMMA[NO_TAIL]), rtol=RTOL)
    assert out[6] > -1.0  # just above the threshold: still the truncated mean
    assert np.all(out <= 0)


def test_bn_margin_sign_of_gamma_is_irrelevant():
    chex.assert_trees_all_close(
        losses.bn_margin(jnp.asarray(GAMMA), jnp.asarray(BETA)),
        losses.bn_margin(jnp.asarray(-GAMMA), jnp.asarray(BETA)),
    )


def test_bn_margin_zero_gamma_is_finite():
    out = losses.bn_margin(jnp.zeros(3), jnp.array([-0.5, 0.0, 0.5]))
    np.testing.assert_allclose(out, [-0.5, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_empirical_margin_matches_numpy(jit):
    x = _normal(4)
    x[..., 0] = np.abs(x[..., 0])  # a channel without negative values -> 0
    out = _maybe_jit(losses.empirical_margin, jit)(jnp.asarray(x))
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    expected = [col[col < 0].mean() if (col < 0).any() else 0.0 for col in flat.T]
    np.testing.assert_allclose(out, expected, rtol=RTOL)
    assert out[0] == 0.0


def test_empirical_margin_converges_to_bn_margin():
    gamma = GAMMA[:3]  # channels whose negative tail holds enough samples (>= 30%)
    beta = BETA[:3]
    z = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype(np.float32)
    samples = beta + np.abs(gamma) * z  # N(beta, gamma^2) per channel
    estimated = losses.empirical_margin(jnp.asarray(samples))
    np.testing.assert_allclose(
        estimated, losses.bn_margin(jnp.asarray(gamma), jnp.asarray(beta)), rtol=0.02
    )


# --- distances --------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("margin", [-1.0, 0.0, "per_channel"])
def test_partial_l2_matches_numpy(jit, margin):
    s, t = _normal(5, scale=2.0), _normal(6, scale=2.0)
    if margin == "per_channel":
        margin = np.linspace(-2.0, -0.1, SHAPE[-1]).astype(np.float32)
    out = _maybe_jit(losses.partial_l2, jit)(jnp.asarray(s), jnp.asarray(t), jnp.asarray(margin))
    assert out.shape == () and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _np_partial_l2(s, t, margin), rtol=RTOL)


def test_partial_l2_does_not_push_below_nonpositive_target():
    t = jnp.asarray(_normal(7, scale=3.0))
    target = jnp.maximum(t, -1.0)
    # Student at or below a target <= 0 costs nothing; t below the margin is clamped to -1.
    below = jnp.where(target <= 0, target - jnp.abs(jnp.asarray(_normal(8))), target)
    np.testing.assert_allclose(losses.partial_l2(below, t, -1.0), 0.0, atol=1e-6)
    assert losses.partial_l2(jnp.full(SHAPE, -5.0), jnp.full(SHAPE, -3.0), -1.0) == 0.0
    # Above a negative target the error counts: (-0.5 - (-1))^2 per element.
    n = np.prod(SHAPE[1:])
    np.testing.assert_allclose(
        losses.partial_l2(jnp.full(SHAPE, -0.5), jnp.full(SHAPE, -3.0), -1.0), 0.25 * n, rtol=RTOL
    )


def test_partial_l2_equals_l2_when_positive():
    rng = np.random.default_rng(9)
    s = jnp.asarray(rng.uniform(0.1, 2.0, SHAPE).astype(np.float32))
    t = jnp.asarray(rng.uniform(0.1, 2.0, SHAPE).astype(np.float32))
    np.testing.assert_allclose(losses.partial_l2(s, t, -1.0), losses.l2(s, t), rtol=RTOL)


def test_partial_l2_per_channel_margin_broadcasts():
    s, t = jnp.asarray(_normal(10)), jnp.asarray(_normal(11, scale=3.0))
    constant = jnp.full((SHAPE[-1],), -1.0)
    np.testing.assert_allclose(
        losses.partial_l2(s, t, constant), losses.partial_l2(s, t, -1.0), rtol=RTOL
    )
    # Channel c only sees margin[c]: changing one channel's margin changes only its term.
    margin = constant.at[2].set(-0.2)
    by_channel = [
        losses.partial_l2(s[..., c : c + 1], t[..., c : c + 1], margin[c]) for c in range(SHAPE[-1])
    ]
    np.testing.assert_allclose(losses.partial_l2(s, t, margin), sum(by_channel), rtol=RTOL)


@pytest.mark.parametrize("jit", [False, True])
def test_l2_matches_numpy(jit):
    s, t = _normal(12), _normal(13)
    out = _maybe_jit(losses.l2, jit)(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(out, _np_l2(s, t), rtol=RTOL)


def test_distances_bf16_inputs_compute_in_float32():
    s, t = _normal(14), _normal(15)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    out = losses.partial_l2(s16, t16, -1.0)
    assert out.dtype == jnp.float32
    s_up, t_up = np.asarray(s16.astype(jnp.float32)), np.asarray(t16.astype(jnp.float32))
    np.testing.assert_allclose(out, _np_partial_l2(s_up, t_up, -1.0), rtol=RTOL)


# --- stage-2 loss -----------------------------------------------------------------------------

GROUP_SHAPES = [(4, 8, 8, 4), (4, 4, 4, 8), (4, 2, 2, 16)]


def _groups(seed):
    return [
        jnp.asarray(_normal(seed + i, shape, scale=2.0)) for i, shape in enumerate(GROUP_SHAPES)
    ]


def test_group_weights():
    np.testing.assert_allclose(losses.group_weights(3), [0.25, 0.5, 1.0])
    np.testing.assert_allclose(losses.group_weights(1), [1.0])
    np.testing.assert_allclose(losses.group_weights(5), [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1])
    with pytest.raises(ValueError):
        losses.group_weights(0)


@pytest.mark.parametrize("jit", [False, True])
def test_feature_distillation_loss_is_weighted_sum(jit):
    s, t = _groups(20), _groups(30)
    fn = _maybe_jit(losses.feature_distillation_loss, jit, static_argnames="distance")
    w = [0.25, 0.5, 1.0]

    expected = sum(wi * _np_partial_l2(a, b, -1.0) for wi, a, b in zip(w, s, t))
    np.testing.assert_allclose(fn(s, t), expected, rtol=RTOL)

    expected = sum(wi * _np_l2(a, b) for wi, a, b in zip(w, s, t))
    np.testing.assert_allclose(fn(s, t, distance="l2"), expected, rtol=RTOL)

    margins = [jnp.full((shape[-1],), -0.5 * (i + 1)) for i, shape in enumerate(GROUP_SHAPES)]
    expected = sum(wi * _np_partial_l2(a, b, m) for wi, a, b, m in zip(w, s, t, margins))
    np.testing.assert_allclose(fn(s, t, margin=margins), expected, rtol=RTOL)

    custom = [1.0, 2.0, 3.0]
    expected = sum(wi * _np_partial_l2(a, b, 0.0) for wi, a, b in zip(custom, s, t))
    np.testing.assert_allclose(fn(s, t, margin=0.0, weights=custom), expected, rtol=RTOL)


def test_feature_distillation_loss_rejects_bad_arguments():
    s, t = _groups(20), _groups(30)
    with pytest.raises(ValueError, match="partial_l2, l2"):
        losses.feature_distillation_loss(s, t, distance="cosine")
    with pytest.raises(ValueError, match="target"):
        losses.feature_distillation_loss(s, t[:2])
    with pytest.raises(ValueError, match="margins"):
        losses.feature_distillation_loss(s, t, margin=[-1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        losses.feature_distillation_loss(s, t, weights=[1.0, 1.0])


# --- gradients --------------------------------------------------------------------------------


def test_all_losses_have_finite_gradients():
    s, a = jnp.asarray(_normal(40)), jnp.asarray(_normal(41))
    logits, labels = jnp.asarray(_normal(42, shape=(4, 10))), jnp.array([1, 2, 3, 4])
    maps = [jnp.asarray(_normal(43 + i)) for i in range(3)]
    grads = {
        "aggregate": jax.grad(lambda al: jnp.sum(losses.aggregate(maps, al)))(jnp.ones(3) / 3),
        "st": jax.grad(losses.st_loss, argnums=(0, 1))(s, a),
        "ts": jax.grad(losses.ts_loss)(logits, labels),
        "bridge": jax.grad(losses.bridge_loss, argnums=(0, 1, 2))(s, a, logits, labels),
        "partial_l2": jax.grad(losses.partial_l2, argnums=(0, 1))(s, a, -1.0),
        "l2": jax.grad(losses.l2, argnums=(0, 1))(s, a),
        "bn_margin": jax.grad(lambda g, b: jnp.sum(losses.bn_margin(g, b)), argnums=(0, 1))(
            jnp.asarray(GAMMA), jnp.asarray(BETA)
        ),
        "fd": jax.grad(losses.feature_distillation_loss)(_groups(50), _groups(60)),
    }
    chex.assert_tree_all_finite(grads)
    # The searched beta gets a gradient through the aggregation and the ST loss.
    beta_grad = jax.grad(lambda b: losses.st_loss(s, losses.aggregate(maps, jax.nn.softmax(b))))(
        jnp.zeros(3)
    )
    chex.assert_tree_all_finite(beta_grad)
    assert np.any(np.asarray(beta_grad) != 0)
