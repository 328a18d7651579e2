"""Host-side batch iterators over one host's in-memory examples (NumPy only, no device placement).

Each host holds its own shard (see `splits.host_shard`) as uint8 images and int labels; these
iterators cut it into local batches, which the caller assembles into global arrays on the mesh
(`jax.make_array_from_process_local_data`) and prefetches. Training order is a pure function of
(seed, epoch), so a run resumed at (epoch, step) replays exactly the batches it would have seen.
"""

from collections.abc import Iterator

import numpy as np


def _check(images: np.ndarray, labels: np.ndarray, local_batch_size: int) -> None:
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if local_batch_size <= 0:
        raise ValueError(f"local_batch_size must be positive, got {local_batch_size}")


def steps_per_epoch(num_local_examples: int, local_batch_size: int) -> int:
    """Number of full local batches per epoch (the remainder is dropped).

    Raises ValueError when not even one batch fits, which would otherwise make a silent
    zero-step epoch (typically a tiny config with a batch larger than its data).
    """
    steps = num_local_examples // local_batch_size
    if steps == 0:
        raise ValueError(
            f"{num_local_examples} local examples cannot fill one batch of {local_batch_size}"
        )
    return steps


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    local_batch_size: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of shuffled local training batches, dropping the remainder.

    The order is the permutation drawn by `np.random.default_rng([seed, epoch])`; batch k holds
    permuted positions [k*b, (k+1)*b). Batches before `start_batch` are skipped without being
    gathered, so resuming mid-epoch costs nothing.

    Args:
        images: uint8 [N, H, W, C] this host's examples.
        labels: int [N] their classes.
        local_batch_size: b, examples per local batch.
        seed: run seed (non-negative).
        epoch: epoch number (non-negative); each epoch has its own order.
        start_batch: first batch to yield, in [0, steps_per_epoch].

    Yields:
        {'image': uint8 [b, H, W, C], 'label': int32 [b]}.
    """
    _check(images, labels, local_batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(len(images))
    for k in range(start_batch, len(images) // local_batch_size):
        idx = order[k * local_batch_size : (k + 1) * local_batch_size]
        yield {"image": images[idx], "label": labels[idx].astype(np.int32)}


def eval_batches(
    images: np.ndarray, labels: np.ndarray, local_batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every example exactly once, in order, in batches of exactly `local_batch_size`.

    The last batch is padded with zero images and label 0; `mask` tells real rows (1) from
    padding (0), so metrics are sum(mask * metric) / sum(mask) and the jitted eval step sees a
    single batch shape.

    Args:
        images: uint8 [N, H, W, C] this host's examples.
        labels: int [N] their classes.
        local_batch_size: b, examples per local batch.

    Yields:
        {'image': uint8 [b, H, W, C], 'label': int32 [b], 'mask': float32 [b]};
        ceil(N / b) batches.
    """
    _check(images, labels, local_batch_size)
    for start in range(0, len(images), local_batch_size):
        image = images[start : start + local_batch_size]
        label = labels[start : start + local_batch_size].astype(np.int32)
        real = len(image)
        mask = np.ones(local_batch_size, np.float32)
        if real < local_batch_size:
            fill = local_batch_size - real
            image = np.concatenate([image, np.zeros((fill, *image.shape[1:]), image.dtype)])
            label = np.concatenate([label, np.zeros(fill, np.int32)])
            mask[real:] = 0.0
        yield {"image": image, "label": label, "mask": mask}
