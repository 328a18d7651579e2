"""Nothing lost: a stop request checkpoints and resumes exactly, a damaged checkpoint falls back to
the previous one, a workdir of another config is refused, an unwritable workdir or a failing save
is a named error that leaves the last checkpoint intact."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from dfa_jax import checkpointing
from dfa_jax import config_lib
from dfa_jax import errors
from dfa_jax import inputs
from dfa_jax import pipeline
from dfa_jax import preemption
from dfa_jax import train_loop
from dfa_jax import workdir as workdir_lib
from dfa_jax.data import loader

from test_train_loop import final_params, read_jsonl, tiny_demo


def _comparable(workdir):
    result = train_loop.read_result(os.path.join(workdir, "teacher"))
    rows = read_jsonl(os.path.join(workdir, "teacher", "metrics.jsonl"))
    return (
        {k: v for k, v in result.items() if k != "wall_time_s"},
        [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in rows],
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted tiny teacher run (3 epochs of 6 steps, checkpoints every 3 steps)."""
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    pipeline.run(tiny_demo(), workdir)
    return workdir


@pytest.fixture
def signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    preemption.clear()
    yield
    preemption.clear()
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(
    straight, tmp_path, monkeypatch, signal_handlers, caplog
):
    preemption.install()
    real_batches = loader.train_batches

    def signalling(examples, batch_size, seed, epoch, start_batch=0, rows=None):
        for i, batch in enumerate(
            real_batches(examples, batch_size, seed, epoch, start_batch, rows)
        ):
            if epoch == 0 and start_batch + i == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # As a scheduler's preemption notice.
            yield batch

    monkeypatch.setattr(loader, "train_batches", signalling)
    workdir = str(tmp_path / "run")
    with pytest.raises(preemption.Stopped, match=r"SIGTERM in stage 'teacher' at step \d+/18") as e:
        pipeline.run(tiny_demo(), workdir)
    assert e.value.exit_code == 128 + signal.SIGTERM
    step = int(str(e.value).split(" at step ")[1].split("/")[0])
    assert 1 <= step < 18
    checkpoints = checkpointing.Checkpointer(os.path.join(workdir, "teacher", "checkpoints"), 2)
    assert checkpoints.latest_step() == step  # The step in flight was checkpointed.
    assert not train_loop.is_done(os.path.join(workdir, "teacher"))

    monkeypatch.setattr(loader, "train_batches", real_batches)
    preemption.clear()
    caplog.set_level(logging.INFO, logger="absl")
    pipeline.run(tiny_demo(), workdir)
    assert f"[teacher] resuming from step {step}/" in caplog.text  # Not retrained from 0.
    assert _comparable(workdir) == _comparable(straight)
    jax.tree.map(np.testing.assert_array_equal, final_params(straight), final_params(workdir))


def test_a_stop_request_is_acknowledged_at_once(signal_handlers, capfd):
    """The first SIGTERM or Ctrl-C says at once what will happen (the step in flight, or its
    compile, may take a while); a second Ctrl-C interrupts."""
    preemption.install()
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.should_stop()
    err = capfd.readouterr().err
    assert "SIGINT: stopping after the step in flight, with a checkpoint" in err
    assert "Ctrl-C again stops at once" in err
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    preemption.clear()
    os.kill(os.getpid(), signal.SIGTERM)
    err = capfd.readouterr().err
    assert "SIGTERM: stopping after" in err and "Ctrl-C" not in err


def test_a_stop_agreed_at_a_stages_last_step_stops_the_next_stage(monkeypatch, signal_handlers):
    """Several processes: JAX's preemption service agrees on one step; when it is a stage's last
    (which the loop finishes without stopping) every later step stops, in every process alike,
    so the next stage stops at its first step instead of running on until a hard kill."""
    monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
    agreed = preemption._steps_seen + 2  # pylint: disable=protected-access
    monkeypatch.setattr(
        preemption.multihost_utils, "reached_preemption_sync_point", lambda step: step == agreed
    )
    assert [preemption.should_stop() for _ in range(4)] == [False, True, True, True]
    assert preemption.requested_by() == "SIGTERM"


def test_a_stop_inside_a_logging_interval_resumes_to_the_same_records(
    straight, tmp_path, monkeypatch, signal_handlers, caplog
):
    """Stopped after step 1 of a 2-step logging interval: the first row after the resume averages
    a step kept in the checkpoint and one computed after it, and equals the uninterrupted run's
    row bit for bit (the mean's precision and order do not depend on where the values came
    from)."""
    calls = []

    def stop_after_step_1():
        calls.append(1)
        return True

    workdir = str(tmp_path / "run")
    real_should_stop = preemption.should_stop
    monkeypatch.setattr(preemption, "should_stop", stop_after_step_1)
    with pytest.raises(preemption.Stopped, match=r"at step 1/18"):
        pipeline.run(tiny_demo(), workdir)
    assert len(calls) == 1
    assert not os.path.exists(os.path.join(workdir, "teacher", "metrics.jsonl"))  # Nothing logged.
    monkeypatch.setattr(preemption, "should_stop", real_should_stop)
    caplog.set_level(logging.INFO, logger="absl")
    pipeline.run(tiny_demo(), workdir)
    assert "[teacher] resuming from step 1/" in caplog.text  # Not retrained from 0.

    resumed = _comparable(workdir)
    assert [r["step"] for r in resumed[1] if "train/loss" in r][0] == 2
    assert resumed == _comparable(straight)
    jax.tree.map(np.testing.assert_array_equal, final_params(straight), final_params(workdir))


def _tensorboard_rows(directory, purge):
    """Per tag, the (step, value) pairs TensorBoard's Python loader shows for `directory`, with
    its purging of restarted steps on or off (the Rust loader's is not documented)."""
    events = event_accumulator.EventAccumulator(directory, purge_orphaned_data=purge)
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def test_steps_logged_after_the_last_checkpoint_show_once_in_tensorboard_after_a_resume(
    straight, tmp_path, monkeypatch
):
    """Killed after logging steps 4-6 whose checkpoint never landed (and mid-way through a
    record): the resumed run logs them again, and TensorBoard shows every step once, with the
    uninterrupted run's value, as metrics.jsonl does — whether or not its loader purges."""
    real_save = checkpointing.Checkpointer.save

    def killed_before_step_6_lands(self, step, state, meta):
        if step == 6:
            raise KeyboardInterrupt("killed")
        real_save(self, step, state, meta)

    workdir = str(tmp_path / "run")
    monkeypatch.setattr(checkpointing.Checkpointer, "save", killed_before_step_6_lands)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(tiny_demo(), workdir)
    teacher_dir = os.path.join(workdir, "teacher")
    (killed_file,) = [n for n in os.listdir(teacher_dir) if "tfevents" in n]
    assert max(s for s, _ in _tensorboard_rows(teacher_dir, False)["train/loss"]) > 3
    with open(os.path.join(teacher_dir, killed_file), "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01")  # A record's first bytes.
    monkeypatch.setattr(checkpointing.Checkpointer, "save", real_save)
    pipeline.run(tiny_demo(), workdir)

    rows = read_jsonl(os.path.join(straight, "teacher", "metrics.jsonl"))
    expected = {
        tag: [(r["step"], np.float32(r[tag])) for r in rows if tag in r]
        for tag in {t for r in rows for t in r if t not in ("step", "epoch")}
    }
    for purge in (False, True):
        shown = _tensorboard_rows(teacher_dir, purge)
        assert sorted(shown) == sorted(expected)
        for tag, pairs in expected.items():
            if tag == "train/images_per_s":  # Timing: not on the row after a compile.
                continue
            assert [s for s, _ in shown[tag]] == [s for s, _ in pairs], (tag, purge)
            assert [v for _, v in shown[tag]] == [v for _, v in pairs], (tag, purge)


def _truncate_files(directory):
    """Cuts every data file of a finished checkpoint to a third, as a failing disk might."""
    for parent, _, names in os.walk(directory):
        for name in names:
            if name != "_CHECKPOINT_METADATA":
                path = os.path.join(parent, name)
                with open(path, "rb") as f:
                    data = f.read()
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 3])


def test_an_interval_whose_saved_rows_came_from_another_step_function_averages_common_keys():
    """A checkpoint keeps the unlogged rows of its interval; resumed by a step that logs other
    metrics (the code changed in between), the interval averages the keys every row has
    instead of failing on every resume."""
    saved = {"loss": 1.0, "beta_grad/0": 0.5, "finite": True}  # The old step's row.
    fetched = {"loss": 2.0, "alpha_entropy": 0.3, "finite": True}  # The new step's.
    assert train_loop._mean_metrics([saved, fetched]) == {"loss": 1.5}
    assert train_loop._mean_metrics([fetched]) == {"loss": 2.0, "alpha_entropy": 0.3}


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    stage = os.path.join(workdir, "teacher")
    os.remove(os.path.join(stage, "result.json"))
    checkpoints = os.path.join(stage, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    assert steps == [15, 18]
    _truncate_files(os.path.join(checkpoints, "18"))
    pipeline.run(tiny_demo(), workdir)
    assert "checkpoint step 18" in caplog.text and "unreadable" in caplog.text
    assert _comparable(workdir) == _comparable(straight)
    # Set aside, not deleted: an error that is no damage must not cost a checkpoint.
    (aside,) = os.listdir(checkpoints + checkpointing.UNREADABLE_SUFFIX)
    assert aside.startswith("18-") and f"moved it to {checkpoints}-unreadable/18-" in caplog.text


def test_no_readable_checkpoint_is_a_named_error(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory, keep=2)
    state = {"w": jax.numpy.arange(4.0)}
    ckpt.save(3, state, {"step": 3})
    ckpt.close()
    _truncate_files(os.path.join(directory, "3"))
    with pytest.raises(errors.CheckpointError, match=r"no readable checkpoint in .*ckpt"):
        checkpointing.Checkpointer(directory, keep=2).restore(state)


def test_a_restore_failing_everywhere_moves_nothing_and_a_later_run_resumes(tmp_path, monkeypatch):
    """A failure that is no damage (a device out of memory) on every checkpoint: nothing is set
    aside, the error is named, and the same command run again resumes from the newest (it
    used to move them all aside, and the next run retrained the stage from step 0)."""
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory, keep=2)
    for step in (3, 6):
        ckpt.save(step, {"w": jax.numpy.full(4, float(step))}, {"step": step})
    ckpt.close()
    like = {"w": jax.numpy.zeros(4)}

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.5GiB.")

    with monkeypatch.context() as patch:
        patch.setattr(ocp.CheckpointManager, "restore", out_of_memory)
        with pytest.raises(errors.CheckpointError) as error:
            checkpointing.Checkpointer(directory, keep=2).restore(like)
    assert "unreadable steps: [6, 3]" in str(error.value)
    assert "RESOURCE_EXHAUSTED" in str(error.value) and "Nothing was moved" in str(error.value)
    assert sorted(os.listdir(directory)) == ["3", "6"]
    assert not os.path.exists(directory + checkpointing.UNREADABLE_SUFFIX)
    state, meta = checkpointing.Checkpointer(directory, keep=2).restore(like)
    assert meta["step"] == 6 and float(state["w"][0]) == 6.0


def test_failing_save_is_a_named_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory, keep=2)
    state = {"w": jax.numpy.arange(4.0)}
    ckpt.save(3, state, {"step": 3})
    ckpt.wait()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(
        errors.WorkdirError, match=r"step 6 .*No space left.*previous checkpoint \(3\) is intact"
    ):
        ckpt.save(6, {"w": jax.numpy.arange(4.0) + 1}, {"step": 6})
    restored, meta = checkpointing.Checkpointer(directory, keep=2).restore(state)
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert meta == {"step": 3}


def test_a_failing_save_names_the_newest_intact_checkpoint(tmp_path, monkeypatch):
    """With steps 2 and 4 saved, a failing save of step 6 says step 4 (the one a resume takes)
    is intact, not the oldest kept."""
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=3)
    for step in (2, 4):
        ckpt.save(step, {"w": jax.numpy.arange(4.0) + step}, {"step": step})
    ckpt.wait()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    with pytest.raises(errors.WorkdirError, match=r"previous checkpoint \(4\) is intact"):
        ckpt.save(6, {"w": jax.numpy.arange(4.0)}, {"step": 6})


def test_a_background_save_that_failed_is_named_by_its_own_step(tmp_path, monkeypatch):
    """Saves finish in the background: a failure of step 4's, surfacing when step 6 is saved,
    is reported as step 4's (the one that failed), not as step 6's."""
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=3)
    ckpt.save(2, {"w": jax.numpy.arange(4.0)}, {"step": 2})
    ckpt.wait()
    ckpt.save(4, {"w": jax.numpy.arange(4.0) + 4}, {"step": 4})
    real_wait = ocp.CheckpointManager.wait_until_finished

    def fails_once(self):
        real_wait(self)
        monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", real_wait)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", fails_once)
    with pytest.raises(errors.WorkdirError, match=r"checkpoint of step 4 .*No space left"):
        ckpt.save(6, {"w": jax.numpy.arange(4.0) + 6}, {"step": 6})


def test_a_save_that_fills_the_disk_is_a_named_error(tmp_path):
    """What the storage really raises, not a stand-in OSError: tensorstore reports a failed write
    as a ValueError carrying the system's error number. A file-size limit stands in for a full
    disk (same report, 'File too large' for 'No space left on device'); a subprocess holds it."""
    directory = str(tmp_path / "ckpt")
    script = f"""
import resource, signal
import numpy as np
from dfa_jax import checkpointing, errors
ckpt = checkpointing.Checkpointer({directory!r}, keep=2)
weights = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
ckpt.save(3, {{"w": weights}}, {{"step": 3}})
ckpt.wait()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
try:
    ckpt.save(6, {{"w": weights + 1}}, {{"step": 6}})
    ckpt.wait()
except errors.WorkdirError as e:
    print("WorkdirError:", e)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert "WorkdirError: saving the checkpoint of step 6" in done.stdout, done.stderr[-2000:]
    assert "previous checkpoint (3) is intact" in done.stdout
    state = {"w": jax.numpy.zeros((256, 256))}
    restored, meta = checkpointing.Checkpointer(directory, keep=2).restore(state)
    assert meta == {"step": 3} and float(restored["w"][0, 0]) != 0


def test_a_checkpoint_of_other_arrays_is_named_and_left_where_it_is(tmp_path):
    """Another model's (or another code version's) checkpoint is no damage: the error names the
    differing arrays, and the checkpoint is not moved aside (the next command would otherwise
    start the stage over without a word)."""
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory, keep=2)
    ckpt.save(3, {"w": jax.numpy.zeros((4, 8)), "b": jax.numpy.zeros(2)}, {"step": 3})
    ckpt.close()
    like = {"w": jax.numpy.zeros((4, 16)), "c": jax.numpy.zeros(2)}
    with pytest.raises(errors.CheckpointError) as e:
        checkpointing.Checkpointer(directory, keep=2).restore(like)
    message = str(e.value)
    assert "w: (4, 8) saved, (4, 16) now" in message
    assert "c not in the checkpoint" in message and "b only in the checkpoint" in message
    assert os.listdir(directory) == ["3"]
    assert not os.path.exists(directory + checkpointing.UNREADABLE_SUFFIX)


def test_checkpoints_leave_the_preemption_agreement_to_the_loop(tmp_path, monkeypatch):
    """JAX's preemption service keeps the last step number any caller gave it: orbax's saves
    gave it the checkpoint's step (another count than the loop's after a resume), so a stop
    notice could agree on a step the loop never reached. Saving and restoring ask it nothing."""
    from jax.experimental import multihost_utils

    asked = []
    monkeypatch.setattr(
        multihost_utils, "reached_preemption_sync_point", lambda step: asked.append(step)
    )
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    state = {"w": jax.numpy.arange(4.0)}
    for step in (36, 37):
        ckpt.save(step, state, {"step": step})
    ckpt.close()
    checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=2).restore(state)
    assert asked == []


def test_workdir_of_another_config_is_refused_with_the_changed_fields(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_demo()
    workdir_lib.prepare(config, workdir)
    planted = epath.Path(workdir) / "teacher" / "checkpoints" / "3" / "state"
    planted.mkdir(parents=True)
    (planted / "data").write_bytes(b"weights")

    neutral = tiny_demo(**{"log_every_steps": 7, "checkpoint_every_steps": 9})
    workdir_lib.prepare(neutral, workdir)  # Logging and checkpoint frequency may change.

    changed = tiny_demo(**{"seed": 4, "teacher.optim.lr": 0.5})
    with pytest.raises(errors.WorkdirError) as e:
        workdir_lib.prepare(changed, workdir)
    message = str(e.value)
    assert "seed: 0 in the workdir, 4 now" in message and "teacher.optim.lr" in message
    assert "--config.restart=True" in message
    assert (planted / "data").read_bytes() == b"weights"
    saved = json.loads((epath.Path(workdir) / "config.json").read_text())
    assert saved["seed"] == 0  # The workdir still describes its own run.

    changed.restart = True
    workdir_lib.prepare(changed, workdir)
    previous = list((epath.Path(workdir) / "previous").iterdir())
    assert len(previous) == 1
    assert (
        previous[0] / "teacher" / "checkpoints" / "3" / "state" / "data"
    ).read_bytes() == b"weights"
    assert not (epath.Path(workdir) / "teacher").exists()
    assert json.loads((epath.Path(workdir) / "config.json").read_text())["seed"] == 4


def test_data_moved_elsewhere_or_another_eval_batch_resumes(tmp_path, caplog):
    """The data's location and the evaluation batch are not the run's protocol: a copy moved to
    another disk resumes (with a warning naming both places), as does a smaller eval batch."""
    workdir = str(tmp_path / "run")
    workdir_lib.prepare(tiny_demo(**{"data.data_dir": "/disk1/tfds"}), workdir)
    planted = epath.Path(workdir) / "teacher" / "checkpoints" / "3"
    planted.mkdir(parents=True)
    moved = tiny_demo(**{"data.data_dir": "/disk2/tfds", "data.eval_batch_size": 8})
    workdir_lib.prepare(moved, workdir)
    assert planted.exists() and not (epath.Path(workdir) / "previous").exists()
    (warning,) = [r.getMessage() for r in caplog.records if "data.data_dir" in r.getMessage()]
    assert "/disk1/tfds" in warning and "/disk2/tfds" in warning


def test_a_command_refused_before_any_stage_leaves_the_workdir_to_the_corrected_one(
    tmp_path, monkeypatch
):
    """A first command that fails a check after the workdir recorded its config (here: the
    data's check that a split fills one batch, which a dataset smaller than configured fails;
    validate catches what a cap alone makes too small): the corrected command is not refused as
    another config's run, and the refused command's search split goes with its config."""
    workdir = str(tmp_path / "run")
    refused = tiny_demo(**{"data.max_train_examples": 90, "stages": ("teacher", "search")})

    def too_few(config, data):
        raise errors.DataError("the train split has 90 examples, fewer than one batch")

    monkeypatch.setattr(inputs, "check_batch_sizes", too_few)
    with pytest.raises(errors.DataError, match="fewer than one"):
        pipeline.run(refused, workdir)
    monkeypatch.undo()
    assert os.path.exists(os.path.join(workdir, inputs.SPLIT_FILE))
    fixed = tiny_demo(**{"stages": ("teacher", "search")})
    workdir_lib.prepare(fixed, workdir)
    saved = json.loads((epath.Path(workdir) / "config.json").read_text())
    assert saved["data"]["max_train_examples"] == 96
    assert not os.path.exists(os.path.join(workdir, inputs.SPLIT_FILE))
    assert not os.path.exists(os.path.join(workdir, workdir_lib.PREVIOUS_DIR))


def test_an_empty_workdir_flag_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(errors.WorkdirError, match="--workdir is empty"):
            workdir_lib.prepare(tiny_demo(), empty)
    assert os.listdir(tmp_path) == []


def test_workdir_from_before_a_new_field_resumes_with_the_old_behaviour(tmp_path):
    """A config.json written before teacher.distill_from existed describes last-epoch teachers:
    the new default ('best') is a change, `--config.teacher.distill_from=last` resumes it."""
    workdir = tmp_path / "run"
    old = tiny_demo()
    workdir_lib.prepare(old, str(workdir))
    saved = json.loads((workdir / "config.json").read_text())
    del saved["teacher"]["distill_from"]
    (workdir / "config.json").write_text(json.dumps(saved))
    (workdir / "teacher").mkdir()  # A run of it started.

    with pytest.raises(errors.WorkdirError, match="teacher.distill_from: 'last' in the workdir"):
        workdir_lib.prepare(tiny_demo(), str(workdir))
    workdir_lib.prepare(tiny_demo(**{"teacher.distill_from": "last"}), str(workdir))
    assert not (workdir / "previous").exists()


def test_config_hash_ignores_result_neutral_fields():
    a = tiny_demo().to_dict()
    b = tiny_demo(**{"log_every_steps": 3, "num_cpu_devices": 1}).to_dict()
    c = tiny_demo(**{"seed": 9}).to_dict()
    assert workdir_lib.config_hash(a) == workdir_lib.config_hash(b) != workdir_lib.config_hash(c)
    assert set(config_lib.RESULT_NEUTRAL_FIELDS) <= set(config_lib.flatten(a))


def test_config_hash_depends_on_the_values_not_on_the_order_of_the_fields():
    """The same config with its fields (and its sections' fields) listed in another order, as
    a config read back from config.json has them (sorted), hashes the same."""

    def reversed_order(node):
        if isinstance(node, dict):
            return {k: reversed_order(node[k]) for k in reversed(list(node))}
        return node

    config = tiny_demo().to_dict()
    again = reversed_order(config)
    assert list(again) != list(config) and again == config
    assert workdir_lib.config_hash(again) == workdir_lib.config_hash(config)


def test_a_restart_keeps_the_lock_of_the_run_that_holds_it(tmp_path):
    """A restart moves the old run aside but leaves the lock file the running command holds:
    a second run of the workdir is still refused after it."""
    workdir = str(tmp_path / "run")
    workdir_lib.prepare(tiny_demo(), workdir)
    (epath.Path(workdir) / "teacher").mkdir()
    with workdir_lib.locked(workdir):
        workdir_lib.prepare(tiny_demo(seed=4, restart=True), workdir)
        with (
            pytest.raises(errors.WorkdirError, match="in use by another run"),
            workdir_lib.locked(workdir),
        ):
            pass


def test_the_lock_file_names_only_the_run_holding_it(tmp_path):
    """The lock file is rewritten whole by the run that takes it: a longer record left by an
    earlier run leaves no tail in the 'in use by' refusal."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / workdir_lib.LOCK_FILE).write_text("pid 4242424242 on " + "an-old-host" * 20)
    with workdir_lib.locked(str(workdir)):
        text = (workdir / workdir_lib.LOCK_FILE).read_text()
    assert re.fullmatch(rf"pid {os.getpid()} on \S+ since [0-9: -]+ UTC", text), text


def test_unwritable_or_full_workdir_is_a_named_error_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(errors.WorkdirError, match=r"cannot be written.*--workdir"):
        pipeline.run(tiny_demo(), str(blocker / "run"))

    real_write = epath.Path.write_bytes

    def full_disk(self, data):
        if ".write-probe-" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(type(epath.Path(str(tmp_path))), "write_bytes", full_disk)
    with pytest.raises(errors.WorkdirError, match="the disk is full"):
        pipeline.run(tiny_demo(), str(tmp_path / "full"))
    assert not (tmp_path / "full" / "teacher").exists()


def test_atomic_writes_reach_the_disk_before_they_replace_the_old_file(tmp_path, monkeypatch):
    """A host crash after the rename must not leave an empty file under the name: the new
    file's bytes are flushed (fsync) before the rename, and the rename itself after it."""
    from dfa_jax import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    path = tmp_path / "result.json"
    path.write_text("old")
    files.write_json_atomic(str(path), {"best_accuracy": 0.5})
    assert events == ["fsync", "replace", "fsync"]
    assert json.loads(path.read_text()) == {"best_accuracy": 0.5}
    assert os.listdir(tmp_path) == ["result.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_partial_copy(tmp_path, monkeypatch):
    """A full disk mid-write: the error reaches the caller, the old file stays, and the partial
    temporary copy goes (each failing retry left one more on the full disk)."""
    from dfa_jax import files

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "metrics.jsonl"
    path.write_text("old")
    monkeypatch.setattr(os, "fsync", disk_full)
    for _ in range(2):
        with pytest.raises(OSError, match="No space left"):
            files.write_text_atomic(str(path), "new" * 1000)
    assert os.listdir(tmp_path) == ["metrics.jsonl"] and path.read_text() == "old"


def test_a_failed_atomic_write_names_the_file_it_was_writing(tmp_path, monkeypatch):
    """A failing fsync reports no file: the error raised names the target (and so the disk
    that is full), with the system's error number kept."""
    from dfa_jax import files

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "result.json"
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as info:
        files.write_json_atomic(str(path), {"best_accuracy": 0.5})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)


def test_every_object_store_scheme_is_remote_and_a_local_path_is_made_absolute(tmp_path):
    """gs://, s3:// and other URL schemes are object stores (no atomic directory rename, no
    fsync, kept as given); a relative local path becomes absolute."""
    from dfa_jax import files

    for path in ("gs://bucket/run", "s3://bucket/run", "az://container/run"):
        assert files.is_remote(path) and files.absolute(path) == path, path
    assert not files.is_remote(str(tmp_path)) and not files.is_remote("runs/gs://x")
    assert files.absolute("runs/kd") == os.path.join(os.getcwd(), "runs/kd")


def test_a_workdir_in_use_by_another_run_is_refused_and_freed_when_it_ends(tmp_path):
    """A job submitted twice (or requeued while the first still runs) must not write the same
    checkpoints at once: while a run holds the workdir, another is refused with who holds it;
    the lock goes with the run (the kernel's: a kill -9 frees it too)."""
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dfa_jax import workdir as w\n"
            "with w.locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)",
            workdir,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            errors.WorkdirError, match=rf"in use by another run \(pid {holder.pid} on"
        ):
            pipeline.run(tiny_demo(), workdir)
        assert not os.path.exists(os.path.join(workdir, "config.json"))  # Nothing touched.
    finally:
        holder.kill()
        holder.wait()
    with workdir_lib.locked(workdir):  # Freed by the kill.
        with pytest.raises(errors.WorkdirError, match=rf"pid {os.getpid()} on"):
            with workdir_lib.locked(workdir):
                pass


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """NFS without its lock service (ENOLCK) or Lustre mounted noflock (ENOSYS): no lock to take,
    which is no reason to refuse the run (nor to name an old run's pid from the lock file)."""
    import fcntl

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / workdir_lib.LOCK_FILE).write_text("pid 4242 on oldhost since 2026-01-01")

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with workdir_lib.locked(str(workdir)):
        pass
    (warning,) = [r.getMessage() for r in caplog.records if "cannot be locked" in r.getMessage()]
    assert "No locks available" in warning and "4242" not in warning


def test_a_repeated_sigterm_does_not_interrupt_the_stop(signal_handlers):
    """A scheduler (or a user's second `kill`) may repeat SIGTERM within the grace period: only
    a second Ctrl-C interrupts at once; a second SIGTERM keeps the stop and its checkpoint."""
    preemption.install()
    os.kill(os.getpid(), signal.SIGTERM)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    except KeyboardInterrupt:
        pytest.fail("a second SIGTERM interrupted the run at once")
    assert preemption.should_stop() and preemption.requested_by() == "SIGTERM"


def test_a_ctrl_c_stop_exits_130():
    """A shell reads 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
    for name, status in (("SIGINT", 130), ("SIGTERM", 143)):
        assert preemption.Stopped(name, "teacher", 3, 18, "/w/teacher/checkpoints").exit_code == (
            status
        )


def test_an_agreed_stop_is_pending_until_cleared(monkeypatch, signal_handlers):
    """Several processes: a stop agreed by JAX's service is pending (main.py's 'came as the run
    finished' line reads it), and `clear` forgets the agreement as well as the request."""
    monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
    agreed = preemption._steps_seen + 1  # pylint: disable=protected-access
    monkeypatch.setattr(
        preemption.multihost_utils, "reached_preemption_sync_point", lambda step: step == agreed
    )
    assert preemption.should_stop()
    assert preemption.pending() == "SIGTERM"
    preemption.clear()
    assert preemption.pending() is None and not preemption.should_stop()


def test_saving_a_step_already_saved_keeps_the_first(tmp_path):
    """The loop saves at every checkpoint interval and at a stage's last step, which may be the
    same step (and a resumed run saves again what it restored): the second save is no error and
    leaves the checkpoint on disk as it was."""
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory, keep=2)
    ckpt.save(3, {"w": jax.numpy.full(4, 3.0)}, {"step": 3})
    ckpt.wait()
    ckpt.save(3, {"w": jax.numpy.full(4, -1.0)}, {"step": 3, "again": True})
    ckpt.close()
    reopened = checkpointing.Checkpointer(directory, keep=2)
    reopened.save(3, {"w": jax.numpy.full(4, -2.0)}, {"step": 3, "again": True})
    state, meta = reopened.restore({"w": jax.numpy.zeros(4)})
    reopened.close()
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(4, 3.0))
    assert meta == {"step": 3} and sorted(os.listdir(directory)) == ["3"]


def test_a_step_set_aside_as_unreadable_is_saved_again_when_the_run_reaches_it(tmp_path):
    """After the fallback past a damaged step 6, the resumed run saves step 6 anew: it lands on
    disk and is what the next restore reads (the manager forgets the step it set aside; else
    `save` takes step 6 for saved and skips it)."""
    directory = str(tmp_path / "ckpt")
    ckpt = checkpointing.Checkpointer(directory, keep=2)
    for step in (3, 6):
        ckpt.save(step, {"w": jax.numpy.full(4, float(step))}, {"step": step})
    ckpt.close()
    _truncate_files(os.path.join(directory, "6"))
    like = {"w": jax.numpy.zeros(4)}
    resumed = checkpointing.Checkpointer(directory, keep=2)
    _, meta = resumed.restore(like)
    assert meta["step"] == 3
    resumed.save(6, {"w": jax.numpy.full(4, 60.0)}, {"step": 6})
    resumed.close()
    state, meta = checkpointing.Checkpointer(directory, keep=2).restore(like)
    assert meta["step"] == 6 and float(state["w"][0]) == 60.0


def test_a_storage_error_raised_while_handling_another_is_one():
    """`is_storage_error` follows the chain an `except` block leaves (`__context__`), not only
    `raise ... from`."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("commit failed")  # pylint: disable=raise-missing-from
    except RuntimeError as e:
        assert checkpointing.is_storage_error(e)
    assert not checkpointing.is_storage_error(RuntimeError("RESOURCE_EXHAUSTED: out of memory"))


def test_tensorstores_reports_of_a_failed_write_are_storage_errors():
    """Tensorstore reports a full disk by its system error number and a bucket it may not write
    by PERMISSION_DENIED, both as ValueErrors that orbax may wrap: each is a storage failure
    (a named WorkdirError), while a device out of memory is not."""
    full = ValueError("Error writing local file: No space left on device [os_error_code='28']")
    denied = ValueError(
        'PERMISSION_DENIED: Error writing "state/d/1" in GCS bucket "b": HTTP response code: 403'
    )
    for error in (full, denied):
        wrapped = RuntimeError("orbax: commit failed")
        wrapped.__cause__ = error
        assert checkpointing.is_storage_error(error) and checkpointing.is_storage_error(wrapped)
    assert not checkpointing.is_storage_error(ValueError("RESOURCE_EXHAUSTED: Out of memory"))


def test_a_leftover_temporary_file_is_no_started_stage(tmp_path):
    """A first command killed while writing its config leaves `.config.json.tmp-*` beside it:
    the corrected command still takes the workdir as unstarted."""
    workdir = str(tmp_path / "run")
    workdir_lib.prepare(tiny_demo(), workdir)
    (epath.Path(workdir) / ".config.json.tmp-0123abcd").write_text("{")
    workdir_lib.prepare(tiny_demo(seed=4), workdir)
    assert json.loads((epath.Path(workdir) / "config.json").read_text())["seed"] == 4
    assert not (epath.Path(workdir) / workdir_lib.PREVIOUS_DIR).exists()


def test_a_restart_leaves_the_launchers_logs_in_place(tmp_path):
    """`launch/local.sh` opens WORKDIR/logs/process_i.log before the run starts: a restart moves
    the old run aside but not the logs the new run is writing."""
    workdir = str(tmp_path / "run")
    workdir_lib.prepare(tiny_demo(), workdir)
    (epath.Path(workdir) / "teacher").mkdir()
    logs = epath.Path(workdir) / "logs"
    logs.mkdir()
    (logs / "process_1.log").write_text("started\n")
    workdir_lib.prepare(tiny_demo(seed=4, restart=True), workdir)
    assert (logs / "process_1.log").read_text() == "started\n"
    (previous,) = (epath.Path(workdir) / workdir_lib.PREVIOUS_DIR).iterdir()
    assert (previous / "teacher").exists() and not (previous / "logs").exists()


def test_workdir_from_before_matmul_precision_resumes_at_the_backends_default(tmp_path):
    """Runs before `matmul_precision` computed at the backend's default: such a workdir is
    refused for the new 'tensorfloat32' and resumed with --config.matmul_precision=default."""
    workdir = tmp_path / "run"
    workdir_lib.prepare(tiny_demo(), str(workdir))
    saved = json.loads((workdir / "config.json").read_text())
    del saved["matmul_precision"]
    (workdir / "config.json").write_text(json.dumps(saved))
    (workdir / "teacher").mkdir()
    with pytest.raises(errors.WorkdirError, match="matmul_precision: 'default' in the workdir"):
        workdir_lib.prepare(tiny_demo(), str(workdir))
    workdir_lib.prepare(tiny_demo(matmul_precision="default"), str(workdir))
    assert not (workdir / "previous").exists()
