"""Model registry, parameter counts (paper Tables 1 and 4), sown features, stop/resume forwards."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import models
from dfa_jax.models import shufflenet_v2

IMAGES = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
TINY_MODELS = ("wrn_10_1", "shufflenet_v2_0.5")


def _abstract_params(model):
    return jax.eval_shape(model.init, jax.random.key(0), IMAGES[:1])["params"]


@pytest.fixture(scope="module", params=TINY_MODELS)
def trained(request):
    """(model, variables) after one train-mode forward, so running BN statistics are not 0/1."""
    model = models.get_model(request.param, 10)
    variables = model.init(jax.random.key(1), IMAGES)
    _, updates = model.apply(variables, IMAGES * 2.0 + 0.5, train=True, mutable=["batch_stats"])
    return model, {**variables, **updates}


@pytest.mark.parametrize(
    "name, num_classes, millions",
    [
        ("wrn_28_4", 100, 5.87),
        ("wrn_16_4", 100, 2.77),
        ("wrn_28_2", 100, 1.47),
        ("wrn_16_2", 100, 0.70),
        ("shufflenet_v2_2.0", 10, 5.367),
        ("shufflenet_v2_1.0", 10, 1.269),
        ("shufflenet_v2_0.5", 10, 0.356),
    ],
)
def test_param_count_matches_paper(name, num_classes, millions):
    params = _abstract_params(models.get_model(name, num_classes))
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert count == pytest.approx(millions * 1e6, rel=0.01)


def test_model_names():
    for name in models.MODEL_NAMES + ("wrn_10_1", "wrn_40_2"):
        assert models.is_valid_model_name(name), name
    for name in ("nope", "wrn_11_2", "wrn_4_1", "wrn_16_0", "shufflenet_v2_1.5", "wrn_16_2x"):
        assert not models.is_valid_model_name(name), name
    with pytest.raises(ValueError, match=r"wrn_28_4.*shufflenet_v2_0\.5.*wrn_\{depth\}_\{width\}"):
        models.get_model("nope", 10)
    with pytest.raises(ValueError):
        models.get_model("wrn_11_2", 10)


def test_channel_shuffle_matches_pytorch_order():
    x = np.arange(2 * 6).reshape(1, 1, 2, 6)  # NHWC, 6 channels
    # PyTorch (NCHW): x.view(N, g, C // g, H, W).transpose(1, 2).reshape(N, C, H, W).
    expected = x.reshape(1, 1, 2, 2, 3).transpose(0, 1, 2, 4, 3).reshape(1, 1, 2, 6)
    np.testing.assert_array_equal(shufflenet_v2.channel_shuffle(x, 2), expected)
    np.testing.assert_array_equal(expected[0, 0, 0], [0, 3, 1, 4, 2, 5])


@pytest.mark.parametrize("groups", [2, 3])
def test_concat_shuffle_is_channel_shuffle_of_the_concatenation(groups):
    keys = jax.random.split(jax.random.key(1), groups)
    parts = [jax.random.normal(k, (2, 3, 4, 5)) for k in keys]
    expected = shufflenet_v2.channel_shuffle(jnp.concatenate(parts, axis=-1), groups)
    np.testing.assert_array_equal(shufflenet_v2.concat_shuffle(parts), expected)


def test_bad_group_range_raises():
    model = models.get_model("wrn_10_1", 10)
    variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES)
    for start, stop in ((0, 0), (0, 4), (2, 2), (3, 1), (4, None), (-1, None)):
        with pytest.raises(ValueError):
            jax.eval_shape(
                lambda v: model.apply(v, IMAGES, start_group=start, stop_group=stop), variables
            )


@pytest.mark.parametrize(
    "name, stem, shapes",
    [
        ("wrn_10_1", [(2, 32, 32, 16)] * 2, [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64)]),
        ("wrn_16_2", [(2, 32, 32, 16)] * 2, [(2, 32, 32, 32), (2, 16, 16, 64), (2, 8, 8, 128)]),
        (
            "shufflenet_v2_0.5",
            [],
            [(2, 32, 32, 24), (2, 16, 16, 48), (2, 8, 8, 96), (2, 4, 4, 192), (2, 4, 4, 1024)],
        ),
    ],
    ids=lambda p: p if isinstance(p, str) else "",
)
def test_sown_feature_names_and_shapes(name, stem, shapes):
    model = models.get_model(name, 10)
    variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES)
    assert set(variables) == {"params", "batch_stats"}  # init leaves the features out
    _, mutated = jax.eval_shape(
        lambda v: model.apply(v, IMAGES, train=True, mutable=["batch_stats", models.FEATURES]),
        variables,
    )
    features = mutated[models.FEATURES]
    groups = model.feature_groups()
    assert len(groups) == model.num_groups == len(shapes)
    names = [n for group in groups for n in group] + list(model.extra_feature_names())
    assert sorted(features) == sorted(names)
    assert all(isinstance(features[n], tuple) and len(features[n]) == 1 for n in names)
    for group, shape in zip(groups, shapes):
        assert [features[n][0].shape for n in group] == [shape] * len(group)
    # The raw group ends (WRN: extra names; ShuffleNetV2: the group ends) share the group shapes.
    extra = [n for n in model.extra_feature_names() if n not in model.raw_group_ends()]
    assert [features[n][0].shape for n in extra] == stem
    assert [features[n][0].shape for n in model.raw_group_ends()] == shapes


def test_raw_group_ends_are_the_residual_stream_the_consumer_bn_reads(trained):
    """A WRN's raw group end is the block output before the BN consuming it (RepDistiller's
    `is_feat` features); the pre-ReLU group end is that BN's output in inference mode."""
    model, variables = trained
    if not isinstance(model, models.WideResNet):  # A unit's output is its group end already.
        assert model.raw_group_ends() == tuple(g[-1] for g in model.feature_groups())
        return
    _, mutated = model.apply(variables, IMAGES, mutable=[models.FEATURES])
    sown = {
        name: np.asarray(value[0], np.float64) for name, value in mutated[models.FEATURES].items()
    }
    params, stats = variables["params"], variables["batch_stats"]
    consumers = [f"block{g + 1}_layer0" for g in range(1, model.num_groups)] + [None]
    for raw, pre, consumer in zip(
        model.raw_group_ends(), [g[-1] for g in model.feature_groups()], consumers
    ):
        bn_params = params["bn1"] if consumer is None else params[consumer]["bn1"]
        bn_stats = stats["bn1"] if consumer is None else stats[consumer]["bn1"]
        x = sown[raw]
        want = (x - bn_stats["mean"]) / np.sqrt(bn_stats["var"] + 1e-5) * bn_params["scale"]
        np.testing.assert_allclose(sown[pre], want + bn_params["bias"], rtol=1e-4, atol=1e-4)
        assert not np.allclose(sown[pre], x, atol=1e-2)


def test_features_are_pre_relu_and_end_groups(trained):
    model, variables = trained
    _, mutated = model.apply(variables, IMAGES, mutable=[models.FEATURES])
    features = {name: value[0] for name, value in mutated[models.FEATURES].items()}
    for name, value in features.items():
        assert jnp.min(value) < 0, name
    for group, names in enumerate(model.feature_groups(), start=1):
        boundary = model.apply(variables, IMAGES, stop_group=group)
        np.testing.assert_array_equal(boundary, features[names[-1]])


def test_resume_from_every_boundary_is_exact(trained):
    model, variables = trained
    logits = model.apply(variables, IMAGES)
    for group in range(1, model.num_groups + 1):
        boundary = model.apply(variables, IMAGES, stop_group=group)
        resumed = model.apply(variables, boundary, start_group=group)
        chex.assert_trees_all_close(resumed, logits, atol=1e-5, rtol=1e-5)
        if group < model.num_groups:
            # start and stop combined: group i's boundary -> group i+1's boundary.
            chex.assert_trees_all_close(
                model.apply(variables, boundary, start_group=group, stop_group=group + 1),
                model.apply(variables, IMAGES, stop_group=group + 1),
                atol=1e-5,
                rtol=1e-5,
            )


def test_train_updates_batch_stats_and_returns_float32_logits(trained):
    model, variables = trained
    logits, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
    model = models.get_model(name, 10, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), IMAGES)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits, mutated = model.apply(
        variables, IMAGES, train=True, mutable=["batch_stats", models.FEATURES]
    )
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert all(v[0].dtype == jnp.bfloat16 for v in mutated[models.FEATURES].values())


def test_batchnorm_keeps_pytorchs_running_average_and_epsilon():
    """PyTorch's BatchNorm2d as every peer trains it (momentum 0.1, eps 1e-5): a train-mode
    batch moves the running mean and variance 0.1 of the way to the batch's (the variance the
    biased one, where PyTorch takes the unbiased: docs/design.md), and the output divides by
    sqrt(var + 1e-5)."""
    from dfa_jax.models import layers  # pylint: disable=g-import-not-at-top

    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, size=(8, 4, 4, 5)), jnp.float32)
    bn = layers.BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    y, updated = bn.apply(variables, x, mutable=["batch_stats"])
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(updated["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
