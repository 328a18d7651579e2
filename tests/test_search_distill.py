"""Search and distillation: the bridge loss's two paths, aggregations, alpha.json, DFA-T checks,
single tracing, resume exactness across the search, and a whole tiny pipeline on mock data."""

import json
import logging
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dfa_jax import alpha_file
from dfa_jax import bilevel
from dfa_jax import checkpointing
from dfa_jax import config_lib
from dfa_jax import features
from dfa_jax import inputs
from dfa_jax import methods
from dfa_jax import models
from dfa_jax import parallel
from dfa_jax import pipeline
from dfa_jax import reporting
from dfa_jax import search
from dfa_jax import teacher as teacher_lib
from dfa_jax import train_loop
from dfa_jax.data import augment
from dfa_jax.data import loader

from test_config import load_config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import search_dynamics  # noqa: E402


def tiny_models():
    t = teacher_lib.build_model("wrn_16_1", 10, "float32")
    s = teacher_lib.build_model("wrn_10_1", 10, "float32")
    return t, s


def bridge_inputs():
    """Tiny teacher and student, the search's w (student + connectors), a batch of 4."""
    t_model, s_model = tiny_models()
    mesh = parallel.make_mesh()
    t_vars = teacher_lib.init_variables(t_model, 0, mesh)
    s_vars = teacher_lib.init_variables(s_model, 1, mesh)
    t_shapes = [(1, 32, 32, 16), (1, 16, 16, 32), (1, 8, 8, 64)]
    st_p, st_s = methods.connector_helpers(t_shapes, [16, 32, 64], 2, mesh, jnp.float32)
    ts_p, ts_s = methods.connector_helpers(t_shapes, [16, 32, 64], 3, mesh, jnp.float32)
    params = {"student": s_vars["params"], "st": st_p, "ts": ts_p}
    stats = {"student": s_vars["batch_stats"], "st": st_s, "ts": ts_s}
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 4), jnp.int32),
    }
    return t_model, s_model, t_vars, params, stats, batch


def test_starting_alpha_of_wrn_28_4_is_softmax_of_the_last_logit():
    """WRN_28_4's groups hold four maps: softmax([0, 0, 0, 4]) puts 0.948 on the last (0.982 is
    the two-map figure), as the README states."""
    model = teacher_lib.build_model("wrn_28_4", 100, "float32")
    record = search.alpha_record(model, search.init_beta(model, 4.0))
    assert [len(r["alpha"]) for r in record] == [4, 4, 4]
    for r in record:
        np.testing.assert_allclose(r["alpha"], np.exp([0, 0, 0, 4]) / np.exp([0, 0, 0, 4]).sum())
        assert round(r["alpha"][-1], 3) == 0.948


def test_demos_beta_learning_rate_can_move_alpha_in_its_steps(tmp_path):
    """Under a steady one-signed gradient Adam moves each beta by about its learning rate per
    step: in the demo's beta steps per group its beta_lr moves the last map's logit by a whole
    unit or more (its alpha from 0.982 to 0.953 or less), where the paper's 1e-3 would move it by
    under 0.1 (the demo's search would stay near its starting 'Last')."""
    config = load_config("demo")
    train_examples = len(inputs.load(config, str(tmp_path), search=True).search_train.labels)
    steps_per_group = config.search.epochs_per_group * (train_examples // config.search.batch_size)
    assert config.search.beta_lr * steps_per_group >= 1.0, steps_per_group
    assert 1e-3 * steps_per_group < 0.1, steps_per_group


def test_beta_gets_gradient_through_both_st_and_ts_paths():
    t_model, s_model, t_vars, params, stats, batch = bridge_inputs()
    beta = search.init_beta(t_model, 0.0)
    for gamma_st, gamma_ts in ((1.0, 0.0), (0.0, 1.0)):
        config = load_config("demo", "tiny")
        config.search.gamma_st, config.search.gamma_ts = gamma_st, gamma_ts
        _, beta_loss = search.make_bridge_loss_fn(t_model, s_model, 2, config)
        # Jitted: one compile instead of an eager dispatch (and compile) per op of the backward.
        grad = jax.jit(jax.grad(lambda b: beta_loss(b, params, stats, batch, None, t_vars)[0]))
        grads = grad(beta)
        assert np.abs(grads["g2"]).sum() > 0, (gamma_st, gamma_ts)
        np.testing.assert_array_equal(grads["g1"], 0.0)  # Only the searched group is in the loss.
        np.testing.assert_array_equal(grads["g3"], 0.0)


def test_the_st_term_trains_the_students_groups_up_to_the_searched_one():
    """Eq. 11's L_ST reaches the student through S_i: with gamma_TS = 0 the student's stem and
    groups up to i get a gradient, exactly the parameters that L_TS alone (gamma_ST = 0, the
    student resumed after group i) leaves at zero."""
    t_model, s_model, t_vars, params, stats, batch = bridge_inputs()
    beta = search.init_beta(t_model, 1.0)
    grads = {}
    for gamma_st, gamma_ts in ((1.0, 0.0), (0.0, 1.0)):
        config = load_config("demo", "tiny")
        config.search.gamma_st, config.search.gamma_ts = gamma_st, gamma_ts
        loss_fn, _ = search.make_bridge_loss_fn(t_model, s_model, 2, config)
        grad = jax.jit(jax.grad(lambda p, f=loss_fn: f(p, stats, beta, batch, None, t_vars)[0]))
        grads[gamma_st] = jax.tree.leaves(grad(params)["student"])
    early = [i for i, g in enumerate(grads[0.0]) if not np.any(np.asarray(g))]
    assert early and len(early) < len(grads[0.0])
    assert all(np.any(np.asarray(grads[1.0][i])) for i in early)


def test_beta_diagnostics_are_the_st_gradient_and_the_l2_pull():
    """The ST part's gradient the search reports (computed without the student's backward) equals
    the gradient of the bridge loss with the TS part switched off; the L2 pull is lambda |beta|
    and the L2's gradient lambda beta, with its sign (a negative beta_j is pulled up)."""
    t_model, s_model, t_vars, params, stats, batch = bridge_inputs()
    beta = search.init_beta(t_model, 1.5)
    beta["g2"] = jnp.array([-0.7, 1.5], jnp.float32)
    config = load_config("demo", "tiny")
    config.search.gamma_st = 0.5
    _, beta_loss = search.make_bridge_loss_fn(t_model, s_model, 2, config)
    # Jitted, as the search's step runs them (an eager backward dispatches op by op).
    _, metrics = jax.jit(beta_loss)(beta, params, stats, batch, None, t_vars)
    config.search.gamma_ts = 0.0
    _, st_only = search.make_bridge_loss_fn(t_model, s_model, 2, config)
    st_grad = jax.jit(jax.grad(lambda b: st_only(b, params, stats, batch, None, t_vars)[0]))
    grad_st = st_grad(beta)["g2"]
    assert np.abs(grad_st).sum() > 0
    np.testing.assert_allclose(metrics[bilevel.BETA_GRAD_ST], grad_st, rtol=1e-5, atol=1e-9)
    decay = config.search.beta_weight_decay
    assert decay > 0
    for j, b in enumerate([-0.7, 1.5]):
        assert float(metrics[f"beta_l2_pull/{j}"]) == pytest.approx(decay * abs(b), rel=1e-6)
        assert float(metrics[f"beta_l2_grad/{j}"]) == pytest.approx(decay * b, rel=1e-6)


def test_bridge_loss_records_each_train_mode_batchnorms_batch_statistics():
    """Every BatchNorm the bridge loss runs in train mode keeps this batch in its running
    statistics: the student's early groups (the ST path) and its later ones (the TS path), and
    the TS connector's BN the moments of its 1x1 conv of the clamped alpha-weighted teacher maps
    (NumPy, PyTorch's momentum 0.1 on Flax's biased variance)."""
    t_model, s_model, t_vars, params, stats, batch = bridge_inputs()
    group, key = 2, "g2"
    beta = search.init_beta(t_model, 0.0)
    beta[key] = jnp.array([0.4, -0.3], jnp.float32)
    config = load_config("demo", "tiny")
    loss_fn, _ = search.make_bridge_loss_fn(t_model, s_model, group, config)
    _, (new_stats, _) = jax.jit(loss_fn)(params, stats, beta, batch, None, t_vars)
    # The student: its stem and first groups (ST path) as much as its last group (TS path).
    moved = jax.tree.map(
        lambda new, old: bool(np.abs(np.asarray(new) - np.asarray(old)).max() > 1e-6),
        new_stats["student"],
        stats["student"],
    )
    assert all(jax.tree.leaves(moved)), moved
    # The TS connector: mean and biased variance over B, H, W of conv(A_2), A_2 in NumPy.
    _, sown = t_model.apply(t_vars, batch["image"], train=False, mutable=[models.FEATURES])
    maps = [np.asarray(sown[models.FEATURES][n][0]) for n in t_model.feature_groups()[group - 1]]
    alpha = np.exp(np.asarray(beta[key])) / np.exp(np.asarray(beta[key])).sum()
    aggregated = sum(a * np.maximum(m, config.features.clamp_min) for a, m in zip(alpha, maps))
    kernel = np.asarray(params["ts"][key]["conv"]["kernel"])[0, 0]
    y = (aggregated @ kernel).reshape(-1, kernel.shape[1])
    old = stats["ts"][key]["bn"]
    got = new_stats["ts"][key]["bn"]
    for stat, moment in (("mean", y.mean(0)), ("var", y.var(0))):
        want = 0.9 * old[stat] + 0.1 * moment
        np.testing.assert_allclose(got[stat], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("w_schedule", ["global", "per_group"])
def test_w_learning_rate_over_the_groups(w_schedule):
    """'global': one cosine over all groups' steps; 'per_group': restarted at each group's
    first step (NumPy cosine)."""
    config = load_config("demo", "tiny")
    config.search.w_schedule, config.search.epochs_per_group = w_schedule, 2
    steps_per_epoch, groups = 5, 3
    schedule = search.w_lr_schedule(config.search, groups, steps_per_epoch)
    per_group = 2 * steps_per_epoch
    for step in range(groups * per_group):
        t, total = (step % per_group, per_group) if w_schedule == "per_group" else (step, 30)
        expected = config.search.w_lr * 0.5 * (1 + np.cos(np.pi * t / total))
        # abs: near the cosine's end 1 + cos cancels, float32's cos error becomes ~1e-5 rel.
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-8), step
    config.search.w_schedule = "cyclic"
    with pytest.raises(Exception, match="search.w_schedule = 'cyclic'"):
        config_lib.validate(config, device_count=1)


def test_aggregations_of_table_5():
    t_model, _ = tiny_models()
    config = load_config("demo", "tiny")
    last = methods.aggregation_alpha("last", t_model, config, "")
    assert [a.tolist() for a in last] == [[0.0, 1.0]] * 3
    average = methods.aggregation_alpha("average", t_model, config, "")
    assert [a.tolist() for a in average] == [[0.5, 0.5]] * 3
    random_a = methods.aggregation_alpha("random", t_model, config, "")
    random_b = methods.aggregation_alpha("random", t_model, config, "")
    for a, b in zip(random_a, random_b):
        np.testing.assert_array_equal(a, b)  # Seeded: the same draw again.
        assert a.sum() == pytest.approx(1.0) and (a > 0).all()
    # A draw, not one of the fixed aggregations (nor the same for every group).
    assert not any(np.allclose(a, [0.5, 0.5]) or np.allclose(a, [0.0, 1.0]) for a in random_a)
    assert len({tuple(np.round(a, 6)) for a in random_a}) == len(random_a)
    # 'start': the search's first alpha, softmax of `search.init_beta`, unsearched.
    start = methods.aggregation_alpha("start", t_model, config, "")
    initial = search.init_beta(t_model, config.search.init_last_logit)
    for i, a in enumerate(start):
        np.testing.assert_allclose(a, jax.nn.softmax(initial[f"g{i + 1}"]), rtol=1e-6)
    assert config.search.init_last_logit == 4.0 and start[0][-1] == pytest.approx(0.982, abs=5e-4)
    # Frozen beta reproduces alpha exactly through softmax, one-hot included.
    for alpha in (last, random_a):
        beta = methods.frozen_beta(alpha)
        for i, a in enumerate(alpha):
            np.testing.assert_allclose(jax.nn.softmax(beta[f"g{i + 1}"]), a, rtol=1e-6, atol=0)


def test_the_search_starts_from_zero_logits_but_the_last():
    """beta starts at 0 for every map but the last, which gets `init_last_logit`: softmax gives
    the softened 'Last' (§4: only the last map weighted), and the coupled L2 pulls from there."""
    t_model, _ = tiny_models()
    for logit in (4.0, 2.5):
        beta = search.init_beta(t_model, logit)
        assert sorted(beta) == ["g1", "g2", "g3"]
        for b in beta.values():
            np.testing.assert_array_equal(np.asarray(b), [0.0, logit])


def test_the_start_aggregation_follows_the_configured_initial_logit():
    """'start' is softmax of the configured `search.init_last_logit`'s beta, whatever its value,
    and its students record that value as the source."""
    t_model, _ = tiny_models()
    config = load_config("demo", "tiny")
    config.search.init_last_logit = 2.0
    start = methods.aggregation_alpha("start", t_model, config, "")
    want = np.exp([0.0, 2.0]) / np.exp([0.0, 2.0]).sum()
    for a in start:
        np.testing.assert_allclose(a, want, rtol=1e-6)
    assert methods.dfa.aggregation_source("start", config, "") == {
        "kind": "start",
        "init_last_logit": 2.0,
    }


def test_groups_of_one_map_train_w_without_a_beta_step(tmp_path):
    """ShuffleNetV2's stem and conv5 are groups of one map (alpha = 1): their search stages get
    no validation batches, so the step runs no beta half; the groups of several maps do."""
    config = load_config("demo", "tiny")
    config.teacher.model = config.student.model = "shufflenet_v2_0.5"
    mesh = parallel.make_mesh()
    data = inputs.load(config, str(tmp_path), search=True)
    built = search.build(config, mesh, data)
    for group, maps in enumerate((1, 4, 8, 4, 1), start=1):
        stage = search.build_group_stage(
            built, config, mesh, data, str(tmp_path), group, built.state
        )
        assert (stage.val_data is None) == (maps == 1), group
        # §3.4: w trains on the training part of the 7:3 split, beta on the held-out part.
        assert stage.train_data is data.search_train, group
        assert maps == 1 or stage.val_data is data.search_val, group
        # The progress line's ETA covers the groups still to come, not this one alone.
        group_steps = config.search.epochs_per_group * built.steps_per_epoch
        assert group_steps > 0 and stage.steps_after == (5 - group) * group_steps
    start = search.alpha_record(built.teacher_model, built.state.beta)
    assert search.group_dynamics(start[0], start[0], []) == {}
    assert search.group_movement(start[0], start[0], {}).endswith("(nothing to search)")


def test_search_evaluates_the_groups_teacher_to_student_path(tmp_path):
    """Each epoch's test accuracy of a group's search is its teacher-to-student path (the
    teacher's maps aggregated with the group's alpha, its TS connector, the student from the
    boundary on), from the state's own parts, not the student's own forward."""
    config = load_config("demo", "tiny")
    mesh = parallel.make_mesh()
    data = inputs.load(config, str(tmp_path), search=True)
    built = search.build(config, mesh, data)
    teacher_vars = teacher_lib.init_variables(built.teacher_model, 7, mesh)
    # Not the initial state: another beta per group, statistics off their initial 0 and 1.
    state = built.state.replace(
        beta={
            k: v + 0.9 * jnp.arange(v.size) - 0.5 * int(k[1:]) for k, v in built.state.beta.items()
        },
        batch_stats=jax.tree.map(lambda x: 1.3 * x + 0.05, built.state.batch_stats),
    )
    group, key = 2, "g2"
    stage = search.build_group_stage(
        built, config, mesh, data, str(tmp_path), group, state, teacher_vars
    )
    got = stage.eval_fn(state)

    t_model, s_model = built.teacher_model, built.student_model
    alpha = np.exp(np.asarray(state.beta[key])) / np.exp(np.asarray(state.beta[key])).sum()
    student = {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}
    connector = {"params": state.params["ts"][key], "batch_stats": state.batch_stats["ts"][key]}
    correct = count = loss = own_loss = 0.0
    for batch in loader.eval_batches(data.test, 64):
        keep = np.asarray(batch["mask"], bool)
        images = augment.normalize(batch["image"][keep], data.info.mean, data.info.std)
        labels = np.asarray(batch["label"])[keep]
        _, sown = t_model.apply(
            teacher_vars, images, train=False, stop_group=group, mutable=[models.FEATURES]
        )
        maps = [
            np.maximum(np.asarray(sown[models.FEATURES][n][0]), config.features.clamp_min)
            for n in t_model.feature_groups()[group - 1]
        ]
        aggregated = sum(a * m for a, m in zip(alpha, maps))
        channels = features.group_shapes(s_model)[group - 1][-1]
        ts_in = models.Connector(channels).apply(connector, jnp.asarray(aggregated), train=False)
        logits = np.asarray(s_model.apply(student, ts_in, train=False, start_group=group))
        correct += (logits.argmax(-1) == labels).sum()
        loss += -(jax.nn.log_softmax(logits)[np.arange(len(labels)), labels]).sum()
        own = s_model.apply(student, images, train=False)
        own_loss += -(jax.nn.log_softmax(own)[np.arange(len(labels)), labels]).sum()
        count += len(labels)
    assert got["accuracy"] == pytest.approx(correct / count, abs=1e-9)
    assert got["loss"] == pytest.approx(float(loss) / count, rel=1e-4)
    assert abs(got["loss"] - float(own_loss) / count) > 1e-2  # Not the student's own forward.
    assert stage.eval_label == "teacher-to-student path test accuracy"


def test_each_groups_search_starts_from_where_the_previous_group_left_w_and_beta(
    tmp_path, monkeypatch
):
    """Algorithm 1 initialises beta and w once (line 2), then searches the groups in turn: each
    group's search starts from the student, connectors and beta the previous group ended with,
    and alpha.json records the last group's end."""
    config = load_config("demo", "tiny")
    mesh = parallel.make_mesh()
    data = inputs.load(config, str(tmp_path), search=True)
    seen = {}

    def fake_run(stage, config, mesh):
        del config, mesh
        seen[stage.name] = jax.device_get((stage.state.params, stage.state.beta))
        params = jax.tree.map(lambda x: x + 1.0, stage.state.params)
        beta = {k: v + 0.25 for k, v in stage.state.beta.items()}
        state = stage.state.replace(params=params, beta=beta)
        return {
            "state": state,
            "steps": 1,
            "wall_time_s": 0.0,
            "best_epoch": 1,
            "best_accuracy": 0.1,
            "last_accuracy": 0.1,
        }

    monkeypatch.setattr(train_loop, "run", fake_run)
    monkeypatch.setattr(reporting, "plot_alpha_heatmap", lambda *a, **k: None)
    monkeypatch.setattr(reporting, "plot_alpha_trajectories", lambda *a, **k: None)
    os.makedirs(tmp_path / "search")  # The loop, faked here, makes the stage's directory.
    search.run(config, str(tmp_path), mesh, data, None)
    params0, beta0 = seen["search/g1"]
    for g in (2, 3):
        params, beta = seen[f"search/g{g}"]
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)):
            np.testing.assert_allclose(a, b + (g - 1), rtol=1e-5)
        for k in beta0:
            np.testing.assert_allclose(beta[k], beta0[k] + 0.25 * (g - 1), rtol=1e-6)
    record = search.alpha_record_from_file(os.path.join(str(tmp_path), search.ALPHA_FILE))
    for r in record:
        np.testing.assert_allclose(r["beta"], np.asarray(beta0[f"g{r['group']}"]) + 0.75, rtol=1e-6)


def test_alpha_file_of_another_layout_is_refused(tmp_path):
    t_model, _ = tiny_models()
    good = search.alpha_record(t_model, search.init_beta(t_model, 1.0))
    path = tmp_path / "alpha.json"
    path.write_text(json.dumps({"teacher": "wrn_16_1", "groups": good}))
    alpha = alpha_file.load(str(path), t_model)
    assert [len(a) for a in alpha] == [2, 2, 2]
    bad_layers = json.loads(json.dumps(good))
    bad_layers[1]["layers"] = ["g2_b1", "g2_b2", "g2_b3"]
    path.write_text(json.dumps({"teacher": "wrn_22_1", "groups": bad_layers}))
    with pytest.raises(
        alpha_file.AlphaFileError,
        match=r"searched with teacher 'wrn_22_1'\): group 2 aggregates layers .* this run's"
        r" teacher \(WideResNet\(depth=16, width=1\)\)",
    ):
        alpha_file.load(str(path), t_model)
    path.write_text(json.dumps({"teacher": "shufflenet_v2_1.0", "groups": good[:2]}))
    # Each teacher named as what it is: the file's, and this run's with its own group count.
    with pytest.raises(
        alpha_file.AlphaFileError,
        match=r"searched with teacher 'shufflenet_v2_1.0'\) has 2 groups but this run's teacher"
        r" \(WideResNet\(depth=16, width=1\)\) has 3",
    ):
        alpha_file.load(str(path), t_model)


def test_alpha_file_with_its_groups_in_another_order_is_refused(tmp_path):
    """Each group's alpha is taken by its position: a file listing the teacher's groups in
    another order (last group first) is refused, not loaded with each alpha on another group."""
    t_model, _ = tiny_models()
    good = search.alpha_record(t_model, search.init_beta(t_model, 1.0))
    path = tmp_path / "alpha.json"
    path.write_text(json.dumps({"teacher": "wrn_16_1", "groups": good[::-1]}))
    with pytest.raises(alpha_file.AlphaFileError, match=r"group 1 aggregates layers \['g3_"):
        alpha_file.load(str(path), t_model)


def test_alpha_file_with_a_group_more_than_the_teacher_is_refused(tmp_path):
    """A file of 4 groups for a teacher of 3 (another depth's) is refused, not cut to the
    teacher's 3."""
    t_model, _ = tiny_models()
    good = search.alpha_record(t_model, search.init_beta(t_model, 1.0))
    extra = {"layers": ["g4_b1", "g4_b2"], "alpha": [0.5, 0.5]}
    path = tmp_path / "alpha.json"
    path.write_text(json.dumps({"teacher": "wrn_16_1", "groups": [*good, extra]}))
    with pytest.raises(alpha_file.AlphaFileError, match=r"has 4 groups but this run's teacher"):
        alpha_file.load(str(path), t_model)


def test_alpha_file_of_another_teacher_architecture_warns(tmp_path, caplog):
    """Same layer names, another teacher (wrn_16_2's alpha for wrn_16_1): loaded, with a warning
    naming both; none for the file's own teacher."""
    t_model, _ = tiny_models()
    good = search.alpha_record(t_model, search.init_beta(t_model, 1.0))
    path = tmp_path / "alpha.json"
    caplog.set_level(logging.WARNING, logger="absl")
    path.write_text(json.dumps({"teacher": "wrn_16_1", "groups": good}))
    alpha_file.load(str(path), t_model)
    assert "searched with teacher" not in caplog.text
    path.write_text(json.dumps({"teacher": "wrn_16_2", "groups": good}))
    alpha = alpha_file.load(str(path), t_model)
    assert [len(a) for a in alpha] == [2, 2, 2]
    (record,) = [r for r in caplog.records if "searched with teacher" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "'wrn_16_2'" in record.getMessage()
    assert "WideResNet(depth=16, width=1)" in record.getMessage()


def _search_workdir(path, groups: dict[int, list[dict]], steps: dict[int, int]) -> str:
    """A search workdir of hand-written records: per group its metrics.jsonl rows, and for the
    groups in `steps` a result.json (the others still running)."""
    workdir = str(path)
    os.makedirs(workdir)
    search_config = {
        "init_last_logit": 4.0,
        "beta_lr": 0.01,
        "beta_weight_decay": 1e-3,
        "w_schedule": "global",
    }
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"search": search_config}, f)
    for group, rows in groups.items():
        directory = os.path.join(workdir, "search", f"g{group}")
        os.makedirs(directory)
        with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if group in steps:
            with open(os.path.join(directory, "result.json"), "w") as f:
                json.dump({"steps": steps[group]}, f)
    return workdir


def _train_row(step: int, grad: float) -> dict:
    return {
        "step": step,
        "train/loss": 1.0,
        **{f"train/beta_grad/{j}": grad for j in (0, 1)},
        **{f"train/beta_grad_signed/{j}": (-grad, grad)[j] for j in (0, 1)},
        **{f"train/val/beta_l2_pull/{j}": 2 * grad for j in (0, 1)},
        "train/beta_share_st": grad,
    }


def _epoch_row(group: int, epoch: int, step: int) -> dict:
    return {"epoch": epoch, "step": step, f"alpha/g{group}/0": 0.02, f"alpha/g{group}/1": 0.98}


def test_search_dynamics_weights_each_row_by_the_steps_it_averages(tmp_path):
    """Rows at steps 2 (epoch end), 3, 4 (epoch end) average 2, 1 and 1 steps: the mean over
    steps of row means 1, 4, 4 is 2.5, not their plain mean 3."""
    rows = [
        _train_row(2, 1.0),
        _epoch_row(1, 1, 2),
        _train_row(3, 4.0),
        _train_row(4, 4.0),
        _epoch_row(1, 2, 4),
    ]
    workdir = _search_workdir(tmp_path / "w", {1: rows}, {1: 4})
    (d,) = search_dynamics.group_dynamics(workdir)
    np.testing.assert_allclose(d["beta_grad"], [2.5, 2.5])
    np.testing.assert_allclose(d["beta_l2_pull"], [5.0, 5.0])
    np.testing.assert_allclose(d["beta_grad_signed"], [-2.5, 2.5])
    assert d["share_st"] == pytest.approx(2.5)
    assert d["steps"] == 4 and d["finished"]


def test_search_dynamics_reads_a_search_still_running(tmp_path, capsys):
    """Group 2 has rows but no result.json (and the search no alpha.json yet): it counts the
    steps of its last row, and the table and plots are written."""
    groups = {
        1: [_train_row(2, 1.0), _epoch_row(1, 1, 2)],
        2: [_train_row(1, 1.0), _train_row(3, 3.0)],  # No epoch ended yet.
    }
    workdir = _search_workdir(tmp_path / "w", groups, {1: 2})
    out = str(tmp_path / "out")
    assert search_dynamics.main([workdir, "--out", out]) == 0
    assert "search group 2 has no result.json" in capsys.readouterr().out
    with open(os.path.join(out, "search_dynamics.jsonl")) as f:
        d1, d2 = [json.loads(line) for line in f]
    assert (d1["steps"], d1["finished"], d2["steps"], d2["finished"]) == (2, True, 3, False)
    assert d2["beta_end"] is None and d2["alpha_epochs"] == []
    np.testing.assert_allclose(d2["beta_grad"], [7 / 3, 7 / 3])
    with open(os.path.join(out, "search_dynamics.md")) as f:
        assert "| 3 (unfinished) |" in f.read()


def test_whole_tiny_pipeline_on_mock_cifar(tmp_path, monkeypatch):
    """teacher -> search -> distill on tfds mock data; every step function traces exactly once."""
    # Traces are counted per step object. (chex.assert_max_traces keys its counter by the
    # definition site, which all steps made by one factory share.)
    real_factory = bilevel.make_bilevel_step
    traces = []

    def counting_factory(*args, **kwargs):
        step = real_factory(*args, **kwargs)
        index = len(traces)
        traces.append(0)

        def counted(*step_args):
            traces[index] += 1  # Python runs here only while jit traces.
            return step(*step_args)

        return counted

    monkeypatch.setattr(bilevel, "make_bilevel_step", counting_factory)
    config = load_config("cifar100_pair1", "tiny")
    config.distill.compare_with = ("none",)
    config.data.max_train_examples = None  # All 192 mock images: the 7:3 split of 100 classes.
    config.checkpoint_every_steps = 1000  # End-of-stage checkpoints only (each save costs time).
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=192):
        summary = pipeline.run(config, workdir)
    # teacher + 3 search groups + 2 students, each traced once over several epochs.
    assert traces == [1] * 6

    with open(os.path.join(workdir, "alpha.json")) as f:
        record = json.load(f)
    t_model = teacher_lib.build_model(config.teacher.model, 100, "float32")
    assert [tuple(g["layers"]) for g in record["groups"]] == list(t_model.feature_groups())
    for g in record["groups"]:
        assert sum(g["alpha"]) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(jax.nn.softmax(jnp.array(g["beta"])), g["alpha"], rtol=1e-5)
        # Searched: the last map's lead moved from 4 by Adam steps of beta_lr (1e-3) each, not
        # by rounding (a beta step of a rate ~0 moved it too).
        assert abs((g["beta"][1] - g["beta"][0]) - 4.0) > 1e-4, g["beta"]
    history = json.load(open(os.path.join(workdir, "search", "alpha_history.json")))
    assert [(h["group"], h["epoch"]) for h in history] == [
        (g, e) for g in (1, 2, 3) for e in (0, 1)
    ]
    for h in history[::2]:  # Epoch 0: the start, softmax([0, 4]).
        np.testing.assert_allclose(
            [h[f"alpha/g{h['group']}/{j}"] for j in (0, 1)], jax.nn.softmax(jnp.array([0.0, 4.0]))
        )
    for name in ("alpha_heatmap.png", "search/alpha_trajectories.png", "search_split.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    on_disk = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(on_disk["stages"]) == {
        "teacher",
        "search",
        "distill/dfa",
        "distill/none",
    }
    for name in ("distill/dfa", "distill/none"):
        assert 0.0 <= on_disk["stages"][name]["best_accuracy"] <= 1.0
    assert summary["stages"]["search"]["alpha"] == {
        f"g{g['group']}": g["alpha"] for g in record["groups"]
    }
    # Every group's teacher-to-student path accuracy, steps and time; the unqualified keys are
    # the last group's, the steps and time the whole search's.
    searched = on_disk["stages"]["search"]
    groups = [
        json.load(open(os.path.join(workdir, "search", f"g{g}", "result.json"))) for g in (1, 2, 3)
    ]
    for g, result in zip((1, 2, 3), groups):
        by_group = searched["by_group"][f"g{g}"]
        assert by_group["ts_path_best_accuracy"] == result["best_accuracy"]
        assert by_group["ts_path_last_accuracy"] == result["last_accuracy"]
        assert {k: by_group[k] for k in ("steps", "wall_time_s", "best_epoch")} == {
            k: result[k] for k in ("steps", "wall_time_s", "best_epoch")
        }
    assert searched["ts_path_best_accuracy"] == groups[-1]["best_accuracy"]
    assert searched["steps"] == sum(r["steps"] for r in groups)
    assert searched["wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in groups))
    assert searched["seed"] == config.seed
    # The printed results table has a row for the search: that accuracy, its time.
    (row,) = [r for r in reporting.results_table(on_disk["stages"]).splitlines() if "search" in r]
    last = 100 * groups[-1]["last_accuracy"]
    assert row.startswith("| search (last group's teacher-to-student path) |")
    assert f"| {last:.2f} | 3 x 1 | {searched['wall_time_s']:.0f} |" in row
    # The history's rows: the group's own alpha and beta, the start's beta [0, 4].
    for h in history:
        keys = {f"{k}/g{h['group']}/{j}" for k in ("alpha", "beta") for j in (0, 1)}
        assert set(h) == {"group", "epoch"} | keys, h
    assert [history[0]["beta/g1/0"], history[0]["beta/g1/1"]] == [0.0, 4.0]
    for h, g in zip(history[1::2], record["groups"]):
        assert [h[f"beta/g{g['group']}/{j}"] for j in (0, 1)] == pytest.approx(g["beta"], rel=1e-6)
    # benchmarks/search_dynamics reads the same alpha, and the forces on beta, from the records.
    dynamics = search_dynamics.group_dynamics(workdir)
    assert [d["group"] for d in dynamics] == [1, 2, 3]
    steps = json.load(open(os.path.join(workdir, "search", "g1", "result.json")))["steps"]
    for d, g in zip(dynamics, record["groups"]):
        np.testing.assert_allclose(d["alpha_start"], jax.nn.softmax(jnp.array([0.0, 4.0])))
        np.testing.assert_allclose(d["alpha_epochs"][-1], g["alpha"], rtol=1e-6)
        assert d["steps"] == steps and len(d["beta_grad"]) == len(d["beta_l2_pull"]) == 2
        assert d["beta_start"] == [0.0, 4.0] and d["beta_end"] == g["beta"]
        # The coupled L2 pulls the last map's logit (4) harder than the first's (near 0).
        assert d["beta_l2_pull"][1] > d["beta_l2_pull"][0] > 0
        # Two maps: the loss's gradients on the two logits are opposite (softmax's), signed.
        np.testing.assert_allclose(d["beta_grad_signed"][0], -d["beta_grad_signed"][1], rtol=1e-4)
    assert "mean dL/dbeta, signed" in search_dynamics.table(dynamics)
    # The group-end account (`search.group_dynamics`) agrees with the benchmark's own reading
    # of the records: the loss's mean push on the last map's lead is minus its gradient's.
    for d, g in zip(dynamics, record["groups"]):
        explained = searched["by_group"][f"g{d['group']}"]
        signed = d["beta_grad_signed"]
        assert explained["lead_push_loss"] == pytest.approx(-(signed[1] - signed[0]), rel=1e-6)
        # The L2 pulls the lead (4 at the start) toward 0, uniform alpha.
        assert explained["lead_push_l2"] < 0
        assert explained["last_map_lead"] == pytest.approx([4.0, g["beta"][1] - g["beta"][0]])
        np.testing.assert_allclose(explained["alpha_end"], g["alpha"])
        # One epoch per group: its move is the whole move.
        assert explained["last_epoch_alpha_change"] == pytest.approx(explained["alpha_change"])


def _logged_alpha_table(messages, heading):
    """The alpha table logged after `heading`: {layer name: alpha} of every group."""
    (message,) = [m for m in messages if m.startswith(heading)]
    table = {}
    for line in message.splitlines()[1:]:
        for entry in line.split(": ", 1)[1].split(", "):
            name, value = entry.split()
            table[name] = float(value)
    return table


def test_search_resumes_to_identical_alpha(tmp_path, monkeypatch):
    """Also: a group's search trains only the student and that group's connectors; the other
    groups' connectors (BN included) enter their own search exactly as initialised; the search
    logs every group's real alpha at its start and its end."""
    # What the search logs, whatever another test left the logging configuration at.
    messages, real_info = [], search.logging.info
    monkeypatch.setattr(
        search.logging,
        "info",
        lambda msg, *args, **kw: (
            messages.append(str(msg) % args if args else str(msg)) or real_info(msg, *args, **kw)
        ),
    )
    config = load_config("demo", "tiny")
    config.stages = ("teacher", "search")
    config.search.epochs_per_group = 2
    straight = str(tmp_path / "straight")
    states = {}
    real_run = train_loop.run

    def keeping_states(stage, config, mesh):
        if stage.name == "search/g1":  # The search's step-0 state (read before it is donated).
            states["init"] = jax.device_get((stage.state.params, stage.state.batch_stats))
        result = real_run(stage, config, mesh)
        states[stage.name] = jax.device_get((result["state"].params, result["state"].batch_stats))
        return result

    monkeypatch.setattr(train_loop, "run", keeping_states)
    # Which epochs of each split's shuffled stream the stages read.
    streams, real_batches = {}, loader.train_batches

    def recording(examples, batch_size, seed, epoch, start_batch=0, rows=None):
        streams.setdefault((len(examples.labels), seed), []).append(epoch)
        return real_batches(examples, batch_size, seed, epoch, start_batch, rows)

    monkeypatch.setattr(loader, "train_batches", recording)
    pipeline.run(config, straight)
    monkeypatch.setattr(train_loop, "run", real_run)
    monkeypatch.setattr(loader, "train_batches", real_batches)
    # The three groups read one stream of the search's training part (epochs 0-5, two each) and
    # one of its held-out part (for beta; smaller, so more of its epochs), each epoch once, as
    # one data loader over the search would; not the first group's epochs three times over.
    data = inputs.load(config, straight, search=True)
    assert streams[(len(data.search_train.labels), config.seed)] == list(range(6)), streams
    val_epochs = streams[(len(data.search_val.labels), config.seed + 1)]
    assert val_epochs == list(range(len(val_epochs))), streams
    start = _logged_alpha_table(messages, "[search] alpha at the start")
    end = _logged_alpha_table(messages, "[search] alpha at the end")
    record = search.alpha_record_from_file(os.path.join(straight, search.ALPHA_FILE))
    for group in record:
        # softmax([0, ..., 0, init_last_logit]) over the group's maps, in NumPy.
        logits = np.zeros(len(group["layers"]))
        logits[-1] = config.search.init_last_logit
        expected = np.exp(logits) / np.exp(logits).sum()
        for name, a0, a in zip(group["layers"], expected, group["alpha"]):
            assert start[name] == pytest.approx(a0, abs=5e-4), name
            assert end[name] == pytest.approx(a, abs=5e-4), name
    assert start != end  # The search moved alpha.
    for group in record:  # One line per group: alpha, the last map's lead, forces, settling.
        (line,) = [m for m in messages if m.startswith(f"[search] g{group['group']}: alpha ")]
        beta = np.asarray(group["beta"])
        lead = f"{config.search.init_last_logit:.3f} -> {beta[-1] - beta[:-1].mean():.3f}"
        assert "/".join(f"{a:.3f}" for a in group["alpha"]) in line.split(" -> ")[1], line
        assert f"the last map's lead beta_last - mean(others) {lead};" in line, line
        assert re.search(r"mean push on the lead: bridge loss [-+]\d\.\d\de-\d\d", line), line
        assert re.search(r"; the last epoch moved .*: (settled|still moving)$", line), line
    init = states["init"]
    for searched, untouched in (("g1", ("g2", "g3")), ("g2", ("g3",))):
        params, stats = states[f"search/{searched}"]
        for part in ("st", "ts"):
            for tree, tree0 in ((params, init[0]), (stats, init[1])):
                for g in untouched:
                    jax.tree.map(np.testing.assert_array_equal, tree[part][g], tree0[part][g])
            moved = jax.tree.map(
                lambda a, b: not np.array_equal(a, b),
                params[part][searched],
                init[0][part][searched],
            )
            assert all(jax.tree.leaves(moved)), (searched, part)  # The searched one trained.

    # The resumed run starts from the straight run's finished teacher (its stage is skipped), so
    # both search from the same teacher and only the search is run again.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(
        straight, resumed, ignore=shutil.ignore_patterns("search", "alpha*", "summary.json")
    )
    real_save = checkpointing.Checkpointer.save

    def crash_in_group_2(self, step, state, meta):
        real_save(self, step, state, meta)
        if os.sep + os.path.join("search", "g2") in self.directory:
            self.wait()
            raise KeyboardInterrupt("simulated crash in the search of group 2")

    monkeypatch.setattr(checkpointing.Checkpointer, "save", crash_in_group_2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config, resumed)
    monkeypatch.setattr(checkpointing.Checkpointer, "save", real_save)
    assert not os.path.exists(os.path.join(resumed, "alpha.json"))
    del messages[:]
    pipeline.run(config, resumed)
    # Group 2 resumed from its checkpoint at step 3 of 4; group 1 was read back at its end.
    resumes = [m.split(" (")[0] for m in messages if "resuming" in m]
    assert resumes == ["[search/g1] resuming from step 4/4", "[search/g2] resuming from step 3/4"]

    def read(workdir, name):
        with open(os.path.join(workdir, name)) as f:
            return f.read()

    assert read(straight, "alpha.json") == read(resumed, "alpha.json")
    assert read(straight, "search/alpha_history.json") == read(resumed, "search/alpha_history.json")


@pytest.mark.parametrize(
    "alpha, why",
    [
        ([float("nan"), 1.0], "summing to 1"),
        ([0.5, 0.55], "summing to 1"),
        ([0.2, 0.3, 0.5], "one number per layer"),
        ([True, False], "one number per layer"),
    ],
)
def test_alpha_file_of_unusable_weights_is_refused(tmp_path, alpha, why):
    """NaN (json writes and reads it), a sum off by 5%, a number more than the group's maps,
    JSON true/false (Python's bools are ints: they would pass as 1 and 0)."""
    t_model, _ = tiny_models()
    groups = search.alpha_record(t_model, search.init_beta(t_model, 1.0))
    groups[1]["alpha"] = alpha
    path = tmp_path / "alpha.json"
    path.write_text(json.dumps({"teacher": "wrn_16_1", "groups": groups}))
    with pytest.raises(alpha_file.AlphaFileError, match=f"group 2's alpha .*{why}"):
        alpha_file.load(str(path), t_model)


def test_results_table_gives_best_then_last_and_each_seed():
    stages = {
        "teacher": {
            "best_accuracy": 0.9,
            "best_epoch": 7,
            "last_accuracy": 0.8,
            "epochs": 10,
            "wall_time_s": 12.4,
        },
        "search": {
            "ts_path_best_accuracy": 0.5,
            "ts_path_last_accuracy": 0.4,
            "groups": 3,
            "epochs_per_group": 2,
            "wall_time_s": 30.0,
            "by_group": {"g3": {"best_epoch": 1}},
        },
        "distill/dfa/seed1": {
            "best_accuracy": 0.7,
            "best_epoch": 3,
            "last_accuracy": 0.6,
            "epochs": 5,
        },
    }
    assert reporting.results_table(stages).splitlines()[2:] == [
        "| teacher | 90.00 | 7 | 80.00 | 10 | 12 |",
        "| search (last group's teacher-to-student path) | 50.00 | 1 | 40.00 | 3 x 2 | 30 |",
        "| student + DFA (seed 1) | 70.00 | 3 | 60.00 | 5 | - |",
    ]


def test_alpha_plots_draw_each_groups_alpha_and_its_change(tmp_path, monkeypatch):
    """The heatmap's cells are each group's alpha in the teacher's map order (blank past a
    group's maps); the trajectories are the change from the start, epochs in order, on an axis
    fitted to the largest change."""
    figures = []
    monkeypatch.setattr(reporting, "_save_png", lambda fig, path: figures.append(fig))
    record = [
        {"group": 1, "layers": ["g1_b1", "g1_b2"], "alpha": [0.2, 0.8]},
        {"group": 2, "layers": ["g2_b1", "g2_b2", "g2_b3"], "alpha": [0.1, 0.3, 0.6]},
    ]
    reporting.plot_alpha_heatmap(record, str(tmp_path / "heatmap.png"))
    grid = np.ma.filled(figures[0].axes[0].images[0].get_array().astype(float), np.nan)
    np.testing.assert_allclose(grid, [[0.2, 0.8, np.nan], [0.1, 0.3, 0.6]])
    history = [
        {"group": 1, "epoch": 1, "alpha/g1/0": 0.25, "alpha/g1/1": 0.75},
        {"group": 1, "epoch": 0, "alpha/g1/0": 0.3, "alpha/g1/1": 0.7},
        {"group": 2, "epoch": 0, "alpha/g2/0": 0.2, "alpha/g2/1": 0.3, "alpha/g2/2": 0.5},
        {"group": 2, "epoch": 1, "alpha/g2/0": 0.1, "alpha/g2/1": 0.3, "alpha/g2/2": 0.6},
    ]
    reporting.plot_alpha_trajectories(history, record, str(tmp_path / "trajectories.png"))
    first, second = figures[1].axes
    np.testing.assert_allclose(first.lines[0].get_ydata(), [0.0, -0.05])
    np.testing.assert_allclose(
        [l.get_ydata() for l in second.lines[:3]], [[0, -0.1], [0, 0], [0, 0.1]], atol=1e-12
    )
    np.testing.assert_allclose(first.get_ylim(), (-0.11, 0.11))
    assert reporting.change_axis_limit([]) == 1e-3


@pytest.mark.parametrize("w_schedule", ["global", "per_group"])
def test_the_searchs_w_rate_is_the_cosine_over_the_search_splits_steps(tmp_path, w_schedule):
    """The rate w's optimizer applies, and each group's logged 'lr', at each group's first and
    last step: the cosine over the steps of the search's training part (7/10 of the training
    set, not all of it), over the whole search or restarted per group (NumPy); each group's
    batches continue the earlier groups' stream."""
    config = load_config("demo", "tiny")
    config.search.w_schedule = w_schedule
    mesh = parallel.make_mesh()
    data = inputs.load(config, str(tmp_path), search=True)
    built = search.build(config, mesh, data)
    steps_per_epoch = len(data.search_train.labels) // config.search.batch_size
    assert built.steps_per_epoch == steps_per_epoch < len(data.train.labels) // 16
    per_group = config.search.epochs_per_group * steps_per_epoch
    total = built.num_groups * per_group
    w = {"w": jnp.zeros(3)}
    for group in range(1, built.num_groups + 1):
        stage = search.build_group_stage(
            built, config, mesh, data, str(tmp_path), group, built.state
        )
        assert stage.data_steps_before == (group - 1) * per_group
        for s in (0, per_group - 1):
            count = (group - 1) * per_group + s  # The optimizer's count runs over the search.
            t, n = (s, per_group) if w_schedule == "per_group" else (count, total)
            expected = config.search.w_lr * 0.5 * (1 + np.cos(np.pi * t / n))
            assert float(stage.lr_fn(s)) == pytest.approx(expected, rel=1e-5, abs=1e-8)
            # w's optimizer at that count: fresh momentum, zero weights (no decay), gradient 1.
            opt = jax.tree.map(
                lambda x: jnp.full_like(x, count) if jnp.issubdtype(x.dtype, jnp.integer) else x,
                built.w_tx.init(w),
            )
            update, _ = built.w_tx.update({"w": jnp.ones(3)}, opt, w)
            assert -float(update["w"][0]) == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_a_students_rate_decays_at_its_milestone_epochs(tmp_path, monkeypatch):
    """The rate the distillation's optimizer applies (and logs) falls by `decay` at each
    milestone epoch of the training set's batches: x0.2 at epochs 2 and 3 (NumPy)."""
    from dfa_jax import distill  # pylint: disable=g-import-not-at-top
    from dfa_jax import optimizers  # pylint: disable=g-import-not-at-top

    config = load_config("demo", "tiny")
    optim = config.distill.optim
    optim.schedule, optim.milestones, optim.decay, optim.epochs = "step", (2, 3), 0.2, 4
    optim.nesterov = False  # A fresh momentum's first update is then -rate * gradient.
    made, real_sgd = [], optimizers.sgd
    monkeypatch.setattr(
        optimizers, "sgd", lambda *a, **k: made.append(real_sgd(*a, **k)) or made[-1]
    )
    mesh = parallel.make_mesh()
    data = inputs.load(config, str(tmp_path), search=False)
    teacher_vars = teacher_lib.init_variables(distill.pair_of(config, data).teacher, 0, mesh)
    stage = distill.build_stage(
        config, mesh, data, str(tmp_path), teacher_vars, [("none", config.seed)]
    )
    (tx,) = made
    steps_per_epoch = len(data.train.labels) // optim.batch_size
    w = {"w": jnp.zeros(3)}
    for count, rate in (
        (2 * steps_per_epoch - 1, optim.lr),
        (2 * steps_per_epoch, 0.2 * optim.lr),
        (3 * steps_per_epoch, 0.04 * optim.lr),
    ):
        assert float(stage.lr_fn(count)) == pytest.approx(rate, rel=1e-6)
        opt = jax.tree.map(
            lambda x: jnp.full_like(x, count) if jnp.issubdtype(x.dtype, jnp.integer) else x,
            tx.init(w),
        )
        update, _ = tx.update({"w": jnp.ones(3)}, opt, w)
        assert -float(update["w"][0]) == pytest.approx(rate, rel=1e-6), count


def test_group_dynamics_weights_rows_by_their_steps_and_reads_the_last_epochs_move():
    """`search.group_dynamics` (search/result.json's by_group): rows at steps 2, 3, 4 average 2,
    1 and 1 steps, so the mean push is over steps, not rows; the last epoch's move is from the
    previous epoch's alpha (not the start's), and decides 'settled' (NumPy)."""

    def softmax(b):
        e = np.exp(np.asarray(b, np.float64))
        return (e / e.sum()).tolist()

    start = {"group": 1, "beta": [0.0, 4.0], "alpha": softmax([0.0, 4.0])}
    end = {"group": 1, "beta": [0.5, 3.0], "alpha": softmax([0.5, 3.0])}

    def train(step, g, l2):
        return {
            "step": step,
            **{f"train/beta_grad_signed/{j}": (-g, g)[j] for j in (0, 1)},
            **{f"train/val/beta_l2_grad/{j}": (0.0, l2)[j] for j in (0, 1)},
        }

    middle = [0.07, 0.93]
    rows = [
        train(2, 1.0, 0.1),
        {"epoch": 1, "step": 2, "alpha/g1/0": middle[0], "alpha/g1/1": middle[1]},
        train(3, 4.0, 0.4),
        train(4, 4.0, 0.4),
        {"epoch": 2, "step": 4, "alpha/g1/0": end["alpha"][0], "alpha/g1/1": end["alpha"][1]},
    ]
    d = search.group_dynamics(start, end, rows)
    signed = (2 * 1.0 + 4.0 + 4.0) / 4  # The step-weighted mean of the last map's gradient.
    assert d["lead_push_loss"] == pytest.approx(-2 * signed)  # lead = g_1 - g_0 = 2 g.
    assert d["lead_push_l2"] == pytest.approx(-(2 * 0.1 + 0.4 + 0.4) / 4)
    whole = np.abs(np.subtract(end["alpha"], start["alpha"])).max()
    last = np.abs(np.subtract(end["alpha"], middle)).max()
    assert d["alpha_change"] == pytest.approx(whole)
    assert d["last_epoch_alpha_change"] == pytest.approx(last)
    assert d["settled"] == (last <= whole / 2) and d["settled"]


@pytest.mark.parametrize("method", ["ft", "ab"])
def test_a_methods_first_stage_sees_the_runs_batches_whatever_the_students_seed(
    tmp_path, monkeypatch, method
):
    """A student of seed 4 in a run of seed 0: its FT paraphraser / AB initialisation stage draws
    the batches and augmentation of the run's seed, as the distillation does, so students of
    several seeds differ in their initialisation alone."""
    from dfa_jax import bilevel, distill, train_loop  # pylint: disable=g-import-not-at-top

    config = load_config("demo", "tiny")
    config.distill.method = method
    assert config.seed == 0
    step_seeds, stage_seeds = [], []
    real_step = bilevel.make_bilevel_step

    def recording_step(*args, **kwargs):
        step_seeds.append(kwargs["seed"])
        return real_step(*args, **kwargs)

    class Stop(Exception):
        pass

    def stop(stage, *args, **kwargs):
        stage_seeds.append(stage.seed)
        raise Stop

    monkeypatch.setattr(bilevel, "make_bilevel_step", recording_step)
    monkeypatch.setattr(train_loop, "run", stop)
    mesh = parallel.make_mesh()
    data = inputs.load(config, str(tmp_path), search=False)
    pair = distill.pair_of(config, data)
    teacher_vars = teacher_lib.init_variables(pair.teacher, 0, mesh)
    with pytest.raises(Stop):
        distill.student_start(
            config, str(tmp_path), mesh, data, teacher_vars, pair, method, 4, None
        )
    assert stage_seeds == [0] and step_seeds == [0]
