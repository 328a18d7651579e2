"""The shared loop on a tiny teacher: learning, resume exactness, the non-finite guard, skipping,
checkpoint atomicity, and 1-device == 2-device steps."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from dfa_jax import bilevel
from dfa_jax import checkpointing
from dfa_jax import config_lib
from dfa_jax import errors
from dfa_jax import evaluation
from dfa_jax import inputs
from dfa_jax import optimizers
from dfa_jax import parallel
from dfa_jax import pipeline
from dfa_jax import scalar_writer
from dfa_jax import teacher
from dfa_jax import train_loop
from dfa_jax.data import loader

from test_config import load_config

# benchmarks/ holds scripts run from the repository root, outside the installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import layout_agreement  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_demo(**overrides):
    config = load_config("demo", "tiny")
    config.stages = ("teacher",)  # The loop under test; the demo's later stages have their own.
    config.teacher.optim.epochs = 3
    config.data.max_train_examples = 96
    config.data.max_test_examples = 48
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def final_params(workdir):
    config = tiny_demo()
    model = teacher.build_model(config.teacher.model, 10, "float32")
    return teacher.load_variables(workdir, model, parallel.make_mesh())


def test_tiny_teacher_learns_and_writes_outputs(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    # As if killed at the end: the TensorBoard files are never closed (kept open, not collected),
    # so what they hold is what the loop flushed as it went.
    unclosed = []
    monkeypatch.setattr(scalar_writer.ScalarWriter, "close", lambda writer: unclosed.append(writer))
    # Where the processes meet, and whether the stage's result.json was on disk by then: with
    # several processes only process 0 writes it, and the others read it next.
    meetings, real_sync = [], parallel.sync

    def recording_sync(tag):
        meetings.append((tag, os.path.exists(os.path.join(workdir, "teacher", "result.json"))))
        real_sync(tag)

    monkeypatch.setattr(parallel, "sync", recording_sync)
    config = tiny_demo(
        **{
            "teacher.optim.epochs": 6,
            "teacher.optim.schedule": "constant",
            "data.max_train_examples": 192,
            # The end-of-stage checkpoint only: each save costs several steps' time.
            "checkpoint_every_steps": 1000,
        }
    )
    summary = pipeline.run(config, workdir)
    assert ("teacher: results written", True) in meetings, meetings
    rows = read_jsonl(os.path.join(workdir, "teacher", "metrics.jsonl"))
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train[-1] < 0.8 * train[0], train
    tests = [r for r in rows if "test/accuracy" in r]
    assert [r["epoch"] for r in tests] == list(range(1, 7))
    result = summary["stages"]["teacher"]
    assert result["best_accuracy"] == max(r["test/accuracy"] for r in tests)
    assert result["last_accuracy"] == tests[-1]["test/accuracy"]
    assert result["best_accuracy"] > 0.15  # 10 classes: chance is 0.1.
    on_disk = json.load(open(os.path.join(workdir, "summary.json")))
    assert on_disk["stages"]["teacher"]["best_accuracy"] == result["best_accuracy"]
    assert os.path.exists(os.path.join(workdir, "teacher", "variables"))
    # TensorBoard shows what metrics.jsonl records: every scalar at its step.
    events = event_accumulator.EventAccumulator(os.path.join(workdir, "teacher"))
    events.Reload()
    for tag in ("train/loss", "train/lr", "test/accuracy"):
        logged = [(r["step"], r[tag]) for r in rows if tag in r]
        shown = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in shown] == [s for s, _ in logged], tag
        np.testing.assert_allclose([v for _, v in shown], [v for _, v in logged], rtol=1e-6)
    assert all("train/images_per_s" in r for r in rows if "train/loss" in r)
    assert unclosed
    for writer in unclosed:
        writer._records.close()  # pylint: disable=protected-access


def test_progress_leaves_saves_out_of_images_per_s_and_counts_evaluations_in_its_eta(
    tmp_path, monkeypatch, caplog
):
    """On a clock that stands still while steps run, a checkpoint's save takes 1000 s and an
    epoch's evaluation 100 s: no images/s row may count the save (the interval after a save
    starts when it ends), and the ETA counts the evaluations still to come."""
    clock = [0.0]
    monkeypatch.setattr(train_loop, "time", types.SimpleNamespace(time=lambda: clock[0]))
    real_save = checkpointing.Checkpointer.save

    def slow_save(self, *args, **kwargs):
        clock[0] += 1000.0
        return real_save(self, *args, **kwargs)

    real_make_eval_fn = evaluation.make_model_eval_fn

    def slow_make_eval_fn(*args, **kwargs):
        eval_fn = real_make_eval_fn(*args, **kwargs)

        def slow_eval(variables):
            clock[0] += 100.0
            return eval_fn(variables)

        return slow_eval

    monkeypatch.setattr(checkpointing.Checkpointer, "save", slow_save)
    monkeypatch.setattr(evaluation, "make_model_eval_fn", slow_make_eval_fn)
    caplog.set_level("INFO")
    workdir = str(tmp_path / "run")
    # 3 epochs of 6 steps; a row every step, a checkpoint every second step.
    pipeline.run(tiny_demo(log_every_steps=1, checkpoint_every_steps=2), workdir)
    rows = read_jsonl(os.path.join(workdir, "teacher", "metrics.jsonl"))
    speeds = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r]
    assert len(speeds) == 17 and min(speeds) > 1e6  # Only steps ran between clock readings.
    eta = {}
    for record in caplog.records:
        found = re.search(r"\[teacher\] step (\d+)/18 .* ETA (\S+)", record.getMessage())
        if found:
            eta[int(found.group(1))] = found.group(2)
    assert [eta[s] for s in (5, 7, 12, 13, 18)] == [
        "0:00:00",  # No epoch has ended yet: its cost is unknown.
        "0:03:20",  # The ends of epochs 2 and 3 to come, at 100 s each.
        "0:03:20",  # Epoch 2's end runs after its last step's row.
        "0:01:40",
        "0:01:40",
    ]


def test_search_and_distillation_get_the_best_epoch_teacher(tmp_path, monkeypatch, caplog):
    """teacher.distill_from: 'best' hands the later stages the variables of the epoch of highest
    test accuracy (first of equals), exported when that epoch ended; 'last' the final ones."""
    accuracies = iter([0.5, 0.9, 0.9])  # Epoch 2 is the best; epoch 3 only equals it.
    evaluated = []  # The variables each epoch's evaluation saw, on the host.
    real_make = evaluation.make_model_eval_fn

    def make_scripted(*args, **kwargs):
        real_eval = real_make(*args, **kwargs)

        def scripted(variables):
            evaluated.append(jax.tree.map(np.asarray, variables))
            return real_eval(variables) | {"accuracy": next(accuracies)}

        return scripted

    monkeypatch.setattr(evaluation, "make_model_eval_fn", make_scripted)
    config = tiny_demo()  # 3 epochs.
    workdir = str(tmp_path / "run")
    mesh = parallel.make_mesh()
    data = inputs.load(config, workdir, search=False)
    result, handed_on = teacher.run(config, workdir, mesh, data)
    assert len(evaluated) == 3 and result["best_epoch"] == 2
    assert result["distill_from"] == "best"
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, handed_on), evaluated[1])
    with pytest.raises(AssertionError):  # The epochs differ: the check above can tell them apart.
        jax.tree.map(np.testing.assert_array_equal, evaluated[1], evaluated[2])

    # A finished stage hands on the same; 'last' gives the final variables; a workdir given as
    # teacher.checkpoint supplies the one distill_from names.
    model = teacher.build_model(config.teacher.model, 10, "float32")
    for distill_from, epoch in (("best", 2), ("last", 3)):
        config.teacher.distill_from = distill_from
        _, done = teacher.run(config, workdir, mesh, data)
        jax.tree.map(
            np.testing.assert_array_equal, jax.tree.map(np.asarray, done), evaluated[epoch - 1]
        )
        source = teacher.resolve_checkpoint(workdir, best=distill_from == "best")
        loaded = teacher.load_variables(source, model, mesh)
        jax.tree.map(
            np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), evaluated[epoch - 1]
        )
    # A run given that workdir as teacher.checkpoint distils from the same teacher as it would.
    monkeypatch.setattr(evaluation, "make_model_eval_fn", real_make)
    config.teacher.checkpoint = workdir
    for distill_from, epoch in (("best", 2), ("last", 3)):
        config.teacher.distill_from = distill_from
        result, reused = teacher.run(config, str(tmp_path / "reuse"), mesh, data)
        assert os.path.basename(result["loaded_from"]) == (
            teacher.BEST_VARIABLES_DIR if distill_from == "best" else teacher.VARIABLES_DIR
        )
        jax.tree.map(
            np.testing.assert_array_equal, jax.tree.map(np.asarray, reused), evaluated[epoch - 1]
        )
    config.teacher.checkpoint = None

    # A finished stage of an older version (no best_variables/), copied into a workdir: its last
    # epoch, said and recorded, as for the same teacher given as teacher.checkpoint.
    shutil.rmtree(os.path.join(workdir, "teacher", teacher.BEST_VARIABLES_DIR))
    config.teacher.distill_from = "best"
    with caplog.at_level(logging.WARNING, logger="absl"):
        older, done = teacher.run(config, workdir, mesh, data)
    assert older["distill_from"] == "last" and "has no best_variables" in caplog.text
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, done), evaluated[2])


@pytest.mark.parametrize(
    "stages, ran",
    [
        (("teacher", "search", "distill"), ["search", "distill"]),
        (("teacher", "search"), ["search"]),
    ],
)
def test_the_search_then_the_distillation_get_the_teacher_stages_variables(
    stages, ran, tmp_path, monkeypatch
):
    """pipeline.run hands the variables the teacher stage returns, unchanged, to the search and
    then to the distillation (in that order: the distillation reads the alpha the search wrote),
    each stage once and only the stages asked for. (The stages themselves are stand-ins here:
    only the hand-over is under test.)"""
    from dfa_jax import distill, reporting, search  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(0)
    handed = {"params": {"w": rng.normal(size=(3, 4)).astype(np.float32)}, "batch_stats": {}}
    done = {"best_accuracy": 0.5, "last_accuracy": 0.5, "epochs": 1}
    calls = []

    def stage(name, result):
        def run(config, workdir, mesh, data, teacher_vars):
            calls.append((name, jax.tree.map(np.asarray, teacher_vars)))
            return result

        return run

    monkeypatch.setattr(teacher, "run", lambda *a: ({"stage": "teacher", **done}, handed))
    monkeypatch.setattr(search, "run", stage("search", {"stage": "search", **done}))
    monkeypatch.setattr(distill, "run_all", stage("distill", {"distill/dfa": done}))
    monkeypatch.setattr(search, "alpha_record_from_file", lambda path: [])
    monkeypatch.setattr(reporting, "alpha_table", lambda record: "")
    summary = pipeline.run(tiny_demo(stages=stages), str(tmp_path / "run"))
    assert [name for name, _ in calls] == ran
    for _, received in calls:
        jax.tree.map(np.testing.assert_array_equal, received, handed)
    expected = {"teacher", "search"} | ({"distill/dfa"} if "distill" in ran else set())
    assert set(summary["stages"]) == expected


def test_an_input_error_in_the_prefetching_thread_reaches_the_consumer():
    """A read error while the background thread gathers the next batch is raised where the
    batches are consumed, after the batches before it: never a stream that silently ends early,
    which a training loop would take for the end of its epochs."""
    mesh = parallel.make_mesh()

    def batches():
        yield {"x": np.arange(4, dtype=np.float32)}
        raise OSError("read failed")

    for size in (0, 2):
        got = []
        with pytest.raises(OSError, match="read failed"):
            for batch in parallel.prefetch_to_mesh(batches(), mesh, size):
                got.append(np.asarray(batch["x"]))
        assert len(got) == 1
        np.testing.assert_array_equal(got[0], np.arange(4, dtype=np.float32))


def test_interrupted_run_resumes_to_identical_numbers(tmp_path, monkeypatch, caplog):
    config = tiny_demo()
    straight = str(tmp_path / "straight")
    pipeline.run(config, straight)

    # Crash right after the first checkpoint is on disk, then run the same command again.
    resumed = str(tmp_path / "resumed")
    real_save = checkpointing.Checkpointer.save

    def crash_after_save(self, step, state, meta):
        real_save(self, step, state, meta)
        self.wait()
        raise KeyboardInterrupt(f"simulated crash after step {step}")

    monkeypatch.setattr(checkpointing.Checkpointer, "save", crash_after_save)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config, resumed)
    monkeypatch.setattr(checkpointing.Checkpointer, "save", real_save)
    saved = checkpointing.Checkpointer(
        os.path.join(resumed, "teacher", "checkpoints"), 2
    ).latest_step()
    assert saved == config.checkpoint_every_steps
    assert not train_loop.is_done(os.path.join(resumed, "teacher"))
    caplog.set_level(logging.INFO, logger="absl")
    pipeline.run(config, resumed)
    # Resumed from the checkpoint, not retrained from step 0 (which would equal it as well).
    assert f"[teacher] resuming from step {saved}/" in caplog.text

    def comparable(workdir):
        result = train_loop.read_result(os.path.join(workdir, "teacher"))
        rows = read_jsonl(os.path.join(workdir, "teacher", "metrics.jsonl"))
        drop = ("train/images_per_s",)
        return (
            {k: v for k, v in result.items() if k != "wall_time_s"},
            [{k: v for k, v in r.items() if k not in drop} for r in rows],
        )

    assert comparable(straight) == comparable(resumed)
    jax.tree.map(np.testing.assert_array_equal, final_params(straight), final_params(resumed))


def test_finished_stage_is_skipped(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    config = tiny_demo(**{"teacher.optim.epochs": 1})
    first = pipeline.run(config, workdir)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(train_loop, "run", must_not_train)
    second = pipeline.run(config, workdir)
    assert second["stages"]["teacher"] == first["stages"]["teacher"]


def test_an_emptied_result_file_resumes_the_stage_from_its_last_checkpoint(tmp_path, caplog):
    """A result.json a host crash left empty: not a finished stage (its reader would fail on
    every rerun) but one whose last checkpoint is its last step: nothing is trained again and
    the result is written anew, equal to the first."""
    workdir = str(tmp_path / "run")
    config = tiny_demo(**{"teacher.optim.epochs": 1})
    first = pipeline.run(config, workdir)["stages"]["teacher"]
    result_path = os.path.join(workdir, "teacher", train_loop.RESULT_FILE)
    open(result_path, "w").close()
    again = pipeline.run(config, workdir)["stages"]["teacher"]
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    drop = ("wall_time_s",)
    assert {k: v for k, v in again.items() if k not in drop} == {
        k: v for k, v in first.items() if k not in drop
    }
    assert read_json(result_path)["best_accuracy"] == first["best_accuracy"]


def test_a_command_of_fewer_stages_keeps_what_earlier_ones_finished_in_the_summary(tmp_path):
    """An earlier command trained a KD student; this one runs the teacher stage alone: the
    summary (and the table printed) still holds the student, while its result is on disk."""
    workdir = str(tmp_path / "run")
    config = tiny_demo(**{"teacher.optim.epochs": 1})
    first = pipeline.run(config, workdir)
    kd = {"stage": "distill/kd", "best_accuracy": 0.5, "last_accuracy": 0.4, "epochs": 2}
    os.makedirs(os.path.join(workdir, "distill", "kd"))
    with open(os.path.join(workdir, "distill", "kd", train_loop.RESULT_FILE), "w") as f:
        json.dump(kd, f)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({**first, "stages": {**first["stages"], "distill/kd": kd}}, f)
    again = pipeline.run(config, workdir)
    assert again["stages"]["distill/kd"] == kd
    assert read_json(os.path.join(workdir, "summary.json"))["stages"]["distill/kd"] == kd
    # Trained again since (its directory deleted, as the design notes advise): today's numbers.
    retrained = {**kd, "last_accuracy": 0.45}
    with open(os.path.join(workdir, "distill", "kd", train_loop.RESULT_FILE), "w") as f:
        json.dump(retrained, f)
    assert pipeline.run(config, workdir)["stages"]["distill/kd"] == retrained
    os.remove(os.path.join(workdir, "distill", "kd", train_loop.RESULT_FILE))
    assert "distill/kd" not in pipeline.run(config, workdir)["stages"]


def test_non_finite_loss_stops_with_stage_and_step(tmp_path, monkeypatch):
    real_batches = loader.train_batches
    bad_step = 3  # 1-based step whose batch carries a NaN.

    def poisoned(examples, batch_size, seed, epoch, start_batch=0, rows=None):
        for i, batch in enumerate(
            real_batches(examples, batch_size, seed, epoch, start_batch, rows)
        ):
            if epoch == 0 and start_batch + i == bad_step - 1:
                image = batch["image"].astype(np.float32)
                image[0, 0, 0, 0] = np.nan
                batch = {**batch, "image": image}
            yield batch

    monkeypatch.setattr(loader, "train_batches", poisoned)
    config = tiny_demo(**{"log_every_steps": 100, "checkpoint_every_steps": 100})
    with pytest.raises(
        train_loop.NonFiniteError, match=rf"stage 'teacher'.*step {bad_step}\b"
    ) as e:
        pipeline.run(config, str(tmp_path / "run"))
    # No checkpoint yet to point to; the fix named; one `error:` line from main (an InputError).
    assert "no checkpoint was saved before it" in str(e.value)
    assert "--config.restart=True" in str(e.value) and "another --workdir" in str(e.value)
    assert "Lower teacher.optim.lr or check the input data" in str(e.value)
    assert isinstance(e.value, errors.InputError)
    # Each stage names its own fields.
    assert train_loop.rate_fields("search/g2").startswith("search.w_lr or search.beta_lr")
    assert train_loop.rate_fields("distill/ab/init") == "baselines.ab_init_lr"
    assert train_loop.rate_fields("distill/kd/seed1").startswith("distill.optim.lr")


def test_checkpoint_torn_write_leaves_previous_usable(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory, keep=2)
    state = {"w": jnp.arange(4.0)}
    ckpt.save(3, state, {"step": 3})
    ckpt.wait()
    # A save interrupted mid-write leaves only orbax's temporary directory behind.
    os.makedirs(os.path.join(directory, "6.orbax-checkpoint-tmp-1234", "state"))
    reopened = checkpointing.Checkpointer(directory, keep=2)
    assert reopened.latest_step() == 3
    restored, meta = reopened.restore(state)
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert meta == {"step": 3}


def _one_step(mesh):
    config = tiny_demo()
    model = teacher.build_model("wrn_10_1", 10, "float32")
    optim = config.teacher.optim
    tx = optimizers.sgd(optim, 4)
    variables = teacher.init_variables(model, 0, mesh)
    state = jax.jit(
        lambda v: bilevel.create_state(v["params"], v["batch_stats"], tx),
        out_shardings=parallel.replicated(mesh),
    )(variables)
    step = jax.jit(
        bilevel.make_bilevel_step(teacher.cross_entropy_loss_fn(model), tx, seed=0),
        donate_argnums=0,
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=8).astype(np.int32),
    }
    for _ in range(2):
        state, metrics = step(state, parallel.to_global(batch, mesh), None, None)
    return jax.device_get((state.params, state.batch_stats, metrics["loss"]))


# What the README promises across device and process layouts (1 or 2 devices, 1 or 2 processes)
# for the tiny runs of the tests: different compiled programs, so not bitwise, but within these
# of each other (`benchmarks/layout_agreement.py`, measured in BENCHMARKS.md, with a margin).
# 'first_step_loss': relative difference of the first step's train loss of a stage that starts
# from the same state (the teacher); 'loss': of any step's, any stage; 'alpha': absolute;
# 'parameters': ||a - b|| / ||b|| of a model's final parameters (and BN statistics) as one vector.
LAYOUT_TOLERANCE = {"first_step_loss": 1e-5, "loss": 2e-2, "alpha": 1e-3, "parameters": 2e-2}


def assert_within_layout_tolerance(difference: dict) -> None:
    """`difference`: `benchmarks.layout_agreement.compare`'s result for two layouts' runs."""
    for stage, rel in difference["loss_rel_diff"].items():
        if stage == "teacher":
            assert rel["first_step"] <= LAYOUT_TOLERANCE["first_step_loss"], (stage, rel)
        assert rel["all_steps"] <= LAYOUT_TOLERANCE["loss"], (stage, rel)
    assert difference.get("alpha_abs_diff", 0.0) <= LAYOUT_TOLERANCE["alpha"], difference
    for name, diff in difference["parameters"].items():
        assert diff["rel_l2"] <= LAYOUT_TOLERANCE["parameters"], (name, diff)


def test_one_device_and_two_devices_agree():
    """Two steps of the teacher's step: the parameters and BN statistics to the layout tolerance,
    the loss (of the second step) to the first step's."""
    assert jax.device_count() == 2
    one = _one_step(parallel.make_mesh(jax.devices()[:1]))
    two = _one_step(parallel.make_mesh(jax.devices()))

    flat = [dict(enumerate(np.asarray(x) for x in jax.tree.leaves(run[:2]))) for run in (one, two)]
    difference = layout_agreement.parameter_difference(*flat)
    assert difference["rel_l2"] <= LAYOUT_TOLERANCE["parameters"], difference
    assert float(one[2]) == pytest.approx(float(two[2]), rel=LAYOUT_TOLERANCE["first_step_loss"])


def test_teacher_stage_on_one_and_two_devices_agrees_to_the_stated_tolerance(tmp_path, monkeypatch):
    """The same config and seed on a 1-device and a 2-device mesh: the batches do not depend on
    the device count and BatchNorm sees global-batch statistics, so every step's loss and the
    final parameters agree to LAYOUT_TOLERANCE (not bitwise: two different programs)."""
    config = tiny_demo(**{"teacher.optim.epochs": 1, "log_every_steps": 1})
    two = str(tmp_path / "two")
    pipeline.run(config, two)
    real_make_mesh = parallel.make_mesh
    monkeypatch.setattr(parallel, "make_mesh", lambda: real_make_mesh(jax.devices()[:1]))
    one = str(tmp_path / "one")
    pipeline.run(config, one)
    difference = layout_agreement.compare(one, two)
    assert list(difference["loss_rel_diff"]) == ["teacher"]
    assert_within_layout_tolerance(difference)


def test_sgd_matches_pytorch_rule():
    """Coupled weight decay then (Nesterov) momentum, as torch.optim.SGD: NumPy re-derivation."""
    for nesterov in (False, True):
        optim = config_lib.optim_recipe("paper")
        optim.nesterov = nesterov
        tx = optimizers.sgd(optim, steps_per_epoch=10)
        w = jnp.array([1.0, -2.0])
        state = tx.init(w)
        w_np, buf = np.array([1.0, -2.0]), np.zeros(2)
        for g in ([0.5, 0.1], [-0.3, 0.2], [0.1, 0.1]):
            updates, state = tx.update(jnp.array(g), state, w)
            w = optax.apply_updates(w, updates)
            d = np.array(g) + 5e-4 * w_np
            buf = 0.9 * buf + d
            w_np = w_np - 0.1 * ((d + 0.9 * buf) if nesterov else buf)
        np.testing.assert_allclose(w, w_np, rtol=1e-6)


def test_step_schedule_decays_at_milestones():
    optim = config_lib.optim_recipe("paper")
    schedule = optimizers.lr_schedule(optim, steps_per_epoch=10)
    assert float(schedule(599)) == pytest.approx(0.1)
    assert float(schedule(600)) == pytest.approx(0.02)
    assert float(schedule(1200)) == pytest.approx(0.004)
    assert float(schedule(1600)) == pytest.approx(0.0008)


_PAGE_FAULTS_OF_REALLOCATION = """
import ctypes, resource, sys
from dfa_jax import parallel
if sys.argv[1] == "kept":
    assert parallel.keep_freed_host_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
for _ in range(3):  # The last round: a 64 MiB block freed before, allocated and written again.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(
    _transparent_huge_pages_always(),
    reason="transparent huge pages 'always': a fresh 64 MiB block faults in 2 MiB pages, so the"
    " 4 KiB fault count this measures is not there to save",
)
def test_freed_host_memory_is_reused_without_page_faults():
    """What main.py sets (config.keep_freed_host_memory): a step's buffers, freed and allocated
    again, reuse mapped pages instead of faulting every 4 KiB back in (16,384 for 64 MiB)."""

    def faults(mode):
        out = subprocess.run(
            [sys.executable, "-c", _PAGE_FAULTS_OF_REALLOCATION, mode],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return int(out.stdout.split()[-1])

    default = faults("default")
    if default < 16_000:  # Larger pages (multi-size THP, a hugetlb malloc): nothing to save.
        pytest.skip(f"this host faults a fresh 64 MiB in {default} faults, not in 4 KiB pages")
    assert faults("kept") < 1_000


def test_repeated_run_reuses_the_compilation_cache(tmp_path):
    """config.compilation_cache_dir: the first run stores its compiled steps there; a second run
    of the same config (another workdir) finds every one of them (nothing is written again) and
    reaches the same accuracy."""
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def run(workdir):
        command = [
            sys.executable,
            "-m",
            "dfa_jax.main",
            f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:tiny",
            f"--workdir={workdir}",
            "--config.stages=('teacher',)",
            "--config.num_cpu_devices=1",
            # The smallest WRN and one epoch: what is under test is the cache, not the training.
            "--config.teacher.model=wrn_10_1",
            "--config.teacher.optim.epochs=1",
            f"--config.compilation_cache_dir={cache}",
        ]
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        with open(workdir / "summary.json") as f:
            return json.load(f)

    def entries():  # name -> modification time: a recompiled step would be written again.
        return {name: os.stat(cache / name).st_mtime_ns for name in os.listdir(cache)}

    first = run(tmp_path / "a")
    stored = entries()
    assert any(name.startswith("jit_step-") for name in stored), sorted(stored)
    second = run(tmp_path / "b")
    assert entries() == stored
    for key in ("best_accuracy", "last_accuracy", "steps"):
        assert second["stages"]["teacher"][key] == first["stages"]["teacher"][key]


def test_metrics_in_a_bucket_are_written_at_most_every_few_seconds(tmp_path, monkeypatch):
    """An object store takes about one write a second per object: rows logged in quick
    succession wait (in memory) until the interval has passed or the loop flushes them (before
    a checkpoint, at an epoch's end, at the end); a local file gets every row at once."""
    path = str(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(train_loop.files, "is_remote", lambda p: True)
    # A stopped clock: a loaded host's pause between two lines is no passed interval.
    monkeypatch.setattr(train_loop.files.time, "monotonic", lambda: 1000.0)
    remote = train_loop._MetricsFile(path, resume_step=0)  # pylint: disable=protected-access
    remote.write({"step": 1, "train/loss": 2.0})
    remote.write({"step": 2, "train/loss": 1.5})
    assert [r["step"] for r in read_jsonl(path)] == [1]  # The second waits for the interval.
    remote.flush()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    monkeypatch.setattr(train_loop.time, "monotonic", lambda: 1e12)  # The interval has passed.
    remote.write({"step": 3, "train/loss": 1.0})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    monkeypatch.undo()
    local = train_loop._MetricsFile(str(tmp_path / "local.jsonl"), resume_step=0)
    for step in (1, 2):
        local.write({"step": step})
        assert read_jsonl(str(tmp_path / "local.jsonl"))[-1]["step"] == step


def test_tensorboard_in_a_bucket_shows_a_running_stage(tmp_path, monkeypatch):
    """A bucket's object appears only once written whole: the writer keeps the file in memory
    and writes it at a flush (at most every few seconds) and at close, so TensorBoard reads the
    scalars of a stage still running; in between the last write stands."""
    monkeypatch.setattr(scalar_writer.files, "is_remote", lambda p: True)
    monkeypatch.setattr(scalar_writer.files.time, "monotonic", lambda: 1000.0)  # A stopped clock.
    writer = scalar_writer.ScalarWriter(str(tmp_path))

    def shown():
        events = event_accumulator.EventAccumulator(str(tmp_path))
        events.Reload()
        tags = events.Tags()["scalars"]
        return [e.step for e in events.Scalars("train/loss")] if "train/loss" in tags else []

    writer.write_scalars(1, {"train/loss": 2.0})
    writer.flush()
    assert shown() == [1]
    writer.write_scalars(2, {"train/loss": 1.0})
    writer.flush()  # Within the interval: not written yet.
    assert shown() == [1]
    writer.flush(force=True)  # Before a checkpoint: at once.
    assert shown() == [1, 2]
    writer.write_scalars(3, {"train/loss": 0.5})
    writer.close()
    assert shown() == [1, 2, 3]


@pytest.mark.parametrize("name, lowered", [("tensorfloat32", "HIGH"), ("float32", "HIGHEST")])
def test_a_run_traces_at_its_matmul_precision(name, lowered, tmp_path, monkeypatch):
    """`config.matmul_precision` holds for everything a run traces (its steps, evaluations and
    helpers: the whole of `pipeline._run`): float32 convolutions lower with that precision, which
    a GPU computes as TF32 or full float32 and a TPU as three or six bfloat16 passes."""
    seen = []

    def traced(config, workdir, config_path):
        conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        text = jax.jit(conv).lower(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 5))).as_text()
        seen.append(re.findall(r"precision (\w+)>", text))
        return {}

    monkeypatch.setattr(pipeline, "_run", traced)
    config = tiny_demo()
    config.matmul_precision = name
    pipeline.run(config, str(tmp_path / "run"))
    assert seen == [[lowered, lowered]]
    config.matmul_precision = "bfloat16"
    with pytest.raises(errors.ConfigError, match="matmul_precision = 'bfloat16': use one of"):
        pipeline.run(config, str(tmp_path / "run"))


def test_two_writers_of_one_directory_in_one_second_keep_both_files(tmp_path, monkeypatch):
    """A stage stopped and run again in the same process within a second (a notebook, embedding
    code) opens a second writer in its directory: its file must not truncate the first's."""
    with monkeypatch.context() as patched:
        patched.setattr(scalar_writer.time, "time", lambda: 1000.0)  # One second for both.
        first = scalar_writer.ScalarWriter(str(tmp_path))
        first.write_scalars(1, {"train/loss": 2.0})
        first.close()
        second = scalar_writer.ScalarWriter(str(tmp_path))
        second.write_scalars(2, {"train/loss": 1.0})
        second.close()
    assert first.path != second.path
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


def test_a_torn_last_record_is_cut_even_when_no_step_is_dropped(tmp_path):
    """Killed mid-record right after its last checkpoint: nothing to drop but the torn bytes,
    which `truncate` removes as its docstring says (the file is then its whole records)."""
    writer = scalar_writer.ScalarWriter(str(tmp_path))
    writer.write_scalars(1, {"train/loss": 2.0})
    writer.close()
    with open(writer.path, "rb") as f:
        whole = f.read()
    with open(writer.path, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01")  # A record's first bytes.
    scalar_writer.truncate(str(tmp_path), 1)
    with open(writer.path, "rb") as f:
        assert f.read() == whole


def _counting_stage(directory, epochs=2, accuracies=None, best=None):
    """A stage of 16 examples in batches of 4 (4 steps per epoch) whose step's loss is the step's
    number (1, 2, ...): each logged row's mean is known by hand. Its 'lr' scalar is the step's
    0-based index, and its test accuracies are scripted."""

    def step(state, batch, val_batch, aux):
        del batch, val_batch, aux
        loss = (state.step + 1).astype(jnp.float32)
        return state.replace(step=state.step + 1), {
            "loss": loss,
            "grad_norm": loss,
            "finite": jnp.bool_(True),
        }

    mesh = parallel.make_mesh()
    examples = loader.ArrayExamples(np.zeros((16, 2, 2, 1), np.uint8), np.arange(16) % 2)
    state = jax.device_put(
        bilevel.create_state({"w": jnp.zeros(2)}, {}, optax.sgd(0.1)), parallel.replicated(mesh)
    )
    scripted = iter(accuracies or [])
    return train_loop.Stage(
        name="teacher",
        directory=directory,
        state=state,
        step_fn=parallel.jit_step(step, mesh),
        eval_fn=(lambda s: {"accuracy": next(scripted), "loss": 0.0}) if accuracies else None,
        best_fn=best,
        train_data=examples,
        epochs=epochs,
        batch_size=4,
        seed=0,
        lr_fn=lambda s: float(s),
    ), mesh


def test_each_row_is_the_mean_of_its_steps_and_the_rate_of_its_last_step(tmp_path):
    """Rows every 3 steps and at each epoch's end (4 steps): steps 1-3, 4, 5-6, 7-8, each row
    the mean of its steps' losses (by hand), its 'lr' that of its last step (0-based index)."""
    config = tiny_demo(log_every_steps=3, checkpoint_every_steps=1000)
    stage, mesh = _counting_stage(str(tmp_path / "stage"))
    train_loop.run(stage, config, mesh)
    rows = [r for r in read_jsonl(str(tmp_path / "stage" / "metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [3, 4, 6, 8]
    assert [r["train/loss"] for r in rows] == [2.0, 4.0, 5.5, 7.5]
    assert [r["train/lr"] for r in rows] == [2.0, 3.0, 5.0, 7.0]
    # The last step is checkpointed though 8 is no multiple of checkpoint_every_steps: a run
    # killed before its result.json is written retrains nothing.
    saved = checkpointing.Checkpointer(str(tmp_path / "stage" / "checkpoints"), 2)
    assert saved.latest_step() == 8
    saved.close()


def test_the_best_epoch_is_the_first_of_equal_accuracies(tmp_path):
    """Accuracies 0.3, 0.7, 0.7, 0.2: the best epoch is 2 (the first of equals), exported once,
    and the last accuracy is epoch 4's."""
    config = tiny_demo(checkpoint_every_steps=1000)
    exported = []
    stage, mesh = _counting_stage(
        str(tmp_path / "stage"), 4, [0.3, 0.7, 0.7, 0.2], lambda s, epoch: exported.append(epoch)
    )
    result = train_loop.run(stage, config, mesh)
    assert exported == [1, 2]
    best = (result["best_epoch"], result["best_accuracy"], result["last_accuracy"])
    assert best == (2, 0.7, 0.2)
