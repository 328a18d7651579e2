"""Host-side batch iterators (NumPy only, no device placement) over a split every host indexes.

The order of a run's batches is a function of the *global* batch size, the seed and the epoch
only, never of the number of processes: global batch k of an epoch holds positions
`order[k*B:(k+1)*B]` of the permutation `default_rng([seed, epoch])`, and each process reads just
its `rows` of it (the rows its devices hold on the mesh, `parallel.process_rows`). The caller
assembles those local rows into global arrays (`jax.make_array_from_process_local_data`), so one
config and seed give the same batches on 1 device, 8 devices or 4 hosts, and a run resumed at
(epoch, step) replays exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import numpy as np


class Examples(Protocol):
    """One split as every process sees it: all labels, images read on demand."""

    labels: np.ndarray  # int32 [N], identical on every process.

    def read(self, positions: np.ndarray) -> np.ndarray:
        """uint8 [len(positions), H, W, C] images at `positions` (int [n] into `labels`)."""


@dataclasses.dataclass(frozen=True)
class ArrayExamples:
    """Examples held in memory: uint8 images [N, H, W, C] and int labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        object.__setattr__(self, "labels", np.asarray(self.labels, np.int32))

    def read(self, positions: np.ndarray) -> np.ndarray:
        return self.images[positions]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Number of full global batches per epoch (the remainder is dropped).

    Raises ValueError when not even one batch fits, which would otherwise make a silent
    zero-step epoch (typically a tiny config with a batch larger than its data).
    """
    if global_batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {global_batch_size}")
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"{num_examples} examples cannot fill one batch of {global_batch_size}; lower the"
            " batch size or use more data"
        )
    return steps


def _rows(rows: slice | None, global_batch_size: int) -> slice:
    rows = slice(0, global_batch_size) if rows is None else rows
    start, stop, stride = rows.indices(global_batch_size)
    if stride != 1 or stop <= start:
        raise ValueError(f"rows must be a non-empty contiguous slice of the batch, got {rows}")
    return slice(start, stop)


def train_batches(
    examples: Examples,
    global_batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    rows: slice | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's rows of one epoch of shuffled global batches (remainder dropped).

    Batches before `start_batch` are skipped without reading any image, so resuming mid-epoch
    costs nothing.

    Args:
        examples: the split (labels [N], images read on demand).
        global_batch_size: B, examples per global batch (over all processes).
        seed: run seed (non-negative).
        epoch: epoch number (non-negative); each epoch has its own order.
        start_batch: first batch to yield, in [0, steps_per_epoch].
        rows: this process's contiguous rows of each global batch; None: all B rows.

    Yields:
        {'image': uint8 [b, H, W, C], 'label': int32 [b]} with b = rows' length.
    """
    rows = _rows(rows, global_batch_size)
    n = len(examples.labels)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for k in range(start_batch, n // global_batch_size):
        positions = order[k * global_batch_size : (k + 1) * global_batch_size][rows]
        yield {"image": examples.read(positions), "label": examples.labels[positions]}


def eval_batches(
    examples: Examples, global_batch_size: int, rows: slice | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's rows of global batches that hold every example exactly once, in order.

    The last global batch is padded with zero images and label 0; `mask` tells real rows (1) from
    padding (0), so metrics are sum(mask * metric) / sum(mask), every process runs the same number
    of steps, and the jitted eval step sees a single batch shape.

    Args:
        examples: the split (labels [N], images read on demand).
        global_batch_size: B, examples per global batch.
        rows: this process's contiguous rows of each global batch; None: all B rows.

    Yields:
        {'image': uint8 [b, H, W, C], 'label': int32 [b], 'mask': float32 [b]};
        ceil(N / B) batches.
    """
    rows = _rows(rows, global_batch_size)
    n = len(examples.labels)
    for start in range(0, n, global_batch_size):
        positions = np.arange(start, start + global_batch_size)[rows]
        real = positions[positions < n]
        image = examples.read(real)
        label = examples.labels[real]
        fill = len(positions) - len(real)
        mask = np.ones(len(positions), np.float32)
        if fill:
            if len(real) == 0:  # This process's rows are all padding: shape from one example.
                image = np.zeros((0, *examples.read(np.arange(1)).shape[1:]), np.uint8)
            image = np.concatenate([image, np.zeros((fill, *image.shape[1:]), image.dtype)])
            label = np.concatenate([label, np.zeros(fill, np.int32)])
            mask[len(real) :] = 0.0
        yield {"image": image, "label": label.astype(np.int32), "mask": mask}
