"""A thin wrapper over orbax's CheckpointManager: atomic saves, resume by default.

Orbax writes each step into a temporary directory and renames it when complete, so a crash in
the middle of a save leaves the previous checkpoint as the latest usable one (the temporary
directory is ignored). Each checkpoint holds the train state (arrays) and a small JSON `meta`
(epoch bookkeeping, best accuracy so far) that the loop needs to continue exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from dfa_jax import files


class Checkpointer:
    """Saves and restores `(state, meta)` pairs under `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str, keep: int):
        self.directory = files.absolute(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save of `state` and `meta` at `step` (no-op if it exists)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores the checkpoint at `step` (default: latest) with the shapes/shardings of `like`."""
        step = self._manager.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def wait(self) -> None:
        """Blocks until pending saves are on disk (call before reading them or exiting)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
