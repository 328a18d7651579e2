"""Index bookkeeping: class-stratified splits and small stratified subsets.

Everything here works on index arrays, never on images, so it is cheap on every host and every
host computes the same answer from the same labels and seed. The search stage's train/val split
of CIFAR (§4.1: 50k -> 35k/15k, 7:3) is saved in the workdir by `load_or_create_split`, so
a resumed or re-run search sees exactly the examples it started with.
"""

import hashlib
import json

import jax
import numpy as np
from etils import epath

from dfa_jax import errors
from dfa_jax import files


DataError = errors.DataError  # Re-exported: `dfa_jax.data.DataError`.


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices into train/val with the same fraction of every class in val.

    Class c with n_c examples contributes floor(n_c * val_fraction + 0.5) examples (round half
    up) to val, drawn uniformly at random; the rest go to train.

    Args:
        labels: int [N] class of each example.
        val_fraction: fraction of every class that goes to val, in [0, 1].
        seed: the split is a deterministic function of (labels, val_fraction, seed).

    Returns:
        (train_idx, val_idx): sorted int64 [N - V] and [V], disjoint, together all of 0..N-1.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    in_val = np.zeros(len(labels), bool)
    # Classes in sorted order so the draws (and thus the split) do not depend on label order.
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        num_val = int(np.floor(len(members) * val_fraction + 0.5))
        in_val[rng.permutation(members)[:num_val]] = True
    return np.flatnonzero(~in_val).astype(np.int64), np.flatnonzero(in_val).astype(np.int64)


def stratified_subset(labels: np.ndarray, max_examples: int | None, seed: int) -> np.ndarray:
    """Picks at most `max_examples` indices, spread over classes as evenly as possible.

    Classes take turns (in a seeded random order), each contributing a random not-yet-picked
    example per turn, until `max_examples` are picked: every class is represented whenever
    `max_examples` >= the number of classes, and class counts differ by at most one until a
    class runs out. Used for the tiny runs' `data.max_{train,test}_examples`.

    Args:
        labels: int [N] class of each example.
        max_examples: how many to keep; None (or >= N) keeps everything.
        seed: the pick is a deterministic function of (labels, max_examples, seed).

    Returns:
        int64 [min(N, max_examples)] sorted indices into `labels`.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if max_examples is None or max_examples >= n:
        return np.arange(n, dtype=np.int64)
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    order = np.random.default_rng(seed).permutation(n)
    # rank[k] = how many examples of the same class precede order[k] in the random order; a
    # stable sort on rank then yields round-robin turns over classes.
    shuffled = labels[order]
    rank = np.empty(n, np.int64)
    for c in np.unique(shuffled):
        members = shuffled == c
        rank[members] = np.arange(members.sum())
    picked = order[np.argsort(rank, kind="stable")[:max_examples]]
    return np.sort(picked).astype(np.int64)


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()


def load_or_create_split(
    path: str, labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the `stratified_split` saved at `path`, creating and saving it on first use.

    The JSON file holds the indices, seed, fraction, number of examples and a digest of the
    labels; a file made for another seed, fraction or dataset raises instead of being silently
    reused or overwritten. Process 0 alone writes it (every process computes the same split), and
    atomically (`files.write_text_atomic`), so a run killed mid-write never leaves a torn file.
    `path` may be
    any path `etils.epath` understands (local or gs://).

    Args:
        path: where the split lives, e.g. `{workdir}/search_split.json` (`inputs.SPLIT_FILE`).
        labels: int [N] class of each example of the split being divided.
        val_fraction: as in `stratified_split`.
        seed: as in `stratified_split`.

    Returns:
        (train_idx, val_idx): sorted int64 arrays, as `stratified_split`.
    """
    labels = np.asarray(labels)
    file = epath.Path(path)
    expected = {
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "num_examples": int(len(labels)),
        "labels_sha256": _labels_digest(labels),
    }
    if file.exists():
        try:
            saved = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise DataError(
                f"split file {path} cannot be read ({type(e).__name__}: {e}); delete it to"
                " re-split (it is computed again from the seed and the labels)"
            ) from e
        mismatched = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        if mismatched:
            details = ", ".join(
                f"{k}: file has {a!r}, run has {b!r}" for k, (a, b) in mismatched.items()
            )
            raise DataError(
                f"split file {path} was made for different data or settings ({details}); "
                "use a fresh workdir or delete the file to re-split"
            )
        return (np.asarray(saved["train"], np.int64), np.asarray(saved["val"], np.int64))
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if jax.process_index() != 0:
        return train_idx, val_idx  # The same split; process 0 alone writes the run's records.
    file.parent.mkdir(parents=True, exist_ok=True)
    record = {**expected, "train": train_idx.tolist(), "val": val_idx.tolist()}
    files.write_text_atomic(path, json.dumps(record))
    return train_idx, val_idx
