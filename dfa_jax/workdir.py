"""The workdir's contract, checked before anything is built or compiled.

- It must be writable, with room to write (a probe file is written and removed).
- It holds the runs of one experiment: `config.json` keeps the config it was started with and
  `config_hash` the hash of its result-affecting fields. A command whose config differs in any
  such field (`config_lib.changed_fields`) is refused with the changed fields listed (and how to
  reuse the teacher and alpha it finished from another workdir), unless `--config.restart=True`:
  then the old run is moved aside into `previous/<UTC time>/` and the run starts over. An
  object store cannot rename directories, and restart there would have to delete the run: it is
  refused instead, and the user deletes the old run (or picks another workdir). So is a restart
  that would move aside a `teacher.checkpoint` or `distill.alpha_file` the command itself reads.
  A workdir where no stage has started yet (a first command refused by a later check, e.g. data
  not found) takes the new config without either; one holding stages but no `config.json`
  beside `previous/` (a restart stopped midway) is refused. Fields that cannot
  change results (logging and checkpoint frequency, device split, evaluation batch, where the
  data lives, which stages or students to run) may differ freely, and re-running the same
  command resumes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shlex
import socket
import time
import uuid
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dfa_jax import alpha_file
from dfa_jax import config_lib
from dfa_jax import errors
from dfa_jax import files
from dfa_jax import inputs
from dfa_jax import parallel
from dfa_jax import train_loop

CONFIG_FILE = "config.json"
HASH_FILE = "config_hash"
PREVIOUS_DIR = "previous"
# Kept in place when a run is moved aside: earlier runs, and logs the launcher opened already.
LOCK_FILE = ".lock"  # Held by the run using the workdir (a local disk's; see `locked`).
_KEPT = (PREVIOUS_DIR, "logs", LOCK_FILE)
# What a command writes before its first stage starts: a workdir holding no more has no run yet.
_BEFORE_ANY_STAGE = (CONFIG_FILE, HASH_FILE, inputs.SPLIT_FILE, *_KEPT)
# What the stages write at the top of a workdir: a run's, whatever else a directory holds.
_RUN_ENTRIES = ("teacher", "search", "distill", "summary.json", "alpha.json")


def config_hash(config_dict: dict) -> str:
    """12 hex digits over the result-affecting fields of a config (as a nested dict)."""
    fields = config_lib.result_fields(config_dict)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def check_writable(workdir: str) -> None:
    """Creates `workdir` and writes and removes a probe file, or raises a `WorkdirError`."""
    try:
        files.makedirs(workdir)
        if jax.process_index() == 0:
            probe = epath.Path(workdir) / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"\0" * 65536)  # A little room, not just an inode.
            probe.unlink()
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
        raise errors.WorkdirError(
            f"workdir {workdir!r} cannot be written ({reason}); pass a --workdir you can write to"
            " (with free space)."
        ) from None


def _check_named(workdir: str) -> None:
    if not str(workdir).strip():
        raise errors.WorkdirError(
            "--workdir is empty (an unset variable?); pass the directory the run should live in."
        )


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds an exclusive lock on `workdir` while the run inside uses it, so that a second run
    of it (a job submitted twice, a requeue while the first still runs) is refused instead of
    writing the same checkpoints at once. The lock is the kernel's (`flock` on `LOCK_FILE`): a
    run that dies, even by kill -9, releases it. Process 0 takes it and every process of the run
    learns whether it did (a refused run stops on all of them). A bucket has no such lock, nor
    does a file system that refuses `flock` (NFS without its lock service, Lustre mounted
    `noflock`): there a warning says so and the caller must not start a run twice."""
    _check_named(workdir)
    check_writable(workdir)
    if files.is_remote(workdir):
        yield
        return
    fd, refusal = None, ""
    if jax.process_index() == 0:
        fd, refusal = _lock(workdir)
    if jax.process_count() > 1:  # The other processes learn process 0's outcome.
        refused = multihost_utils.broadcast_one_to_all(np.int32(bool(refusal)))
        if refused and not refusal:
            refusal = f"workdir {workdir!r} is in use by another run (process 0 says which)."
    try:
        if refusal:
            raise errors.WorkdirError(refusal)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # Releases the lock.


def _lock(workdir: str) -> tuple[int | None, str]:
    """Takes `workdir`'s lock: `(open descriptor or None, '' or why the run is refused)`."""
    try:
        import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only.
    except ImportError:
        logging.warning("no file locks here: nothing stops a second run of %s", workdir)
        return None, ""
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # Held by another open file: another run.
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return None, (
            f"workdir {workdir!r} is in use by another run ({holder}); wait for it to end, or"
            " stop it (SIGTERM checkpoints it), then run the command again."
        )
    except OSError as e:  # The file system has no working flock: run, unlocked.
        os.close(fd)
        logging.warning(
            "%s cannot be locked (%s): nothing stops a second run of it at the same time",
            workdir,
            e,
        )
        return None, ""
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode(), 0)
    return fd, ""


def prepare(config, workdir: str) -> None:
    """Checks the workdir against `config` and records the config in it (see the module doc)."""
    _check_named(workdir)
    check_writable(workdir)
    current = config.to_dict()
    config_path = os.path.join(workdir, CONFIG_FILE)
    if not files.exists(config_path):
        _check_no_unknown_run(workdir)
    else:
        try:
            saved = files.read_json(config_path)
        except (OSError, ValueError):
            saved = None  # Unreadable: only a crash mid-write of a pre-atomic version does that.
        changed = config_lib.changed_fields(saved or {}, current)
        if changed and _no_stage_started(workdir):
            logging.info(
                "workdir %s: no stage started under its earlier config; recording this one"
                " (changed: %s)",
                workdir,
                ", ".join(f for f, _, _ in changed),
            )
            split = epath.Path(workdir) / inputs.SPLIT_FILE  # The earlier config's, unused.
            if jax.process_index() == 0 and split.exists():
                split.unlink()
            changed = []
        elif config.restart and not changed:
            logging.info("restart: the workdir's config is this one; resuming it")
        _log_moved_data(saved or {}, current)
        if changed and (not config.restart or files.is_remote(workdir)):
            raise errors.WorkdirError(_refusal(workdir, changed, config.restart))
        if changed:
            _check_nothing_read_is_moved(config, workdir, changed)
            _move_aside(workdir)
    parallel.sync("workdir prepared")  # Process 0 may have moved the old run away.
    files.write_json_atomic(config_path, current)
    files.write_text_atomic(os.path.join(workdir, HASH_FILE), config_hash(current) + "\n")


def _log_moved_data(saved: dict, current: dict) -> None:
    """One line per data location that differs from the workdir's (it may: a copy moved to
    another disk or bucket resumes; the data is taken to be the same)."""
    old, new = config_lib.flatten(saved), config_lib.flatten(current)
    for field in config_lib.LOCATION_FIELDS:
        if field in old and old[field] != new.get(field):
            logging.warning(
                "%s: %r in the workdir, %r now; resuming on the data there (it must be the same"
                " data: the split and the results assume it)",
                field,
                old[field],
                new.get(field),
            )


def _check_no_unknown_run(workdir: str) -> None:
    """Refuses a workdir holding stages but no config.json beside an earlier run moved into
    previous/: a restart stopped while moving that run aside (by a version that did not move
    the config last), whose stages this command would take as its own. (A teacher copied by
    hand into a fresh workdir, with no previous/, is taken as this config's.)"""
    entries = files.listdir(workdir)
    found = sorted(set(entries) & set(_RUN_ENTRIES))
    if found and PREVIOUS_DIR in entries:
        raise errors.WorkdirError(
            f"workdir {workdir!r} holds a run ({', '.join(found)}) but no {CONFIG_FILE}, beside"
            f" runs moved into {os.path.join(workdir, PREVIOUS_DIR)}/: most likely a"
            " --config.restart=True stopped while moving it aside. Its config is unknown, so"
            " its stages cannot be taken as this command's: move them into the newest folder"
            f" of {PREVIOUS_DIR}/ (where its config.json went) or delete them, or give this"
            " command another --workdir."
        )


def _no_stage_started(workdir: str) -> bool:
    """Whether `workdir` holds nothing but what a command writes before its first stage."""
    return all(name in _BEFORE_ANY_STAGE or name.startswith(".") for name in files.listdir(workdir))


# What a trained teacher, and a searched alpha, are made of: a changed field among them (exactly,
# or a field under it) makes the workdir's teacher (alpha) another experiment's. A finished
# teacher exports both its best and last epoch's variables, so `teacher.distill_from` is free.
_TEACHER_INPUTS = ("seed", "dtype", "data", "teacher")
_TEACHER_FREE = ("teacher.distill_from",)
_ALPHA_INPUTS = (*_TEACHER_INPUTS, "student", "features", "search")


def _under(field: str, inputs: tuple[str, ...]) -> bool:
    return any(field == name or field.startswith(name + ".") for name in inputs)


def _reusable(workdir: str, changed: list) -> list[str]:
    """Lines naming the flags that reuse, from another workdir, what `workdir` finished and
    `changed` leaves as it was: its trained teacher (teacher/result.json) and its searched
    alpha (alpha.json)."""
    fields = [f for f, _, _ in changed]
    where = files.absolute(workdir)
    reuse = []
    teacher_same = not any(_under(f, _TEACHER_INPUTS) and f not in _TEACHER_FREE for f in fields)
    if teacher_same and train_loop.is_done(os.path.join(workdir, "teacher")):
        reuse.append(f"  its trained teacher: --config.teacher.checkpoint={shlex.quote(where)}")
    alpha = os.path.join(where, alpha_file.NAME)
    if not any(_under(f, _ALPHA_INPUTS) for f in fields) and files.exists(alpha):
        reuse.append(
            "  its searched alpha: --config.distill.aggregation=file"
            f" --config.distill.alpha_file={shlex.quote(alpha)}"
        )
    return reuse


def _delete_command(workdir: str) -> str:
    if str(workdir).startswith("gs://"):
        return f"`gcloud storage rm --recursive {shlex.quote(str(workdir))}`"
    return "your object store's own tool"


def _refusal(workdir: str, changed: list, restart: bool) -> str:
    """The changed-config refusal: the changed fields, the ways on, and what can be reused."""
    listed = "\n".join(f"  {f}: {old!r} in the workdir, {new!r} now" for f, old, new in changed)
    message = f"workdir {workdir!r} holds a run of another config; changed fields:\n{listed}\n"
    if files.is_remote(workdir):
        # An object store renames nothing: moving the run aside would delete it.
        if restart:
            message += (
                "--config.restart=True cannot move a run aside in an object store (it would have"
                " to DELETE it there), so nothing was changed. "
            )
        message += (
            "Use another --workdir, restore those values to resume it, or delete that run"
            f" yourself (with {_delete_command(workdir)}; it is then gone) and run the command"
            " again."
        )
    else:
        message += (
            "Use another --workdir, restore those values to resume it, or pass"
            f" --config.restart=True to move that run aside (into"
            f" {os.path.join(workdir, PREVIOUS_DIR)}/<UTC time>/) and start over."
        )
    reuse = _reusable(workdir, changed)
    if reuse:
        message += "\nWhat it finished can be reused with another --workdir:\n" + "\n".join(reuse)
    return message


def _read_from_the_run(config, workdir: str) -> list[tuple[str, str]]:
    """`(field, path)` of `teacher.checkpoint` and `distill.alpha_file` where they lie inside
    `workdir` and outside what a restart keeps there (`previous/`, `logs/`)."""
    root = os.path.realpath(workdir)
    inside = []
    for field, path in (
        ("teacher.checkpoint", config.teacher.checkpoint),
        ("distill.alpha_file", config.distill.alpha_file),
    ):
        if not path or files.is_remote(path):
            continue
        resolved = os.path.realpath(path)
        if os.path.commonpath([root, resolved]) != root:
            continue
        first = os.path.relpath(resolved, root).split(os.sep)[0]
        if first not in _KEPT:  # '.' (the workdir itself) is moved whole.
            inside.append((field, path))
    return inside


def _check_nothing_read_is_moved(config, workdir: str, changed: list) -> None:
    """Refuses a restart that would move aside a file the same command reads from the run."""
    inside = _read_from_the_run(config, workdir)
    if not inside:
        return
    listed = "\n".join(f"  {field} = {path!r}" for field, path in inside)
    copies = []
    for field, path in inside:
        source = path
        if os.path.realpath(path) == os.path.realpath(workdir):  # A whole workdir: its teacher.
            source = os.path.join(path, "teacher")
        suffix = "-teacher" if field == "teacher.checkpoint" else "-" + os.path.basename(path)
        copy = shlex.quote(os.path.normpath(workdir) + suffix)
        copies.append(f"  cp -r {shlex.quote(source)} {copy}, then --config.{field}={copy}")
    raise errors.WorkdirError(
        f"workdir {workdir!r} holds a run of another config (changed:"
        f" {', '.join(f for f, _, _ in changed)}), and --config.restart=True would move it"
        f" aside into {os.path.join(workdir, PREVIOUS_DIR)}/<UTC time>/ with what this command"
        f" reads from it:\n{listed}\nNothing was moved. Leave that run where it is and give this"
        " command another --workdir (those fields can stay as they are), or copy what they"
        " name out of the workdir first:\n" + "\n".join(copies)
    )


def _move_aside(workdir: str) -> None:
    """Moves the run in a local `workdir` into `previous/<UTC time>/` (`prepare` refuses a
    restart on an object store, which cannot rename directories)."""
    if jax.process_index() != 0:
        return
    root = epath.Path(workdir)
    # Later stages' outputs first, then the search's, the teacher, and the config last: a
    # restart stopped midway leaves the run's config with a consistent start of its run (its
    # teacher, say, without the search and students it fed), never stages without a config.
    order = {"search": 1, inputs.SPLIT_FILE: 1, "alpha.json": 1, "alpha_heatmap.png": 1}
    order.update({"teacher": 2, CONFIG_FILE: 3, HASH_FILE: 3})
    entries = sorted(
        (p for p in root.iterdir() if p.name not in _KEPT), key=lambda p: order.get(p.name, 0)
    )
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = root / PREVIOUS_DIR / stamp
    for n in range(2, 1000):  # Another restart in the same second (one stopped midway, say).
        if not target.exists():
            break
        target = root / PREVIOUS_DIR / f"{stamp}-{n}"
    target.mkdir(parents=True, exist_ok=False)
    for entry in entries:
        entry.rename(target / entry.name)
    logging.warning("restart: moved the previous run in %s to %s", workdir, target)
