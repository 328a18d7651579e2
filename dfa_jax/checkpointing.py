"""A thin wrapper over orbax's CheckpointManager: atomic saves, resume by default, and a fallback
past a damaged checkpoint.

Orbax writes each step into a temporary directory and renames it when complete, so a crash in
the middle of a save leaves the previous checkpoint as the latest usable one (the temporary
directory is ignored). Each checkpoint holds the train state (arrays) and a small JSON `meta`
(epoch bookkeeping, best accuracy so far) that the loop needs to continue exactly. A finished
checkpoint that cannot be read (truncated or corrupted files) is moved aside with a warning naming
it and where it went, and the one before it is used; one that holds other arrays than the run's
state (another model, or a version of the code that named a parameter otherwise) is no damage: a
`CheckpointError` names the differing arrays and nothing is moved. A failing save (full disk, lost
permissions) raises a `WorkdirError` saying which checkpoint is still intact.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dfa_jax import errors
from dfa_jax import files
from dfa_jax import parallel


# Unreadable checkpoints go to `<checkpoints directory>` + this, out of the manager's sight.
UNREADABLE_SUFFIX = "-unreadable"


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, out of JAX's preemption agreement, which `preemption.should_stop` alone
    drives: the service keeps only the last step number any caller gave it, and orbax gives the
    checkpoint's (another count after a resume, or in a later stage), so a notice could set a
    stop step the loop never reaches, and a SIGTERM would go unheeded."""

    def reached_preemption(self, step: int) -> bool:
        del step
        return False  # The loop saves and stops on its own agreed step.


class Checkpointer:
    """Saves and restores `(state, meta)` pairs under `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str, keep: int):
        self.directory = files.absolute(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = _Manager(self.directory, options=options)
        self._saving: int | None = None  # Step of the save in flight, for error messages.

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save of `state` and `meta` at `step` (no-op if it exists)."""
        if step in self._manager.all_steps():
            return
        self.wait()  # Surfaces a failure of the previous save before starting the next.
        self._saving = step
        with self._save_errors():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )

    def restore(self, like: Any) -> tuple[Any, dict]:
        """Restores the newest readable checkpoint with the shapes/shardings of `like`.

        An unreadable one is reported and the previous one tried; once one restores, the newer
        unreadable ones are moved aside (`_set_aside`: the run will save those steps again). If
        none restores, nothing is moved (the cause may pass: a device out of memory, a failed
        read of a network disk) and a `CheckpointError` names the directory and the error.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        failed: list[tuple[int, BaseException]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            error = None
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # pylint: disable=broad-except
                # Orbax/tensorstore raise many types for damaged files; all mean "unreadable",
                # unless the checkpoint's own record of its arrays says they are not this state's.
                error = e
            # Every process takes the same way: one that went on alone (to the next step's
            # restore, or moving this one aside) would meet the others in another collective.
            if not _failed_anywhere(error is not None):
                for bad_step, _ in failed:
                    logging.warning(
                        "checkpoint step %d in %s was unreadable; resumed from step %d, %s",
                        bad_step,
                        self.directory,
                        step,
                        self._set_aside(bad_step),
                    )
                return restored.state, restored.meta
            if error is None:
                error = RuntimeError("another process could not read it")
            differences = self._differences(step, like)
            # Agreed too: a process that read the record and one that could not would part.
            if _failed_anywhere(bool(differences)):
                differences = differences or ["another process read other arrays there"]
                raise errors.CheckpointError(
                    f"checkpoint step {step} in {self.directory} holds other arrays than this"
                    f" run's state ({'; '.join(differences)}): another model or another"
                    " version of dfa_jax wrote it. Resume it with the code and config that"
                    " wrote it, or delete that directory to start this stage over."
                ) from error
            failed.append((step, error))
            logging.warning(
                "checkpoint step %d in %s is unreadable (%s); trying the previous one",
                step,
                self.directory,
                _first_line(error),
            )
        newest_error = _first_line(failed[0][1]) if failed else "none saved"
        raise errors.CheckpointError(
            f"no readable checkpoint in {self.directory} (unreadable steps:"
            f" {[s for s, _ in failed]}; the newest's error: {newest_error}). Nothing was moved:"
            " if that error passes (a device out of memory, a failed read of a network disk),"
            " run the same command again; if the checkpoints are damaged, delete that directory"
            " to start this stage over."
        )

    def _differences(self, step: int, like: Any) -> list[str]:
        """How the arrays checkpoint `step` records differ from `like`'s, by path and shape (at
        most three named); empty when they agree or the record itself cannot be read."""
        path = os.path.join(self.directory, str(step), "state")
        try:
            with ocp.StandardCheckpointer() as reader:
                saved = flat_shapes(reader.metadata(path).item_metadata.tree)
        except Exception:  # pylint: disable=broad-except
            return []  # No readable record of the arrays: damage, as the caller assumes.
        wanted = flat_shapes(like)
        differences = [
            f"{name}: {saved[name]} saved, {wanted[name]} now"
            for name in sorted(saved.keys() & wanted.keys())
            if saved[name] != wanted[name]
        ]
        differences += [
            f"{name} not in the checkpoint" for name in sorted(wanted.keys() - saved.keys())
        ]
        differences += [
            f"{name} only in the checkpoint" for name in sorted(saved.keys() - wanted.keys())
        ]
        if len(differences) > 3:
            differences = differences[:3] + [f"{len(differences) - 3} more"]
        return differences

    def _set_aside(self, step: int) -> str:
        """Moves unreadable checkpoint `step` out of the manager's sight, into
        `<directory>-unreadable/`, and says where: an error that is no damage (a failed read of a
        network disk, a device out of memory) must not cost the checkpoint. An object store
        cannot rename a directory: there it is deleted.

        Called by every process together: process 0 moves it, the others wait, and all read the
        directory again."""
        source = epath.Path(self.directory) / str(step)
        if files.is_remote(self.directory):
            self._manager.delete(step)  # Orbax's collective: every process is here.
            return "deleted it"
        moved = ""
        if jax.process_index() == 0 and source.exists():
            target = (
                epath.Path(self.directory + UNREADABLE_SUFFIX) / f"{step}-{uuid.uuid4().hex[:8]}"
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            moved = str(target)
        moved = _from_process_0(moved)  # Every process's message names the same place.
        parallel.sync(f"checkpoint {source} set aside")
        self._manager.reload()
        return f"moved it to {moved}" if moved else "its directory is gone"

    def wait(self) -> None:
        """Blocks until pending saves are on disk (call before reading them or exiting)."""
        with self._save_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    @contextlib.contextmanager
    def _save_errors(self):
        """Turns a storage failure of a save (an OSError, or tensorstore's report of one, possibly
        wrapped by orbax) into a `WorkdirError`."""
        try:
            yield
        except Exception as e:  # pylint: disable=broad-except
            if not is_storage_error(e):
                raise
            intact = [s for s in self._manager.all_steps() if s != self._saving]
            raise errors.WorkdirError(
                f"saving the checkpoint of step {self._saving} in {self.directory} failed"
                f" ({type(e).__name__}: {e}); the previous checkpoint"
                f" ({max(intact) if intact else 'none'}) is intact. Free disk space or fix the"
                " permissions, then run the same command again."
            ) from e


# Tensorstore, which writes orbax's arrays, reports a failed write as a ValueError whose message
# carries the system's error number ("... No space left on device [os_error_code='28']") or its
# status code.
# (Not RESOURCE_EXHAUSTED alone: a device out of memory reports it too.)
_STORAGE_FAILURE = re.compile(r"os_error_code=|PERMISSION_DENIED")


def _first_line(error: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters), for one-line reports."""
    message = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {message}"


def _failed_anywhere(failed: bool) -> bool:
    """Whether any process's `failed` is True (every process calls it; one process: `failed`)."""
    if jax.process_count() == 1:
        return failed
    return bool(np.max(multihost_utils.process_allgather(np.int32(failed))))


def _from_process_0(text: str) -> str:
    """Process 0's `text`, on every process (each calls it)."""
    if jax.process_count() == 1:
        return text
    data = np.frombuffer(text.encode().ljust(1024, b"\0")[:1024], np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(data)).rstrip(b"\0").decode(errors="replace")


def is_storage_error(error: BaseException | None) -> bool:
    """Whether `error` is, or was caused by, a failure of the storage (orbax wraps them in its
    own errors)."""
    while error is not None:
        if isinstance(error, OSError) or _STORAGE_FAILURE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`tree`'s leaves as {'params/conv/kernel': shape}, for arrays and orbax's records of
    them alike."""
    names = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        names["/".join(keys)] = tuple(getattr(leaf, "shape", np.shape(leaf)))
    return names
