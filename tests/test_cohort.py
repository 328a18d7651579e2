"""Students that share the teacher (`cohort.py`, `distill.run_all`): one step trains several
students, each as it would train alone (to float tolerance: another program), with the
teacher's forward computed once; a run of several seeds keeps every student's records apart,
resumes exactly, and trains only what a finished run is missing."""

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_loop import read_jsonl, tiny_demo

from dfa_jax import (
    bilevel,
    cohort,
    config_lib,
    distill,
    errors,
    inputs,
    methods,
    optimizers,
    parallel,
    pipeline,
    preemption,
    train_loop,
)
from dfa_jax import teacher as teacher_lib
from dfa_jax.data import sources

# Different programs (K students in one step against one alone): float32 rounding differs.
STEP_TOLERANCE = 1e-4


def _tiny_step(label="average", batch_size=8):
    """`label`'s distillation step (DFA's aggregations with their frozen alpha) for WRN_16_1 ->
    WRN_10_1 on CIFAR shapes, a batch, the teacher's variables and a `state(seed)` maker."""
    config = config_lib.base_config()
    config.data.dataset = "cifar10"
    config.teacher.model, config.student.model = "wrn_16_1", "wrn_10_1"
    info = sources.DATASETS["cifar10"]
    mesh = parallel.make_mesh()
    pair = methods.Pair(
        teacher=teacher_lib.build_model("wrn_16_1", 10, "float32"),
        student=teacher_lib.build_model("wrn_10_1", 10, "float32"),
    )
    teacher_vars = teacher_lib.init_variables(pair.teacher, 7, mesh)
    tx = optimizers.sgd(config.distill.optim, 100)
    dfa = methods.method_of(label) == "dfa"
    alpha = methods.aggregation_alpha(label, pair.teacher, config, "") if dfa else None

    def state(seed):
        student = teacher_lib.init_variables(pair.student, seed, mesh)
        helpers, helper_stats = methods.init_helpers(label, pair, config, seed + 100, mesh)
        return bilevel.create_state(
            {"student": student["params"], **helpers},
            {"student": student["batch_stats"], **helper_stats},
            tx,
            methods.frozen_beta(alpha) if dfa else None,
        )

    step = bilevel.make_bilevel_step(
        methods.make_loss_fn(label, pair, config),
        tx,
        seed=0,
        preprocess_fn=inputs.make_train_preprocess(config.data, info),
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, (batch_size,)), jnp.int32),
    }
    return step, batch, teacher_vars, state


def _compiled(step_fn, state, batch, teacher_vars):
    """`step_fn` jitted as the stages jit it (state donated and replicated), compiled once for
    `state`'s layout, and the number of convolutions in its program."""
    mesh = parallel.make_mesh()
    state = jax.device_put(state, parallel.replicated(mesh))
    compiled = parallel.jit_step(step_fn, mesh).lower(state, batch, None, teacher_vars).compile()
    return compiled, state, len(re.findall(r"= \S+ convolution\(", compiled.as_text()))


def test_cohort_step_trains_each_student_as_alone_and_the_teacher_once():
    """In both modes, per-step losses over three steps and the parameters after the first equal
    each student's own steps to float tolerance (vmap's grouped convolutions round differently;
    the differences then grow as training amplifies them, as across device counts)."""
    step, batch, teacher_vars, make_state = _tiny_step()
    seeds = (0, 1)
    # Made once per seed (each step gets its own placed or stacked copy to donate).
    states = {seed: make_state(seed) for seed in seeds}

    def state(seed):
        return jax.tree.map(jnp.copy, states[seed])

    alone = []
    for seed in seeds:
        # One program for both seeds: compiled for the first, called with the second's state.
        if not alone:
            alone_step, _, one = _compiled(step, state(seed), batch, teacher_vars)
        s = jax.device_put(state(seed), parallel.replicated(parallel.make_mesh()))
        losses, first = [], None
        for _ in range(3):
            s, metrics = alone_step(s, batch, None, teacher_vars)
            losses.append(float(metrics["loss"]))
            first = first or jax.device_get(s.params)
        alone.append((first, losses))

    for mode in cohort.MODES:
        cohort_step, stacked, two = _compiled(
            cohort.make_cohort_step(step, len(seeds), mode),
            cohort.stack([state(seed) for seed in seeds]),
            batch,
            teacher_vars,
        )
        losses, first = [], None
        for _ in range(3):
            stacked, metrics = cohort_step(stacked, batch, None, teacher_vars)
            assert metrics["loss"].shape == (len(seeds),)
            losses.append(np.asarray(metrics["loss"]))
            first = first or [jax.device_get(cohort.student(stacked, k).params) for k in (0, 1)]
        assert int(stacked.step) == 3
        for k, (alone_first, alone_losses) in enumerate(alone):
            # The first step's loss to float rounding; the later ones' differences grow as the
            # steps amplify them (vmap's grouped convolutions round otherwise: 1.7e-5 measured
            # by step 3 on one CPU, a CPU of other kernels may start from another rounding).
            np.testing.assert_allclose(
                losses[0][k], alone_losses[0], rtol=STEP_TOLERANCE, err_msg=mode
            )
            np.testing.assert_allclose(
                [l[k] for l in losses], alone_losses, rtol=10 * STEP_TOLERANCE, err_msg=mode
            )
            jax.tree.map(
                lambda a, b, mode=mode: np.testing.assert_allclose(a, b, atol=1e-4, err_msg=mode),
                first[k],
                alone_first,
            )
        assert not np.allclose(losses[-1][0], losses[-1][1])  # Another seed, another student.
        # The teacher's forward once: two students cost fewer convolutions than two steps.
        assert two < 2 * one, (mode, one, two)


def test_students_of_one_step_each_distill_toward_their_own_alpha():
    """Last and Average students of the same seed in one step (their aggregations share a
    method): each one's loss is its own alpha's, as alone, and the two differ."""
    step, batch, teacher_vars, last_state = _tiny_step("last")
    _, _, _, average_state = _tiny_step("average")
    compiled, _, _ = _compiled(step, last_state(0), batch, teacher_vars)
    mesh = parallel.make_mesh()
    alone = []
    for state in (last_state(0), average_state(0)):
        _, metrics = compiled(
            jax.device_put(state, parallel.replicated(mesh)), batch, None, teacher_vars
        )
        alone.append(float(metrics["loss"]))
    assert abs(alone[0] - alone[1]) > 100 * STEP_TOLERANCE * abs(alone[0])  # Tells them apart.
    together, stacked, _ = _compiled(
        cohort.make_cohort_step(step, 2, "loop"),
        cohort.stack([last_state(0), average_state(0)]),
        batch,
        teacher_vars,
    )
    _, metrics = together(stacked, batch, None, teacher_vars)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), alone, rtol=STEP_TOLERANCE)


def test_loop_mode_traces_the_students_step_once_and_reads_out_each_student():
    """'loop' calls one traced student step K times (tracing a model per student would cost
    seconds each), and `student_variables` gives student k's own params and BN statistics."""
    traces = []

    def step(state, scale, val_batch, aux):
        del val_batch, aux
        traces.append(1)  # Python runs here only while jit traces.
        params = jax.tree.map(lambda w: w * scale, state.params)
        return state.replace(step=state.step + 1, params=params), {
            "loss": jnp.sum(params["student"]["w"])
        }

    states = [
        bilevel.create_state(
            {"student": {"w": jnp.full((3,), float(k))}},
            {"student": {"mean": jnp.full((2,), -float(k))}},
            optax.sgd(0.1),
        )
        for k in range(3)
    ]
    stepped, metrics = jax.jit(cohort.make_cohort_step(step, 3, "loop"))(
        cohort.stack(states), 2.0, None, None
    )
    assert len(traces) == 1
    np.testing.assert_array_equal(metrics["loss"], [0.0, 6.0, 12.0])
    for k in range(3):
        mine = cohort.student_variables(stepped, k)
        np.testing.assert_array_equal(mine["params"]["w"], np.full((3,), 2.0 * k))
        np.testing.assert_array_equal(mine["batch_stats"]["mean"], np.full((2,), -float(k)))


def test_a_step_of_several_methods_trains_each_student_as_alone_and_the_teacher_once():
    """DFA (frozen average alpha) and two KD students in one step (`cohort.Mixed`), in both
    modes: each student's per-step losses over three steps equal its own step's to float
    tolerance, and each has its method's metrics; in 'loop' mode the program computes the
    teacher's forward once for the three students of two methods."""
    dfa_step, batch, teacher_vars, dfa_state = _tiny_step("average")
    kd_step, _, _, kd_state = _tiny_step("kd")
    alone, convolutions = [], []
    for step, state, seeds in ((dfa_step, dfa_state, (0,)), (kd_step, kd_state, (0, 1))):
        # One program per method: compiled for its first seed, called with the others' states.
        compiled, _, count = _compiled(step, state(seeds[0]), batch, teacher_vars)
        for seed in seeds:
            s = jax.device_put(state(seed), parallel.replicated(parallel.make_mesh()))
            losses = []
            for _ in range(3):
                s, metrics = compiled(s, batch, None, teacher_vars)
                losses.append(float(metrics["loss"]))
            alone.append(losses)
            convolutions.append(count)
    teacher = teacher_lib.build_model("wrn_16_1", 10, "float32")
    forward = jax.jit(lambda v, x: teacher.apply(v, x, train=False))
    teacher_convolutions = len(
        re.findall(
            r"= \S+ convolution\(",
            forward.lower(teacher_vars, jnp.zeros((8, 32, 32, 3))).compile().as_text(),
        )
    )

    places = ((0, 0), (1, 0), (1, 1))  # (method, student) of DFA and the two KD students.
    for mode in cohort.MODES:
        mixed = cohort.make_mixed_step(
            [cohort.make_cohort_step(dfa_step, 1, mode), cohort.make_cohort_step(kd_step, 2, mode)]
        )
        state = cohort.Mixed(
            (cohort.stack([dfa_state(0)]), cohort.stack([kd_state(0), kd_state(1)]))
        )
        compiled, state, count = _compiled(mixed, state, batch, teacher_vars)
        losses = []
        for _ in range(3):
            state, metrics = compiled(state, batch, None, teacher_vars)
            losses.append([float(cohort.scalars(metrics, *place)["loss"]) for place in places])
        assert [int(group.step) for group in state.groups] == [3, 3]
        assert "fd_loss" in metrics[0] and "kd_loss" not in metrics[0], mode
        assert "kd_loss" in metrics[1] and "fd_loss" not in metrics[1], mode
        np.testing.assert_allclose(np.transpose(losses), alone, rtol=STEP_TOLERANCE, err_msg=mode)
        if mode == "loop":
            # The separate steps' convolutions but two of the three teacher forwards.
            assert count <= sum(convolutions) - 2 * teacher_convolutions, (count, convolutions)


def _cohort_config(seeds, **overrides):
    """The tiny demo's teacher, then Last, Average and KD students for each of `seeds`."""
    return tiny_demo(
        **{
            "stages": ("teacher", "distill"),
            "distill.aggregation": "last",
            "distill.compare_with": ("average", "kd"),
            "distill.seeds": seeds,
            "checkpoint_every_steps": 1000,
            **overrides,
        }
    )


def _losses(directory):
    return [
        r["train/loss"]
        for r in read_jsonl(os.path.join(directory, "metrics.jsonl"))
        if "train/loss" in r
    ]


def _records(directory):
    return [
        {k: v for k, v in r.items() if k != "train/images_per_s"}
        for r in read_jsonl(os.path.join(directory, "metrics.jsonl"))
    ]


def _record_training(monkeypatch) -> list:
    """The students each distillation step trains from now on, in calls' order: a cohort's list
    of (label, seed), or a (label, seed) trained alone."""
    trained = []
    real_cohort, real_alone = distill.run_cohort, distill.run

    def recording_cohort(config, workdir, mesh, data, teacher_vars, students):
        trained.append(list(students))
        return real_cohort(config, workdir, mesh, data, teacher_vars, students)

    monkeypatch.setattr(distill, "run_cohort", recording_cohort)
    monkeypatch.setattr(
        distill, "run", lambda *a, **k: trained.append(a[5:]) or real_alone(*a, **k)
    )
    return trained


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory, tiny_demo_teacher):
    """Last, Average and KD, seeds 0 and 1: six students of two methods in one step, from a copy
    of conftest's finished tiny demo teacher (this config's teacher), its config left out."""
    workdir = str(tmp_path_factory.mktemp("cohort") / "run")
    ignore = shutil.ignore_patterns("summary.json", "config.json", "config_hash")
    shutil.copytree(tiny_demo_teacher, workdir, ignore=ignore)
    summary = pipeline.run(_cohort_config((0, 1)), workdir)
    return workdir, summary


def test_several_seeds_keep_every_students_records_apart(cohort_run, tmp_path):
    workdir, summary = cohort_run
    labels = ("last", "average", "kd")
    names = [f"distill/{label}/seed{seed}" for label in labels for seed in (0, 1)]
    assert [n for n in summary["stages"] if n.startswith("distill/")] == names
    for name in names:
        directory = os.path.join(workdir, name)
        with open(os.path.join(directory, "result.json")) as f:
            assert json.load(f)["stage"] == name
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(directory))
        assert len(_losses(directory)) > 0
        # Its own method's metrics: DFA's feature loss, KD's logit loss.
        keys, kd = set().union(*_records(directory)), name.startswith("distill/kd/")
        assert ("train/kd_loss" in keys) == kd and ("train/fd_loss" in keys) != kd, (name, keys)
        # Its final variables, for `dfa_jax.interop export` (the checkpoint is the cohort's).
        assert os.path.isdir(os.path.join(directory, "variables"))
    # One stage's time for the six of them (the results table shows it for each).
    assert len({summary["stages"][name]["wall_time_s"] for name in names}) == 1
    # One checkpoint for the six of them.
    cohorts = os.listdir(os.path.join(workdir, "distill", "cohorts"))
    assert len(cohorts) == 1
    assert os.listdir(os.path.join(workdir, "distill", "cohorts", cohorts[0], "checkpoints"))
    seed0, seed1 = (_losses(os.path.join(workdir, f"distill/last/seed{s}")) for s in (0, 1))
    assert seed0 != seed1

    # Last and KD of seed 1 each trained alone (one seed: today's layout, distill/<label>) to
    # float tolerance.
    alone = str(tmp_path / "alone")
    shutil.copytree(workdir, alone, ignore=shutil.ignore_patterns("distill", "summary.json"))
    config = _cohort_config(
        (1,), **{"distill.compare_with": ("kd",), "distill.max_students_per_step": 1}
    )
    pipeline.run(config, alone)
    student = teacher_lib.build_model(config.student.model, 10, "float32")
    mesh = parallel.make_mesh()
    for label in ("last", "kd"):
        np.testing.assert_allclose(
            _losses(os.path.join(alone, "distill", label)),
            _losses(os.path.join(workdir, f"distill/{label}/seed1")),
            rtol=STEP_TOLERANCE,
            err_msg=label,
        )
        # Each cohort student exports (and is evaluated with) its own variables: seed 1's are
        # the ones seed 1 trained alone to, within float tolerance, far from seed 0's.
        exported = {
            where: _flat(
                teacher_lib.load_variables(
                    os.path.join(where, teacher_lib.VARIABLES_DIR), student, mesh
                )["params"]
            )
            for where in (
                os.path.join(alone, "distill", label),
                os.path.join(workdir, f"distill/{label}/seed1"),
                os.path.join(workdir, f"distill/{label}/seed0"),
            )
        }
        own, cohort_seed1, cohort_seed0 = exported.values()
        assert np.linalg.norm(cohort_seed1 - own) < 1e-2 * np.linalg.norm(own), label
        assert np.linalg.norm(cohort_seed0 - own) > 0.1 * np.linalg.norm(own), label
        # A student trained alone records its seed, as a cohort's students do.
        with open(os.path.join(alone, "distill", label, distill.STUDENT_FILE)) as f:
            assert json.load(f) == {"label": label, "seed": 1}
    # Every result carries its seed (the one-seed layout's name does not say it).
    assert [summary["stages"][name]["seed"] for name in names] == [0, 1] * len(labels)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_adding_a_seed_trains_only_the_missing_students(cohort_run, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    shutil.copytree(cohort_run[0], workdir)
    trained = _record_training(monkeypatch)
    before = {s: _records(os.path.join(workdir, f"distill/last/seed{s}")) for s in (0, 1)}
    summary = pipeline.run(_cohort_config((0, 1, 2)), workdir)
    assert trained == [[("last", 2), ("average", 2), ("kd", 2)]]
    assert len([n for n in summary["stages"] if n.startswith("distill/")]) == 9
    for s in (0, 1):
        assert _records(os.path.join(workdir, f"distill/last/seed{s}")) == before[s]


def test_a_student_stopped_alone_resumes_alone_when_others_join_it(
    cohort_run, tmp_path, monkeypatch, caplog
):
    """A student checkpointed by a command that trained it alone (the only student) resumes from
    its checkpoint, alone, when the next command adds students it would otherwise share a step
    with; only the new ones share one."""
    workdir = str(tmp_path / "run")
    ignore = shutil.ignore_patterns("distill", "summary.json", "config.json", "config_hash")
    shutil.copytree(cohort_run[0], workdir, ignore=ignore)
    one = {"distill.compare_with": (), "distill.optim.epochs": 1}
    calls = []
    monkeypatch.setattr(preemption, "should_stop", lambda: calls.append(1) or len(calls) == 3)
    with pytest.raises(preemption.Stopped, match=r"at step 3/"):
        pipeline.run(_cohort_config((0,), **one), workdir)
    monkeypatch.setattr(preemption, "should_stop", lambda: False)
    trained = _record_training(monkeypatch)
    caplog.set_level(logging.INFO, logger="absl")
    pipeline.run(
        _cohort_config((0,), **{**one, "distill.compare_with": ("average", "kd")}), workdir
    )
    assert trained == [("last", 0), [("average", 0), ("kd", 0)]]
    assert re.search(r"\[distill/last\] resuming from step 3/", caplog.text)


def test_a_stopped_cohort_resumes_to_the_same_records(cohort_run, tmp_path, monkeypatch):
    """A stop request in the cohort's stage checkpoints all six students, of two methods, at one
    step; the same command resumes them to their uninterrupted records, bit for bit (the same
    program)."""
    straight = cohort_run[0]
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir, ignore=shutil.ignore_patterns("distill", "summary.json"))
    steps = []
    real_should_stop = preemption.should_stop

    def stop_at_cohort_step_3():
        steps.append(1)
        return len(steps) == 3

    monkeypatch.setattr(preemption, "should_stop", stop_at_cohort_step_3)
    with pytest.raises(preemption.Stopped, match=r"at step 3/"):
        pipeline.run(_cohort_config((0, 1)), workdir)
    monkeypatch.setattr(preemption, "should_stop", real_should_stop)
    pipeline.run(_cohort_config((0, 1)), workdir)
    for label in ("last", "average", "kd"):
        for seed in (0, 1):
            name = f"distill/{label}/seed{seed}"
            assert _records(os.path.join(workdir, name)) == _records(
                os.path.join(straight, name)
            ), name


def test_stopped_cohorts_resume_as_they_started(cohort_run, tmp_path, monkeypatch, caplog):
    """A cohort resumes with its own students in its own order (its `members.json`), not as
    what is left regrouped: a split cohort stopped in its second step (regrouped, KD's student
    would come first: another program, from step 0), and a finished cohort stopped between two
    of its students' results (regrouped, the student without one would train again alone)."""
    workdir = str(tmp_path / "run")
    # The finished teacher alone: these students train one epoch, another config than the run's.
    ignore = shutil.ignore_patterns("distill", "summary.json", "config.json", "config_hash")
    shutil.copytree(cohort_run[0], workdir, ignore=ignore)
    # Last, KD, Average and Random (one seed) in steps of two: [last, average], then
    # [random, kd] (DFA's aggregations side by side, methods in order of appearance; what is
    # left of the second, regrouped, would be [kd, random]).
    config = _cohort_config(
        (0,),
        **{
            "distill.compare_with": ("kd", "average", "random"),
            "distill.max_students_per_step": 2,
            "distill.optim.epochs": 1,
        },
    )
    second = [("random", 0), ("kd", 0)]
    steps_per_stage = 6  # 96 images in batches of 16, one epoch.
    calls = []
    real_should_stop = preemption.should_stop
    monkeypatch.setattr(
        preemption, "should_stop", lambda: calls.append(1) or len(calls) == steps_per_stage + 3
    )
    with pytest.raises(preemption.Stopped, match=r"at step 3/"):
        pipeline.run(config, workdir)
    monkeypatch.setattr(preemption, "should_stop", real_should_stop)

    trained = _record_training(monkeypatch)
    caplog.set_level(logging.INFO, logger="absl")
    pipeline.run(config, workdir)
    assert trained == [second]
    assert re.search(r"cohort of 2\] resuming from step 3/", caplog.text)

    # Stopped after the first of its results was written: the same cohort, from its final
    # checkpoint, writes the other; nothing trains again and the records stay as they were.
    records = {s: _records(os.path.join(workdir, f"distill/{s[0]}")) for s in second}
    results = {}
    for label, seed in second[1:]:
        path = os.path.join(workdir, f"distill/{label}", "result.json")
        with open(path) as f:
            results[label, seed] = json.load(f)
        os.remove(path)
    trained.clear()
    caplog.clear()
    pipeline.run(config, workdir)
    assert trained == [second]
    assert re.search(r"cohort of 2\] resuming from step 6/6", caplog.text)
    for label, seed in second:
        directory = os.path.join(workdir, f"distill/{label}")
        assert _records(directory) == records[label, seed]
        if (label, seed) in results:
            with open(os.path.join(directory, "result.json")) as f:
                rewritten = json.load(f)
            for key in ("best_accuracy", "best_epoch", "last_accuracy", "steps", "stage"):
                assert rewritten[key] == results[label, seed][key], key


def test_a_students_seed_stays_its_own_when_the_seeds_change(cohort_run, tmp_path):
    """A run of one seed lays its students out as distill/<label>/, which names no seed: asking
    for another single seed is refused (that student would be reported or resumed as the new
    seed's); asking for several moves each to distill/<label>/seed<s>/, where it counts as done;
    going back to one seed is refused."""
    straight = cohort_run[0]
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir, ignore=shutil.ignore_patterns("distill", "summary.json"))
    # A finished run of one seed, seed 1, as it lays out Last and KD.
    for label in ("last", "kd"):
        shutil.copytree(
            os.path.join(straight, "distill", label, "seed1"), workdir / "distill" / label
        )
        with open(workdir / "distill" / label / "student.json") as f:
            assert json.load(f) == {"label": label, "seed": 1}
    one = {"distill.compare_with": ("kd",)}
    with pytest.raises(errors.ConfigError, match=r"distill.seeds: .*'last' student of seed 1"):
        pipeline.run(_cohort_config((2,), **one), str(workdir))

    # As if stopped between the two renames of KD's move.
    os.rename(workdir / "distill" / "kd", workdir / "distill" / ".kd.seed1.moving")
    several = _cohort_config((0, 1), **one)
    distill.prepare_seed_layout(several, str(workdir))
    for label in ("last", "kd"):
        directory = distill.student_directory(str(workdir), several, label, 1)
        assert directory == str(workdir / "distill" / label / "seed1")
        assert train_loop.is_done(directory)
        assert train_loop.read_result(directory)["stage"] == f"distill/{label}/seed1"
        assert _records(directory) == _records(os.path.join(straight, f"distill/{label}/seed1"))
        assert not train_loop.is_done(distill.student_directory(str(workdir), several, label, 0))
    assert sorted(os.listdir(workdir / "distill")) == ["kd", "last"]

    with pytest.raises(errors.ConfigError, match=r"students of a run of several seeds \(seed1\)"):
        distill.prepare_seed_layout(_cohort_config((1,), **one), str(workdir))


def test_a_cohort_of_other_students_never_shares_a_checkpoint_directory():
    """A cohort's checkpoint directory is named by its students, seeds included: a stopped
    cohort of seeds (0, 1) is never resumed as the cohort of seeds (0, 2) that a changed
    distill.seeds groups, nor a cohort of the same labels in another order."""
    config = _cohort_config((0, 1, 2))
    cohorts = [
        [("last", 0), ("last", 1)],
        [("last", 0), ("last", 2)],
        [("last", 1), ("last", 0)],
        [("last", 0), ("average", 0)],
        [("last", 0), ("kd", 0)],
    ]
    directories = [distill.cohort_directory("/w", config, c) for c in cohorts]
    assert len(set(directories)) == len(cohorts)
    assert all(d.startswith("/w/distill/cohorts/") for d in directories)


def test_started_cohorts_resume_as_they_started_unless_one_of_their_students_is_not_wanted(
    tmp_path,
):
    """A cohort an earlier command started resumes with its students in its own order while this
    run still trains one of them; one holding a student this run no longer asks for (a label
    dropped from compare_with, a seed from distill.seeds), or none it has left to train, or more
    than distill.max_students_per_step, is left for its students to be regrouped."""
    config = _cohort_config((0, 1))
    workdir = str(tmp_path)
    started = [("kd", 0), ("last", 0), ("average", 0)]
    directory = distill.cohort_directory(workdir, config, started)
    os.makedirs(directory)
    with open(os.path.join(directory, distill.MEMBERS_FILE), "w") as f:
        json.dump({"students": [list(s) for s in started]}, f)
    every = [(label, seed) for seed in (0, 1) for label in ("last", "average", "kd")]
    assert distill.started_cohorts(config, workdir, every, every) == [started]
    assert distill.started_cohorts(config, workdir, every, [("average", 0)]) == [started]
    without_kd = [s for s in every if s[0] != "kd"]
    assert distill.started_cohorts(config, workdir, without_kd, without_kd) == []
    assert distill.started_cohorts(config, workdir, every, [("last", 1)]) == []
    config.distill.max_students_per_step = 2
    assert distill.started_cohorts(config, workdir, every, every) == []


def test_students_are_grouped_by_method_and_split_at_the_limit():
    """The students of every method but FT and AB (a first stage of their own: they train alone)
    share one step, each method's side by side (DFA's aggregations are one method), and
    `max_students_per_step` splits it."""
    config = _cohort_config((0, 1))
    todo = [(label, seed) for label in ("dfa", "last", "kd", "ft", "average") for seed in (0, 1)]
    dfa = [("dfa", 0), ("dfa", 1), ("last", 0), ("last", 1), ("average", 0), ("average", 1)]
    assert distill.cohorts(config, todo) == [
        [*dfa, ("kd", 0), ("kd", 1)],
        [("ft", 0)],
        [("ft", 1)],
    ]
    config.distill.max_students_per_step = 4
    assert distill.cohorts(config, todo) == [
        dfa[:4],
        [*dfa[4:], ("kd", 0), ("kd", 1)],
        [("ft", 0)],
        [("ft", 1)],
    ]


def test_the_non_finite_guard_names_the_student(cohort_run, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    shutil.copytree(
        cohort_run[0], workdir, ignore=shutil.ignore_patterns("distill", "summary.json")
    )
    real_start = distill.student_start

    def poisoned(config, workdir, mesh, data, teacher_vars, pair, label, seed, eval_student):
        params, *rest = real_start(
            config, workdir, mesh, data, teacher_vars, pair, label, seed, eval_student
        )
        if (label, seed) == ("kd", 1):  # One student of six, KD's second, diverges.
            params = jax.tree.map(lambda x: x * jnp.nan, params)
        return params, *rest

    monkeypatch.setattr(distill, "student_start", poisoned)
    with pytest.raises(
        train_loop.NonFiniteError, match=r"stage 'distill/kd/seed1': non-finite .* step 1\b"
    ) as error:
        pipeline.run(_cohort_config((0, 1)), workdir)
    # The students of its step stopped with it: named, with how to train them without it.
    _, together = str(error.value).split("The students trained in its step (")
    stopped, advice = together.split(") stopped with it")
    assert "distill/kd/seed0" in stopped.split(", ") and "distill/kd/seed1" not in stopped
    assert "leave it out of this command" in advice
