"""A run's data, ready for the loop: every split as all processes index it, and on-device
preprocessing.

`load(config, workdir)` reads the configured source's labels once per run: the training split
(and, for the search, its stratified 7:3 train/val split with the indices saved in the workdir,
or the source's own validation split), and the test split. Every process holds the same index
lists; images are read on demand, each process only the rows of each global batch that its
devices hold (`loader.py`), so the batches do not depend on how many processes there are.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from dfa_jax import data as data_lib
from dfa_jax import errors
from dfa_jax import parallel
from dfa_jax.data import augment, splits

SPLIT_FILE = "search_split.json"  # The search's 7:3 split of the training set, in the workdir.


@dataclasses.dataclass(frozen=True)
class SourceExamples:
    """Examples `rows` of a source's split: labels int32 [N] here, images read from the source."""

    source: data_lib.Source
    split: str
    rows: np.ndarray  # int [N] indices into `source.labels(split)`.
    labels: np.ndarray  # int32 [N]

    @classmethod
    def of(cls, source, split: str, rows: np.ndarray | None = None) -> "SourceExamples":
        labels = source.labels(split)
        rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
        return cls(source, split, rows, labels[rows].astype(np.int32))

    def read(self, positions: np.ndarray) -> np.ndarray:
        """uint8 [len(positions), S, S, 3] images at `positions` (into `labels`)."""
        return self.source.images(self.split, self.rows[positions])

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class RunData:
    """The run's splits. `search_*` is set only when the search needs it."""

    info: data_lib.DatasetInfo
    train: data_lib.Examples  # The full training split (teacher and distillation stages).
    test: data_lib.Examples  # Evaluated every epoch.
    search_train: data_lib.Examples | None = None  # Trains w in the search (7/10 of train).
    search_val: data_lib.Examples | None = None  # Trains beta during the search.


def load(config, workdir: str, search: bool) -> RunData:
    """Indexes the train and test splits (and the search splits if `search`)."""
    data = config.data
    source = data_lib.make_source(data)
    # Processes sharing a data directory (a gs:// TFDS data_dir on a pod) must not download and
    # prepare it at once: process 0 does, the others read what it wrote. (A process whose own
    # directory still lacks the data prepares it when it reads, as a single process would.)
    if jax.process_index() == 0:
        source.prepare()
    parallel.sync("data prepared")
    # Sources apply data.max_*_examples themselves (a seeded class-stratified subset).
    train = SourceExamples.of(source, data.train_split)
    info = source.info
    if data.mean is not None:  # E.g. an imported teacher's statistics (validate: with a std).
        info = dataclasses.replace(info, mean=tuple(data.mean), std=tuple(data.std))
    run = RunData(info=info, train=train, test=SourceExamples.of(source, data.test_split))
    if search:
        if data.val_split is None:
            # The paper's protocol: 7:3 of the training set, stratified and seeded, saved for the
            # record. Every process computes the same split; the file is written atomically.
            path = os.path.join(workdir, SPLIT_FILE)
            train_idx, val_idx = splits.load_or_create_split(
                path, train.labels, data.search_val_fraction, config.seed
            )
            run.search_train = SourceExamples.of(source, data.train_split, train_idx)
            run.search_val = SourceExamples.of(source, data.train_split, val_idx)
        else:
            run.search_train = train
            run.search_val = SourceExamples.of(source, data.val_split)
    return run


def check_batch_sizes(config, run: RunData) -> None:
    """Raises a `DataError` when a split the run trains on cannot fill one global batch (a
    dataset smaller than configured, or a small `data.max_train_examples`), or the test split is
    empty, before any compile."""
    needs = []
    if config.teacher.checkpoint is None:
        needs.append(
            ("train", run.train, "teacher.optim.batch_size", config.teacher.optim.batch_size)
        )
    if "search" in config.stages and run.search_train is not None:
        needs.append(
            ("search train", run.search_train, "search.batch_size", config.search.batch_size)
        )
        needs.append(("search val", run.search_val, "search.batch_size", config.search.batch_size))
    if "distill" in config.stages:
        needs.append(
            ("train", run.train, "distill.optim.batch_size", config.distill.optim.batch_size)
        )
    if not len(run.test.labels):  # Evaluated every epoch: empty, a division by zero there.
        raise errors.DataError(
            f"data.test_split = {config.data.test_split!r} has no examples"
            f" ({config.data.dataset} from data.source = {config.data.source!r}); point it at a"
            " split with images, or fix the data's location"
        )
    for split, examples, field, batch_size in needs:
        if len(examples.labels) < batch_size:
            raise errors.DataError(
                f"the {split} split has {len(examples.labels)} examples, fewer than one batch of"
                f" {field} = {batch_size}; lower {field} or provide more data"
                f" ({config.data.dataset} from data.source = {config.data.source!r})."
            )


def make_train_preprocess(data_cfg, info: data_lib.DatasetInfo):
    """`(batch, rng) -> batch` run on device in the train step: augmentation, then normalisation.

    The batch's 'image' arrives as uint8 [B, H, W, 3] and leaves as float32 [B, H, W, 3]; float
    input is taken as already in [0, 255]. (Evaluation normalises only: `evaluation.py`.)
    """
    mean = jnp.asarray(info.mean, jnp.float32)
    std = jnp.asarray(info.std, jnp.float32)

    def preprocess(batch: dict, rng: jax.Array) -> dict:
        images = batch["image"]
        if data_cfg.augment == "pad_crop":
            images = augment.random_crop_flip(
                images, rng, data_cfg.pad, data_cfg.pad_mode, data_cfg.flip
            )
        elif data_cfg.augment == "random_resized_crop":
            images = augment.random_resized_crop_flip(images, rng, data_cfg.flip)
        return {**batch, "image": augment.normalize(images, mean, std)}

    return preprocess
