"""A run's data, ready for the loop: this host's shards of every split, and on-device preprocessing.

`load(config, workdir)` reads the configured source once per run: the training split (and, for
the search, its stratified 7:3 train/val split with the indices saved in the workdir, or the
source's own validation split), and the test split. Each host keeps only its own contiguous shard
of each index list and decodes only those images.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from dfa_jax import data as data_lib
from dfa_jax.data import augment, splits

Split = tuple[np.ndarray, np.ndarray]  # (uint8 images [N, H, W, 3], int32 labels [N]) of this host.


@dataclasses.dataclass
class RunData:
    """This host's share of the run's splits. `search_*` is loaded only when the search needs it."""

    info: data_lib.DatasetInfo
    train: Split  # The full training split (teacher and distillation stages).
    test: Split  # Evaluated every epoch.
    search_train: Split | None = None  # Trains w during the search (7/10 of train by default).
    search_val: Split | None = None  # Trains beta during the search.


def _host_split(source, split: str, indices: np.ndarray, labels: np.ndarray) -> Split:
    """This host's contiguous share of `indices`, after a fixed shuffle: sources list examples
    class by class (image_folder), and a host must not hold a block of classes."""
    shuffled = np.random.default_rng(0).permutation(indices)
    mine = np.sort(splits.host_shard(shuffled, jax.process_index(), jax.process_count()))
    return source.images(split, mine), labels[mine].astype(np.int32)


def load(config, workdir: str, search: bool) -> RunData:
    """Loads this host's shards of the train and test splits (and the search splits if `search`)."""
    data = config.data
    source = data_lib.make_source(data)
    info = source.info

    # Sources apply data.max_*_examples themselves (a seeded class-stratified subset).
    train_labels = source.labels(data.train_split)
    train_idx = np.arange(len(train_labels))
    test_labels = source.labels(data.test_split)
    test_idx = np.arange(len(test_labels))
    run = RunData(
        info=info,
        train=_host_split(source, data.train_split, train_idx, train_labels),
        test=_host_split(source, data.test_split, test_idx, test_labels),
    )

    if search:
        if data.val_split is None:
            # The paper's protocol: 7:3 of the training set, stratified and seeded, saved for the record.
            path = os.path.join(workdir, "search_split.json")
            local_train, local_val = splits.load_or_create_split(
                path, train_labels[train_idx], data.search_val_fraction, config.seed
            )
            run.search_train = _host_split(
                source, data.train_split, train_idx[local_train], train_labels
            )
            run.search_val = _host_split(
                source, data.train_split, train_idx[local_val], train_labels
            )
        else:
            val_labels = source.labels(data.val_split)
            val_idx = np.arange(len(val_labels))
            run.search_train = run.train
            run.search_val = _host_split(source, data.val_split, val_idx, val_labels)
    return run


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
