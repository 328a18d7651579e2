"""TensorBoard scalars without TensorFlow: event files of tensorboard's own records.

`tensorboard` (the viewer a user runs anyway) ships the event protobufs and the record framing.
Its `EventFileWriter` would open files through `tf.io.gfile`, importing TensorFlow wherever it is
installed; the file is opened through `etils.epath` here instead (local disks and `gs://` alike),
so a run's logs never import TensorFlow. Scalars are `simple_value` summaries, which TensorBoard's
scalar dashboard and `EventAccumulator.Scalars` read.

A run killed after its last checkpoint logged steps it will log again when it resumes; `truncate`
takes them (and a record torn by the kill) out of the older files first, so TensorBoard shows each
step once, as `metrics.jsonl` does, whatever its loader (only the Python one purges such steps
itself, and only on a `SessionLog.START` event).
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import struct
import time
from typing import Mapping

from etils import epath
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.summary.writer import record_writer

from dfa_jax import files

_FILE_COUNTER = itertools.count()  # Two writers of one process in one second get two files.


EVENT_FILE_MARK = "tfevents"  # What TensorBoard looks for in a file's name.


def read_records(payload: bytes) -> list[bytes]:
    """The records of an event file's bytes (TFRecord framing: uint64 length, masked CRC-32C of
    the length, data, masked CRC-32C of the data, little-endian), up to the first torn or damaged
    one: a process killed mid-write leaves a partial last record."""
    records, offset = [], 0
    while offset + 12 <= len(payload):
        header = payload[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", payload[offset + 8 : offset + 12])
        end = offset + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(payload):
            break
        data = payload[offset + 12 : end - 4]
        if struct.unpack("<I", payload[end - 4 : end])[0] != masked_crc32c(data):
            break
        records.append(data)
        offset = end
    return records


def truncate(directory: str, step: int) -> None:
    """Rewrites the event files directly in `directory` without the scalars of steps after
    `step` (what a resumed run logs again) and without a torn last record; files that lose
    nothing are left untouched. Process 0 only, as the files' writer."""
    for name in files.listdir(directory):
        path = epath.Path(directory) / name
        if EVENT_FILE_MARK not in name or name.startswith(".") or not path.is_file():
            continue
        payload = path.read_bytes()
        records = read_records(payload)
        kept = []
        for record in records:
            event = event_pb2.Event.FromString(record)
            if not event.HasField("summary") or event.step <= step:
                kept.append(record)
        if len(kept) < len(records) or sum(len(r) + 16 for r in records) < len(payload):
            buffer = io.BytesIO()
            framer = record_writer.RecordWriter(buffer)
            for record in kept:
                framer.write(record)
            files.write_bytes_atomic(str(path), buffer.getvalue())


class ScalarWriter:
    """Writes scalars to a new `events.out.tfevents.*` file in `directory`.

    A resumed stage opens a new file beside the old ones; TensorBoard merges a directory's files.
    In a bucket, where an object appears only whole, once written, the file is kept in memory and
    written whole at a `flush` as `files.WriteSchedule` allows (and at `close`), so that
    TensorBoard shows a running stage there too.
    """

    def __init__(self, directory: str):
        epath.Path(directory).mkdir(parents=True, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_FILE_COUNTER)}"
        )
        self.path = str(epath.Path(directory) / name)
        self._schedule = files.WriteSchedule(directory)
        self._remote = self._schedule.remote
        self._file = io.BytesIO() if self._remote else epath.Path(self.path).open("wb")
        self._records = record_writer.RecordWriter(self._file)
        # TensorBoard reads a file whose first event names the format version.
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in scalars.items()
        ]
        self._write(
            event_pb2.Event(
                step=int(step), wall_time=time.time(), summary=summary_pb2.Summary(value=values)
            )
        )

    def flush(self, force: bool = False) -> None:
        """To the file at once on a local disk; in a bucket as `files.WriteSchedule` allows, or
        at once if `force` (before a checkpoint: a run killed after it resumes after the steps
        it logged)."""
        if not self._remote:
            self._records.flush()
        elif self._schedule.due(force):
            self._upload()

    def close(self) -> None:
        if self._remote:
            self._upload()
        else:
            self._records.close()

    def _upload(self) -> None:
        epath.Path(self.path).write_bytes(self._file.getvalue())
        self._schedule.written()


class NullWriter:
    """What processes other than the first write: nothing (one process owns the logs)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        del step, scalars

    def flush(self, force: bool = False) -> None:
        del force

    def close(self) -> None:
        pass
