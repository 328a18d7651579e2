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

from dfa_jax import errors
from dfa_jax import files


# Unreadable checkpoints go to `<checkpoints directory>` + this, out of the manager's sight.
UNREADABLE_SUFFIX = "-unreadable"


class Checkpointer:
    """Saves and restores `(state, meta)` pairs under `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str, keep: int):
        self.directory = files.absolute(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
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

        An unreadable one is reported, moved aside (`_set_aside`) and the previous one tried; if
        none is readable, a `CheckpointError` names the directory.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        tried = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
                return restored.state, restored.meta
            except Exception as e:  # pylint: disable=broad-except
                # Orbax/tensorstore raise many types for damaged files; all mean "unreadable",
                # unless the checkpoint's own record of its arrays says they are not this state's.
                differences = self._differences(step, like)
                if differences:
                    raise errors.CheckpointError(
                        f"checkpoint step {step} in {self.directory} holds other arrays than this"
                        f" run's state ({'; '.join(differences)}): another model or another"
                        " version of dfa_jax wrote it. Resume it with the code and config that"
                        " wrote it, or delete that directory to start this stage over."
                    ) from e
                tried.append(step)
                logging.warning(
                    "checkpoint step %d in %s is unreadable (%s: %s); %s and trying the previous"
                    " one",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "",
                    self._set_aside(step),
                )
        raise errors.CheckpointError(
            f"no readable checkpoint in {self.directory} (unreadable steps: {tried}); delete that"
            " directory to start this stage over."
        )

    def _differences(self, step: int, like: Any) -> list[str]:
        """How the arrays checkpoint `step` records differ from `like`'s, by path and shape (at
        most three named); empty when they agree or the record itself cannot be read."""
        path = os.path.join(self.directory, str(step), "state")
        try:
            with ocp.StandardCheckpointer() as reader:
                saved = _shapes(reader.metadata(path).item_metadata.tree)
        except Exception:  # pylint: disable=broad-except
            return []  # No readable record of the arrays: damage, as the caller assumes.
        wanted = _shapes(like)
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
        cannot rename a directory: there it is deleted."""
        source = epath.Path(self.directory) / str(step)
        if files.is_remote(self.directory) or not source.exists():
            self._manager.delete(step)
            return "deleted it"
        target = epath.Path(self.directory + UNREADABLE_SUFFIX) / f"{step}-{uuid.uuid4().hex[:8]}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        self._manager.reload()
        return f"moved it to {target}"

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
            if not _is_storage_error(e):
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
_STORAGE_FAILURE = re.compile(r"os_error_code=|RESOURCE_EXHAUSTED|PERMISSION_DENIED")


def _is_storage_error(error: BaseException | None) -> bool:
    """Whether `error` is, or was caused by, a failure of the storage (orbax wraps them in its
    own errors)."""
    while error is not None:
        if isinstance(error, OSError) or _STORAGE_FAILURE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`tree`'s leaves as {'params/conv/kernel': shape}, for arrays and orbax's records of
    them alike."""
    names = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        names["/".join(keys)] = tuple(getattr(leaf, "shape", np.shape(leaf)))
    return names
