"""Data: sources (tfds, image folder, npz, bundled digits), splits, augmentation, host batches.

Typical use on each host (the caller puts batches on the mesh and prefetches):

    source = make_source(config.data)
    labels = source.labels(config.data.train_split)
    train_idx, val_idx = load_or_create_split(path, labels, config.data.search_val_fraction, seed)
    examples = ArrayExamples(source.images(config.data.train_split, train_idx), labels[train_idx])
    for batch in train_batches(examples, global_batch_size, seed, epoch, rows=my_rows): ...

and inside the jitted step: `normalize(random_crop_flip(batch['image'], rng, ...), mean, std)`.
"""

from dfa_jax.data.augment import normalize, random_crop_flip
from dfa_jax.data.loader import (
    ArrayExamples,
    Examples,
    eval_batches,
    steps_per_epoch,
    train_batches,
)
from dfa_jax.data.sources import DATASETS, SOURCES, DatasetInfo, Source, make_source
from dfa_jax.data.splits import (
    DataError,
    load_or_create_split,
    stratified_split,
    stratified_subset,
)

__all__ = [
    "ArrayExamples",
    "Examples",
    "DATASETS",
    "SOURCES",
    "DataError",
    "DatasetInfo",
    "Source",
    "eval_batches",
    "load_or_create_split",
    "make_source",
    "normalize",
    "random_crop_flip",
    "steps_per_epoch",
    "stratified_split",
    "stratified_subset",
    "train_batches",
]
