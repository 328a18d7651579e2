"""Every distillation method of Table 2 end to end on a tiny teacher/student pair: it trains, its
loss falls, its helper stages run, and it lands in summary.json."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import config_lib
from dfa_jax import methods
from dfa_jax import parallel
from dfa_jax import pipeline
from dfa_jax import teacher as teacher_lib

from test_config import load_config

METHODS = ["none", "kd", "fitnets", "at", "jacobian", "ft", "ab", "sp", "margin"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One tiny run (bundled digits): a teacher, then one student per method."""
    workdir = str(tmp_path_factory.mktemp("methods"))
    config = load_config("demo", "tiny")
    config.stages = ("teacher", "distill")
    config.distill.method = METHODS[0]
    config.distill.compare_with = tuple(METHODS[1:])
    config.distill.optim.epochs = 3
    config.distill.optim.schedule = "constant"
    config.distill.optim.lr = 0.05
    pipeline.run(config, workdir)
    return workdir


@pytest.mark.parametrize("method", METHODS)
def test_method_distills_with_a_falling_loss(method, workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        result = json.load(f)["stages"][f"distill/{method}"]
    assert 0.0 <= result["best_accuracy"] <= 1.0 and result["epochs"] == 3
    with open(os.path.join(workdir, "distill", method, "metrics.jsonl")) as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert np.isfinite(losses).all()
    assert min(losses[len(losses) // 2 :]) < losses[0], losses
    if method == "ft":
        assert os.path.exists(os.path.join(workdir, "distill", "ft", "paraphraser", "result.json"))
    if method == "ab":
        assert os.path.exists(os.path.join(workdir, "distill", "ab", "init", "result.json"))


def test_distill_labels_order_and_dedup():
    config = config_lib.base_config()
    config.distill.method = "kd"
    config.distill.compare_with = ("none", "kd", "last")
    assert config_lib.distill_labels(config) == ["kd", "none", "last"]
    config.distill.method = "dfa"
    config.distill.aggregation = "average"
    assert config_lib.distill_labels(config)[0] == "average"


def test_margin_of_a_shufflenet_teacher_is_the_constant_minus_one():
    """Table 4's Margin column: a ShuffleNetV2 teacher has no BN producing its group ends, so its
    margins are -1 on every channel (the DFA authors' MarginReLU without BN margins); a WRN
    teacher's are overhaul's E[t | t < 0] from its BNs."""
    config = load_config("cinic10_pair1")
    config.data.path = "/tmp"
    config.distill.method = "margin"
    config_lib.validate(config, device_count=1)
    mesh = parallel.make_mesh()
    for name, expect_constant in (("shufflenet_v2_0.5", True), ("wrn_16_1", False)):
        model = teacher_lib.build_model(name, 10, "float32")
        pair = methods.Pair(model, model)
        margins = methods.teacher_margins(pair, teacher_lib.init_variables(model, 0, mesh))
        assert [m.shape[0] for m in margins] == [s[-1] for s in pair.t_shapes()]
        constant = all(bool(jnp.all(m == -1.0)) for m in margins)
        assert constant == expect_constant, name


def test_fitnets_loss_is_assembled_as_repdistillers():
    """The whole FitNets loss from images: CE + 100 * mean((ReLU(BN(conv1x1(s))) - t)^2) at the
    middle group end, s and t the post-ReLU maps — RepDistiller's ConvReg (conv, BN, ReLU) and
    HintLoss — re-assembled here from the models' own pieces and NumPy."""
    import jax

    from dfa_jax import features
    from dfa_jax import models

    config = load_config("demo", "tiny")
    t_model = teacher_lib.build_model("wrn_16_1", 10, "float32")
    s_model = teacher_lib.build_model("wrn_10_1", 10, "float32")
    pair = methods.Pair(t_model, s_model)
    mesh = parallel.make_mesh()
    t_vars = teacher_lib.init_variables(t_model, 0, mesh)
    s_vars = teacher_lib.init_variables(s_model, 1, mesh)
    helper_params, helper_stats = methods.init_helpers("fitnets", pair, config, 2, mesh)
    # A regressor whose BN shifts some outputs below zero.
    bn = helper_params["regressor"]["bn"]
    helper_params["regressor"]["bn"] = {**bn, "bias": jnp.full_like(bn["bias"], -0.3)}
    params = {"student": s_vars["params"], **helper_params}
    stats = {"student": s_vars["batch_stats"], **helper_stats}
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 4), jnp.int32),
    }
    loss, (_, metrics) = methods.make_loss_fn("fitnets", pair, config)(
        params, stats, {}, batch, None, t_vars
    )

    g = methods.fitnets_group(pair)
    s_logits, s_mut = s_model.apply(
        s_vars, batch["image"], train=True, mutable=["batch_stats", models.FEATURES]
    )
    _, t_mut = t_model.apply(t_vars, batch["image"], train=False, mutable=[models.FEATURES])
    s_hint = jax.nn.relu(features.read(s_mut, [pair.s_ends[g - 1]])[0])
    t_hint = np.maximum(np.asarray(features.read(t_mut, [pair.t_ends[g - 1]])[0]), 0.0)
    connector = models.Connector(t_hint.shape[-1])
    regressed, _ = connector.apply(
        {"params": helper_params["regressor"], "batch_stats": helper_stats["regressor"]},
        s_hint,
        train=True,
        mutable=["batch_stats"],
    )
    regressed = np.asarray(regressed)
    assert (regressed < 0).any()  # The ReLU the regressor ends with has something to cut.
    regressed = np.maximum(regressed, 0.0)
    logits = np.asarray(s_logits, np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -log_p[np.arange(4), np.asarray(batch["label"])].mean()
    hint = np.mean((regressed - t_hint) ** 2)
    assert float(metrics["fitnets_loss"]) == pytest.approx(hint, rel=1e-5)
    assert float(loss) == pytest.approx(ce + config.baselines.fitnets_weight * hint, rel=1e-5)
