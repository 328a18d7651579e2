"""DFA's distillation loss (Eq. 4) from images under non-default `distill` settings, against a
NumPy restatement (float64); the feature-map reading and the stem rule it rests on."""

import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import config_lib, features, methods, models, parallel
from dfa_jax import teacher as teacher_lib
from dfa_jax.methods import common

BATCH = 2


def _np_connector(x, params, eps=1e-5):
    """1x1 conv (no resize) then BatchNorm on the batch's statistics (train mode), in float64."""
    x = np.asarray(x, np.float64)
    y = x @ np.asarray(params["conv"]["kernel"], np.float64)[0, 0]
    if "bias" in params["conv"]:
        y = y + np.asarray(params["conv"]["bias"], np.float64)
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    bn = params["bn"]
    return (y - mean) / np.sqrt(var + eps) * np.asarray(bn["scale"]) + np.asarray(bn["bias"])


def _np_ce(logits, labels):
    z = np.asarray(logits, np.float64)
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels].mean()


@pytest.fixture(scope="module")
def dfa_pair():
    mesh = parallel.make_mesh()
    teacher = teacher_lib.build_model("wrn_16_1", 10, "float32")  # Two maps per group.
    student = teacher_lib.build_model("wrn_10_1", 10, "float32")
    rng = np.random.default_rng(0)
    return {
        "mesh": mesh,
        "pair": methods.Pair(teacher, student),
        "t_vars": teacher_lib.init_variables(teacher, 1, mesh),
        "s_vars": teacher_lib.init_variables(student, 2, mesh),
        "batch": {
            "image": jnp.asarray(rng.normal(size=(BATCH, 32, 32, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32),
        },
        "alpha": [rng.dirichlet(np.ones(2)).astype(np.float32) for _ in range(3)],
    }


@pytest.mark.parametrize(
    "distance, margin, gamma_fd, stem",
    [("l2", -1.0, 0.01, True), ("partial_l2", -0.25, 0.002, False)],
)
def test_dfa_loss_follows_the_distill_fields(dfa_pair, distance, margin, gamma_fd, stem):
    """Eq. 4 with `distill.distance`, `distill.margin`, `distill.gamma_fd` and
    `distill.positions` set away from their defaults: CE + gamma_fd * sum_i 2^(i-G)
    D(connector(S_i), A_i), A_i = sum_j alpha_j max(T_i^j, -1) (the stem's A: its one map,
    clamped at -1 as well)."""
    setting, pair = dfa_pair, dfa_pair["pair"]
    config = config_lib.base_config()
    config.teacher.model, config.student.model = "wrn_16_1", "wrn_10_1"
    config.distill.distance, config.distill.margin = distance, margin
    config.distill.gamma_fd = gamma_fd
    config.distill.positions = "stem_and_groups" if stem else "groups"
    helpers, helper_stats = methods.init_helpers("dfa", pair, config, 5, setting["mesh"])
    params = {"student": setting["s_vars"]["params"], **helpers}
    stats = {"student": setting["s_vars"]["batch_stats"], **helper_stats}
    beta = methods.frozen_beta(setting["alpha"])
    loss_fn = methods.make_loss_fn("dfa", pair, config)
    loss, (_, metrics) = loss_fn(params, stats, beta, setting["batch"], None, setting["t_vars"])

    images, labels = setting["batch"]["image"], np.asarray(setting["batch"]["label"])
    logits, s_mut = pair.student.apply(
        setting["s_vars"], images, train=True, mutable=["batch_stats", models.FEATURES]
    )
    _, t_mut = pair.teacher.apply(setting["t_vars"], images, mutable=[models.FEATURES])
    s_pre = features.read(s_mut, methods.positions(pair.student, "pre_relu", stem))
    keys = [methods.STEM] * stem + [methods.group_key(i + 1) for i in range(len(pair.t_groups))]
    groups = [[(1.0, n)] for n in methods.positions(pair.teacher, "pre_relu", stem)[:1]] * stem
    groups += [list(zip(a, names)) for a, names in zip(setting["alpha"], pair.t_groups)]
    total = 0.0
    for i, (key, group) in enumerate(zip(keys, groups)):
        mapped = _np_connector(s_pre[i], helpers["st"][key])
        target = sum(
            float(a) * np.maximum(np.asarray(features.read(t_mut, [n])[0], np.float64), -1.0)
            for a, n in group
        )
        if distance == "partial_l2":
            target = np.maximum(target, margin)
            err = (mapped - target) ** 2 * ((mapped > target) | (target > 0))
        else:
            err = (mapped - target) ** 2
        total += 2.0 ** (i + 1 - len(keys)) * err.reshape(BATCH, -1).sum(1).mean()
    np.testing.assert_allclose(float(metrics["fd_loss"]), total, rtol=2e-4)
    want = _np_ce(logits, labels) + gamma_fd * total
    np.testing.assert_allclose(float(loss), want, rtol=2e-4)


def test_read_refuses_a_map_sown_twice():
    """A collection fed back into `apply` sows each name again: reading it must fail, not return
    the stale first map."""
    old, new = jnp.zeros((1, 2, 2, 1)), jnp.ones((1, 2, 2, 1))
    with pytest.raises(ValueError, match="sown 2 times"):
        features.read({models.FEATURES: {"g1_b1": (old, new)}}, ["g1_b1"])


def test_a_stem_position_needs_a_stem_in_both_networks():
    """The 'authors' preset and `stem_and_groups` read the stem only where both families have one
    outside their groups: a WRN teaching a ShuffleNetV2 (whose stem is its group 1) reads none."""
    wrn = models.get_model("wrn_10_1", 10)
    shufflenet = models.get_model("shufflenet_v2_0.5", 10)
    assert common.with_stem(methods.Pair(wrn, wrn), True)
    assert not common.with_stem(methods.Pair(wrn, wrn), False)
    assert not common.with_stem(methods.Pair(wrn, shufflenet), True)
    assert not common.with_stem(methods.Pair(shufflenet, wrn), True)
