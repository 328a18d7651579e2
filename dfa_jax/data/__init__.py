"""Data: sources (tfds, image folder, npz, bundled digits), splits, augmentation, host batches.

Typical use on each host (the caller puts batches on the mesh and prefetches):

    source = make_source(config.data)
    labels = source.labels(config.data.train_split)
    train_idx, val_idx = load_or_create_split(path, labels, config.data.search_val_fraction, seed)
    mine = host_shard(train_idx, jax.process_index(), jax.process_count())
    images = source.images(config.data.train_split, mine)
    for batch in train_batches(images, labels[mine], local_batch_size, seed, epoch): ...

and inside the jitted step: `normalize(random_crop_flip(batch['image'], rng, ...), mean, std)`.
"""

from dfa_jax.data.augment import normalize, random_crop_flip
from dfa_jax.data.loader import eval_batches, steps_per_epoch, train_batches
from dfa_jax.data.sources import DATASETS, SOURCES, DatasetInfo, Source, make_source
from dfa_jax.data.splits import (
    DataError,
    host_shard,
    load_or_create_split,
    stratified_split,
    stratified_subset,
)

__all__ = [
    "DATASETS",
    "SOURCES",
    "DataError",
    "DatasetInfo",
    "Source",
    "eval_batches",
    "host_shard",
    "load_or_create_split",
    "make_source",
    "normalize",
    "random_crop_flip",
    "steps_per_epoch",
    "stratified_split",
    "stratified_subset",
    "train_batches",
]
