"""Workdir file I/O that works the same on a local disk and on an object store (`gs://...`).

A TPU pod's hosts share no disk, so its workdir is a bucket: everything the pipeline writes or
reads back (JSON records, metrics, plots) goes through `etils.epath`, which speaks both. Object
stores have no append and no atomic rename of open files, so every write here is a whole file
written next to its target and renamed into place: a reader (or a run killed mid-write) never
sees half a file. Writes happen on process 0 only; the other processes of a multi-process run
read what it wrote after a `parallel.sync`.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from typing import Any

import jax
from etils import epath


def is_remote(path: str) -> bool:
    """Whether `path` names an object store location (`gs://bucket/...`, `s3://...`)."""
    return bool(re.match(r"^[a-z0-9]+://", str(path)))


def absolute(path: str) -> str:
    """`path` made absolute (object store paths are already)."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def listdir(path: str) -> list[str]:
    """The names of the entries of directory `path`, sorted ([] if it does not exist)."""
    root = epath.Path(path)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_json(path: str) -> Any:
    return json.loads(epath.Path(path).read_text())


def read_text(path: str) -> str:
    return epath.Path(path).read_text()


def write_bytes_atomic(path: str, payload: bytes) -> None:
    """Writes `payload` to a unique temporary file beside `path`, then renames it into place
    (process 0 only). On a local disk the file and then the rename are flushed to the disk
    (fsync) before returning, so that a host crash or power loss leaves the old file or the new
    one, never an empty one under the name."""
    if jax.process_index() != 0:
        return
    target = epath.Path(path)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        if is_remote(path):  # An object store publishes a whole object on close.
            tmp.write_bytes(payload)
            tmp.replace(target)
            return
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        # A full disk (or a stop) mid-write: the partial copy goes, not one more per attempt.
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            # A failed write or fsync names no file: say which (and so which disk) it was.
            raise OSError(e.errno, e.strerror, str(target)) from e
        raise
    try:
        directory = os.open(target.parent, os.O_RDONLY)
    except OSError:  # A system that cannot open a directory (Windows) has no such sync.
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes `payload` as indented, key-sorted JSON, atomically (process 0 only)."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


# Least time between two writes of one object in a bucket, which takes about one write a second
# per object (and each write is a round trip the writer waits for).
BUCKET_WRITE_INTERVAL_S = 5.0


class WriteSchedule:
    """When a file rewritten whole as it grows (metrics, TensorBoard events) is written again: at
    every `due()` on a local disk; in a bucket at most every `BUCKET_WRITE_INTERVAL_S`, unless
    forced (before a checkpoint, at the end)."""

    def __init__(self, path: str):
        self.remote = is_remote(path)
        self._written_at = -float("inf")

    def due(self, force: bool = False) -> bool:
        return (
            force
            or not self.remote
            or time.monotonic() - self._written_at >= BUCKET_WRITE_INTERVAL_S
        )

    def written(self) -> None:
        self._written_at = time.monotonic()
