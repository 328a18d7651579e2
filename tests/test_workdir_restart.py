"""Restart keeps what a user saved: on an object store (which cannot move a run aside) it is
refused rather than deleting the run; a restart that would move aside the teacher or alpha the
same command reads is refused before anything moves; the changed-config refusal says how to
reuse what the workdir finished from another workdir."""

import json
import os
import pathlib
import shutil
import time

import pytest
from etils import epath

from dfa_jax import errors
from dfa_jax import files
from dfa_jax import pipeline
from dfa_jax import workdir as workdir_lib

from test_train_loop import tiny_demo


def _one_epoch(**overrides):
    return tiny_demo(**{"teacher.optim.epochs": 1, "teacher.optim.milestones": (), **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A workdir holding a finished one-epoch tiny teacher."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    pipeline.run(_one_epoch(), workdir)
    return workdir


@pytest.fixture
def teacher_run(finished, tmp_path):
    """A copy of `finished` this test may change."""
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir, ignore=shutil.ignore_patterns(workdir_lib.LOCK_FILE))
    return workdir


def _tree(workdir):
    """`{relative path: bytes}` of every file in `workdir` but the lock."""
    root = pathlib.Path(workdir)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != workdir_lib.LOCK_FILE
    }


def _planted(tmp_path):
    """A workdir with a config, a started stage and an alpha.json (no real training)."""
    workdir = str(tmp_path / "run")
    workdir_lib.prepare(tiny_demo(), workdir)
    state = epath.Path(workdir) / "teacher" / "checkpoints" / "3" / "state"
    state.mkdir(parents=True)
    (state / "data").write_bytes(b"weights")
    (epath.Path(workdir) / "alpha.json").write_text('{"groups": []}')
    return workdir


def test_restart_on_an_object_store_deletes_nothing_and_says_what_to_do(tmp_path, monkeypatch):
    """An object store cannot move a run aside: restart there would delete it (hours of TPU
    time). It is refused instead, with the deletion left to the user, spelled out."""
    workdir = _planted(tmp_path)
    before = _tree(workdir)
    monkeypatch.setattr(files, "is_remote", lambda p: str(p).startswith(workdir))
    changed = tiny_demo(**{"seed": 4})

    with pytest.raises(errors.WorkdirError) as plain:
        workdir_lib.prepare(changed, workdir)
    assert "seed: 0 in the workdir, 4 now" in str(plain.value)
    assert "--config.restart=True" not in str(plain.value)  # It would not help here.
    assert "delete that run yourself" in str(plain.value)

    changed.restart = True
    with pytest.raises(errors.WorkdirError) as restart:
        workdir_lib.prepare(changed, workdir)
    message = str(restart.value)
    assert "--config.restart=True cannot move a run aside in an object store" in message
    assert "DELETE" in message and "nothing was changed" in message
    assert "Use another --workdir" in message and "delete that run yourself" in message
    assert _tree(workdir) == before
    assert not os.path.exists(os.path.join(workdir, workdir_lib.PREVIOUS_DIR))


def test_a_gs_workdir_refusal_names_the_command_that_deletes_it():
    message = workdir_lib._refusal("gs://bucket/runs/a", [("seed", 0, 4)], restart=True)
    assert "`gcloud storage rm --recursive gs://bucket/runs/a`" in message
    assert "previous/" not in message


def test_restart_refuses_to_move_the_teacher_it_reads(teacher_run):
    """`--config.teacher.checkpoint=W --config.restart=True` in W with a changed field: restart
    would move the teacher into W/previous/ and the run would then not find it (on a bucket,
    delete it). Refused before anything moves, naming the field and the fix."""
    before = _tree(teacher_run)
    again = _one_epoch(
        **{"teacher.checkpoint": teacher_run, "distill.optim.lr": 0.07, "restart": True}
    )
    with pytest.raises(errors.WorkdirError) as e:
        pipeline.run(again, teacher_run)
    message = str(e.value)
    assert f"teacher.checkpoint = {teacher_run!r}" in message
    assert "Nothing was moved" in message and "another --workdir" in message
    copy = f"{teacher_run}-teacher"
    assert f"cp -r {teacher_run}/teacher {copy}, then --config.teacher.checkpoint={copy}" in message
    assert _tree(teacher_run) == before
    assert not os.path.exists(os.path.join(teacher_run, workdir_lib.PREVIOUS_DIR))

    # The way the message gives: another workdir, the teacher read where it is.
    other = teacher_run + "-new"
    summary = pipeline.run(_one_epoch(**{"teacher.checkpoint": teacher_run}), other)
    assert summary["stages"]["teacher"]["loaded_from"].startswith(os.path.abspath(teacher_run))


def test_restart_refuses_to_move_the_alpha_file_it_reads_but_not_one_in_previous(tmp_path):
    workdir = _planted(tmp_path)
    before = _tree(workdir)
    alpha = os.path.join(workdir, "alpha.json")
    changed = tiny_demo(**{"seed": 4, "restart": True, "distill.alpha_file": alpha})
    with pytest.raises(errors.WorkdirError, match=r"distill\.alpha_file = .*alpha\.json") as e:
        workdir_lib.prepare(changed, workdir)
    assert (
        f"cp -r {alpha} {workdir}-alpha.json, then --config.distill.alpha_file={workdir}-alpha.json"
    ) in str(e.value)
    assert _tree(workdir) == before

    # What restart keeps in place (previous/, logs/) may be read.
    kept = epath.Path(workdir) / workdir_lib.PREVIOUS_DIR / "20250101-000000"
    kept.mkdir(parents=True)
    (kept / "alpha.json").write_text("{}")
    changed.distill.alpha_file = str(kept / "alpha.json")
    workdir_lib.prepare(changed, workdir)
    assert (kept / "alpha.json").exists()
    assert not (epath.Path(workdir) / "teacher").exists()  # Moved aside.


def test_the_refusal_says_how_to_reuse_the_finished_teacher_and_alpha(teacher_run):
    """A changed field that leaves the teacher (and alpha) as they were: the refusal gives the
    flags that reuse them from a new workdir. Only what the workdir holds is mentioned, and not
    a teacher a changed teacher field makes another's."""
    absolute = os.path.abspath(teacher_run)
    with pytest.raises(errors.WorkdirError) as e:
        pipeline.run(_one_epoch(**{"distill.optim.lr": 0.07}), teacher_run)
    message = str(e.value)
    assert "distill.optim.lr" in message
    assert "reused with another --workdir" in message
    assert f"its trained teacher: --config.teacher.checkpoint={absolute}\n" in message + "\n"
    assert "alpha_file" not in message  # No search ran there.

    with open(os.path.join(teacher_run, "alpha.json"), "w") as f:
        json.dump({"groups": []}, f)
    with pytest.raises(errors.WorkdirError) as e:
        workdir_lib.prepare(_one_epoch(**{"distill.optim.lr": 0.07}), teacher_run)
    assert (
        "its searched alpha: --config.distill.aggregation=file"
        f" --config.distill.alpha_file={os.path.join(absolute, 'alpha.json')}"
    ) in str(e.value)

    with pytest.raises(errors.WorkdirError) as e:  # Another teacher: nothing to reuse.
        workdir_lib.prepare(_one_epoch(**{"teacher.optim.lr": 0.5}), teacher_run)
    assert "reused" not in str(e.value) and "teacher.checkpoint" not in str(e.value)

    with pytest.raises(errors.WorkdirError) as e:  # Another student: the teacher, not the alpha.
        workdir_lib.prepare(_one_epoch(**{"student.model": "wrn_16_1"}), teacher_run)
    assert "teacher.checkpoint=" in str(e.value) and "alpha_file" not in str(e.value)
    # The feature clamp and the epoch a student distils from shape the alpha a search finds,
    # not the trained teacher (it exports both its best and its last epoch).
    for changed in ({"features.clamp_min": -2.0}, {"teacher.distill_from": "last"}):
        with pytest.raises(errors.WorkdirError) as e:
            workdir_lib.prepare(_one_epoch(**changed), teacher_run)
        assert "teacher.checkpoint=" in str(e.value) and "alpha_file" not in str(e.value), changed


def test_a_restart_stopped_midway_never_leaves_stages_without_their_config(tmp_path, monkeypatch):
    """The run is moved aside entry by entry: its config goes last, so a restart killed midway
    leaves the old config with what is left of its run (a directory may list config.json
    first); stages with no config.json are refused, not taken as the next command's."""
    workdir = _planted(tmp_path)
    gpath = type(epath.Path(workdir))
    real_iterdir, real_rename = gpath.iterdir, gpath.rename
    moved = []

    def config_first(self):  # A directory order that lists the config before the stages.
        return iter(sorted(real_iterdir(self), key=lambda p: p.name != workdir_lib.CONFIG_FILE))

    def killed_at_the_second_move(self, target):
        moved.append(self.name)
        if len(moved) == 2:
            raise KeyboardInterrupt("killed mid-move")  # kill -9, or a second Ctrl-C
        return real_rename(self, target)

    monkeypatch.setattr(gpath, "iterdir", config_first)
    monkeypatch.setattr(gpath, "rename", killed_at_the_second_move)
    # Both restarts in one second (previous/ folders are named by it).
    epoch = time.gmtime(0)
    monkeypatch.setattr(workdir_lib.time, "gmtime", lambda *args: epoch)
    restart = tiny_demo(**{"teacher.optim.lr": 0.2, "restart": True})
    with pytest.raises(KeyboardInterrupt):
        workdir_lib.prepare(restart, workdir)
    monkeypatch.setattr(gpath, "iterdir", real_iterdir)
    monkeypatch.setattr(gpath, "rename", real_rename)
    # The search's alpha went before the teacher it came from; the config is still there.
    assert moved == ["alpha.json", "teacher"]
    assert workdir_lib.CONFIG_FILE in os.listdir(workdir) and "teacher" in os.listdir(workdir)
    # Without restart the old run's config refuses the new one; with it, the rest moves aside.
    with pytest.raises(errors.WorkdirError, match="teacher.optim.lr"):
        workdir_lib.prepare(tiny_demo(**{"teacher.optim.lr": 0.2}), workdir)
    workdir_lib.prepare(restart, workdir)  # In the same second: a folder of its own.
    assert "teacher" not in os.listdir(workdir)
    assert sorted(os.listdir(os.path.join(workdir, workdir_lib.PREVIOUS_DIR))) == [
        "19700101-000000",
        "19700101-000000-2",
    ]
    monkeypatch.undo()

    # Stages without their config beside previous/: an interrupted restart of a version that
    # did not move the config last. Refused, nothing moved; a teacher copied by hand into a
    # fresh workdir (no previous/) is the new config's.
    stray = _planted(tmp_path / "stray")
    os.remove(os.path.join(stray, workdir_lib.CONFIG_FILE))
    os.makedirs(os.path.join(stray, workdir_lib.PREVIOUS_DIR, "19700101-000000"))
    with pytest.raises(errors.WorkdirError, match=r"holds a run \(alpha.json, teacher\) but no"):
        workdir_lib.prepare(tiny_demo(), stray)
    assert "teacher" in os.listdir(stray)
    os.rmdir(os.path.join(stray, workdir_lib.PREVIOUS_DIR, "19700101-000000"))
    os.rmdir(os.path.join(stray, workdir_lib.PREVIOUS_DIR))
    workdir_lib.prepare(tiny_demo(), stray)
    assert workdir_lib.CONFIG_FILE in os.listdir(stray) and "teacher" in os.listdir(stray)
