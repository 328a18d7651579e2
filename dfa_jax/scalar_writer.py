"""TensorBoard scalars without TensorFlow: event files of tensorboard's own records.

`tensorboard` (the viewer a user runs anyway) ships the event protobufs and the record framing.
Its `EventFileWriter` would open files through `tf.io.gfile`, importing TensorFlow wherever it is
installed; the file is opened through `etils.epath` here instead (local disks and `gs://` alike),
so a run's logs never import TensorFlow. Scalars are `simple_value` summaries, which TensorBoard's
scalar dashboard and `EventAccumulator.Scalars` read.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Mapping

from etils import epath
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import record_writer

_FILE_COUNTER = itertools.count()  # Two writers of one process in one second get two files.


class ScalarWriter:
    """Writes scalars to a new `events.out.tfevents.*` file in `directory`.

    A resumed stage opens a new file beside the old ones; TensorBoard merges a directory's files.
    """

    def __init__(self, directory: str):
        epath.Path(directory).mkdir(parents=True, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_FILE_COUNTER)}"
        )
        self.path = str(epath.Path(directory) / name)
        self._file = epath.Path(self.path).open("wb")
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

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


class NullWriter:
    """What processes other than the first write: nothing (one process owns the logs)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        del step, scalars

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
