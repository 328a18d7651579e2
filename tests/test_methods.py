"""Every distillation method of Table 2 end to end on a tiny teacher/student pair: it trains, its
loss falls, its helper stages run, and it lands in summary.json."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import config_lib
from dfa_jax import distill
from dfa_jax import methods
from dfa_jax import parallel
from dfa_jax import pipeline
from dfa_jax import teacher as teacher_lib

from test_config import load_config

METHODS = ["none", "kd", "fitnets", "at", "jacobian", "ft", "ab", "sp", "margin"]
# The logged name of each method's distillation term (Jacobian's is flat over these few steps;
# AB's student trains on cross-entropy alone after its initialisation stage).
DISTILLATION_TERMS = {
    "kd": "kd_loss",
    "fitnets": "fitnets_loss",
    "at": "at_loss",
    "ft": "ft_loss",
    "sp": "sp_loss",
    "margin": "fd_loss",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One tiny run (bundled digits): a teacher, then one student per method."""
    workdir = str(tmp_path_factory.mktemp("methods"))
    config = load_config("demo", "tiny")
    # A teacher of the student's size: every student's step runs the teacher's forward (and
    # Jacobian its input gradient), which the compile of nine steps pays for nine times.
    config.teacher.model = "wrn_10_1"
    config.stages = ("teacher", "distill")
    config.distill.method = METHODS[0]
    config.distill.compare_with = tuple(METHODS[1:])
    # Three epochs: SP's loss rises through the second and falls below its first row only in
    # the third (rows 6.5, 6.8, 9.3, 8.6, 6.2, 5.3 on a 2-core EPYC).
    config.distill.optim.epochs = 3
    config.distill.optim.schedule = "constant"
    config.distill.optim.lr = 0.05
    config.checkpoint_every_steps = 1000  # End-of-stage checkpoints only (each save costs time).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill, "_run_helper_stage", _recording(distill._run_helper_stage))
        pipeline.run(config, workdir)
    return workdir


# FT's and AB's first stages as run: {stage name: (optim, params before, params after)}.
FIRST_STAGES = {}


def _recording(run_helper_stage):
    def run(config, name, directory, optim, params, *args, **kwargs):
        before = jax.device_get(params)  # Before the stage's step donates them.
        final = run_helper_stage(config, name, directory, optim, params, *args, **kwargs)
        FIRST_STAGES[name] = (optim, before, jax.device_get(final.params))
        return final

    return run


def test_first_stages_run_as_repdistillers_pretrain(workdir):
    """FT's paraphraser and AB's initialisation (`helper/pretrain.py`): plain SGD with momentum,
    no Nesterov, a constant rate of their own, the student's batch size and weight decay; AB's
    moves the student's body but not its classifier or final BN (`init_modules` alone train)."""
    del workdir  # Its run filled FIRST_STAGES.
    config = load_config("demo", "tiny")
    assert set(FIRST_STAGES) == {"distill/ft/paraphraser", "distill/ab/init"}, FIRST_STAGES
    for name, lr, epochs in (
        (
            "distill/ft/paraphraser",
            config.baselines.ft_pretrain_lr,
            config.baselines.ft_pretrain_epochs,
        ),
        ("distill/ab/init", config.baselines.ab_init_lr, config.baselines.ab_init_epochs),
    ):
        optim = FIRST_STAGES[name][0]
        assert (optim.lr, optim.epochs, optim.schedule, optim.nesterov) == (
            lr,
            epochs,
            "constant",
            False,
        ), name
        assert optim.momentum == config.distill.optim.momentum
        assert optim.weight_decay == config.distill.optim.weight_decay
        assert optim.batch_size == config.distill.optim.batch_size
    _, before, after = FIRST_STAGES["distill/ab/init"]
    for frozen in ("fc", "bn1"):
        jax.tree.map(
            np.testing.assert_array_equal, after["student"][frozen], before["student"][frozen]
        )
    assert not np.array_equal(
        after["student"]["conv1"]["kernel"], before["student"]["conv1"]["kernel"]
    )


@pytest.mark.parametrize("method", METHODS)
def test_method_distills_with_a_falling_loss(method, workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        result = json.load(f)["stages"][f"distill/{method}"]
    assert 0.0 <= result["best_accuracy"] <= 1.0 and result["epochs"] == 3
    with open(os.path.join(workdir, "distill", method, "metrics.jsonl")) as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert np.isfinite(losses).all()
    assert min(losses[len(losses) // 2 :]) < losses[0], losses
    # The total is mostly cross-entropy at chance after 12 steps, so its fall is batch noise
    # that a student learning nothing passes too. The method's own term falls clearly (rows on
    # a 2-core EPYC, first -> least of the second half: KD 0.013 -> 0.0013, SP 0.0014 ->
    # 0.0009, FitNets 1.07 -> 0.61); a term pushing the student the wrong way rises.
    if method in DISTILLATION_TERMS:
        with open(os.path.join(workdir, "distill", method, "metrics.jsonl")) as f:
            key = f"train/{DISTILLATION_TERMS[method]}"
            term = [r[key] for r in map(json.loads, f) if key in r]
        assert min(term[len(term) // 2 :]) <= 0.8 * term[0], term
    # Its final variables, whether it trained alone (FT, AB) or in the cohort: the student's own,
    # moved from its initialisation (the run's seed) by its updates. 12 steps at lr 0.05 move the
    # parameters by 0.9 % (KD) to 230 % (FitNets) of their norm; a student its updates do not
    # reach (lr ~ 0, a stop_gradient on its path) stays within 1e-3. (AB's moves in its
    # initialisation stage too, which has its own rate.)
    student = teacher_lib.build_model("wrn_10_1", 10, "float32")
    mesh = parallel.make_mesh()
    variables = os.path.join(workdir, "distill", method, teacher_lib.VARIABLES_DIR)
    trained = teacher_lib.load_variables(variables, student, mesh)["params"]
    start = teacher_lib.init_variables(student, load_config("demo", "tiny").seed, mesh)["params"]
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    moved = np.linalg.norm(flat(trained) - flat(start)) / np.linalg.norm(flat(start))
    assert moved > 1e-3, moved
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


def test_margin_under_the_authors_preset_reads_the_stem_of_a_shufflev2_teacher():
    """The 'authors' preset distils the stem too; RepDistiller's ShuffleV2 has one outside its
    groups but no BN producing its group ends: its margins are -1 at the stem and at every
    group, and the whole loss traces (it failed with '3 margins for 4 groups' after the teacher
    had trained)."""
    config = load_config("demo")
    config.teacher.model = config.student.model = "ShuffleV2"
    config.distill.method = "margin"
    config.baselines.preset = "authors"
    config_lib.validate(config, device_count=1)
    mesh = parallel.make_mesh()
    model = teacher_lib.build_model("ShuffleV2", 10, "float32")
    pair = methods.Pair(model, model)
    teacher_vars = teacher_lib.init_variables(model, 0, mesh)
    margins = methods.teacher_margins(pair, teacher_vars, with_stem=True)
    stem = model.stem_features()
    assert stem is not None
    positions = methods.positions(model, "pre_relu", with_stem=True)
    assert len(margins) == len(positions) == len(pair.t_shapes()) + 1
    assert all(bool(jnp.all(m == -1.0)) for m in margins)
    helpers, helper_stats = methods.init_helpers("margin", pair, config, 5, mesh)
    student = teacher_lib.init_variables(model, 1, mesh)
    params = {"student": student["params"], **helpers}
    stats = {"student": student["batch_stats"], **helper_stats}
    batch = {"image": jnp.zeros((2, 32, 32, 3)), "label": jnp.zeros((2,), jnp.int32)}
    loss_fn = methods.make_loss_fn("margin", pair, config, margins)
    loss, _ = jax.eval_shape(lambda: loss_fn(params, stats, {}, batch, None, teacher_vars))
    assert loss.shape == ()
