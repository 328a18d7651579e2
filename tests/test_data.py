"""Tests of dfa_jax.data: splits, augmentation, host batches and every source kind."""

import json
import math
import logging
import os
import socket
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dfa_jax import data
from dfa_jax.data import sources


def data_cfg(**overrides) -> ml_collections.ConfigDict:
    """The `config.data` block with the base config's defaults, overridden."""
    fields = dict(
        dataset="cifar10",
        source="tfds",
        data_dir=None,
        path=None,
        npz_image_key="images",
        npz_label_key="labels",
        train_split="train",
        test_split="test",
        val_split=None,
        max_train_examples=None,
        max_test_examples=None,
        pad=4,
        pad_mode="reflect",
        flip=True,
        search_val_fraction=0.3,
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


# ----------------------------------------------------------------------------------------- splits

UNEVEN_LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [10, 23, 7, 50]))


def test_stratified_split_partitions_each_class_in_proportion():
    train, val = data.stratified_split(UNEVEN_LABELS, 0.3, seed=1)
    assert train.dtype == val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert not set(train) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(90))
    for c, n_c in enumerate([10, 23, 7, 50]):
        n_val = np.sum(UNEVEN_LABELS[val] == c)
        assert abs(n_val - 0.3 * n_c) <= 1
        assert n_val == np.floor(n_c * 0.3 + 0.5)


def test_stratified_split_is_deterministic_in_seed():
    first = data.stratified_split(UNEVEN_LABELS, 0.3, seed=1)
    again = data.stratified_split(UNEVEN_LABELS, 0.3, seed=1)
    other = data.stratified_split(UNEVEN_LABELS, 0.3, seed=2)
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_cifar_sized_split_is_35k_15k():
    labels = np.repeat(np.arange(100), 500)
    train, val = data.stratified_split(labels, 0.3, seed=0)
    assert (len(train), len(val)) == (35_000, 15_000)
    np.testing.assert_array_equal(np.bincount(labels[val]), np.full(100, 150))


def test_load_or_create_split_round_trip_and_mismatch(tmp_path):
    path = str(tmp_path / "search" / "split.json")
    train, val = data.load_or_create_split(path, UNEVEN_LABELS, 0.3, seed=3)
    expected = data.stratified_split(UNEVEN_LABELS, 0.3, seed=3)
    np.testing.assert_array_equal(train, expected[0])
    np.testing.assert_array_equal(val, expected[1])
    saved = json.loads((tmp_path / "search" / "split.json").read_text())
    assert (saved["seed"], saved["val_fraction"], saved["num_examples"]) == (3, 0.3, 90)
    assert os.listdir(tmp_path / "search") == ["split.json"]  # no temp file left behind

    # What a host crash can leave of a file that was not flushed to the disk: a named error.
    (tmp_path / "search" / "split.json").write_text("")
    with pytest.raises(data.DataError, match="split.json cannot be read.*delete it to re-split"):
        data.load_or_create_split(path, UNEVEN_LABELS, 0.3, seed=3)
    (tmp_path / "search" / "split.json").unlink()
    synced = []
    real_fsync = os.fsync
    with pytest.MonkeyPatch.context() as patch:  # Written as every record is: flushed first.
        patch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
        data.load_or_create_split(path, UNEVEN_LABELS, 0.3, seed=3)
    assert synced
    assert json.loads((tmp_path / "search" / "split.json").read_text()) == saved

    # A different split of the same labels must come back as the saved one, not a new one.
    (tmp_path / "search" / "split.json").write_text(
        json.dumps({**saved, "train": saved["train"][::-1]})
    )
    reloaded, _ = data.load_or_create_split(path, UNEVEN_LABELS, 0.3, seed=3)
    np.testing.assert_array_equal(reloaded, train[::-1])

    for labels, fraction, seed in [
        (UNEVEN_LABELS, 0.3, 4),
        (UNEVEN_LABELS, 0.2, 3),
        (UNEVEN_LABELS[:-1], 0.3, 3),
        ((UNEVEN_LABELS + 1) % 4, 0.3, 3),  # same size, other dataset
    ]:
        with pytest.raises(data.DataError, match="split.json"):
            data.load_or_create_split(path, labels, fraction, seed)


@pytest.mark.parametrize(
    "splits, overlapping",
    [
        # (train, test, val): slices of one TFDS split that may share examples are refused.
        (("train", "test", "test[:50%]"), ("data.val_split", "data.test_split")),
        (("train", "train[:10%]", None), ("data.test_split", "data.train_split")),
        (("train", "test+train", None), ("data.test_split", "data.train_split")),
        (("train", "test", "train[70%:]"), ("data.val_split", "data.train_split")),
        (("train[:80%]", "test", "train[70%:]"), ("data.val_split", "data.train_split")),
        (("train[:70%]", "test", "train[35000:]"), ("data.val_split", "data.train_split")),
        (("train[:-10]", "test", "train[-10:]"), ("data.val_split", "data.train_split")),
        # tfds counts a negative percent from the end: '[:-10%]' is the first 90 %.
        (("train[:-10%]", "test", "train[80%:]"), ("data.val_split", "data.train_split")),
        # Disjoint percent or index ranges of one split, or no shared split, are accepted.
        (("train[:70%]", "test", "train[70%:]"), None),
        (("train[:-30%]", "test", "train[-30%:]"), None),
        (("train[:35000]", "test[50%:]", "train[35000:]"), None),
        (("train[:90%]", "test", "train[90%:]+test[:0%]"), None),
        (("train[:90%]", "test", "train[90%:]+test[:0]"), None),
        (("train", "test[:50%]", "test[50%:]"), None),
    ],
)
def test_tfds_splits_sharing_examples_are_refused(splits, overlapping):
    """The search would tune beta on test or training images, or the test accuracy be measured
    on training images: refused before anything loads, naming both fields and the fix."""
    train, test, val = splits
    cfg = data_cfg(train_split=train, test_split=test, val_split=val)
    problems = sources.TfdsSource.check(cfg)
    if overlapping is None:
        assert problems == []
        return
    (message,) = problems
    assert all(field in message for field in overlapping), message
    assert "give each its own split or disjoint slices" in message, message
    if overlapping[0] == "data.val_split":
        assert "leave data.val_split unset" in message, message


def test_stratified_subset_keeps_every_class():
    picked = data.stratified_subset(UNEVEN_LABELS, 10, seed=0)
    assert len(picked) == 10 and np.all(np.diff(picked) > 0)
    counts = np.bincount(UNEVEN_LABELS[picked], minlength=4)
    assert counts.min() >= 2 and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(picked, data.stratified_subset(UNEVEN_LABELS, 10, seed=0))
    np.testing.assert_array_equal(data.stratified_subset(UNEVEN_LABELS, None, 0), np.arange(90))
    np.testing.assert_array_equal(data.stratified_subset(UNEVEN_LABELS, 500, 0), np.arange(90))


# ----------------------------------------------------------------------------------- augmentation

AUG_STATIC = ("pad", "pad_mode", "flip")


def _recover_window(output, padded, size):
    """All (dy, dx, flipped) such that `output` is that window of `padded`."""
    found = []
    for dy in range(padded.shape[0] - size + 1):
        for dx in range(padded.shape[1] - size + 1):
            window = padded[dy : dy + size, dx : dx + size]
            found += [(dy, dx, False)] if np.array_equal(output, window) else []
            found += [(dy, dx, True)] if np.array_equal(output, window[:, ::-1]) else []
    return found


def test_augment_identity_without_pad_or_flip():
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    out = data.random_crop_flip(jnp.asarray(images), jax.random.key(0), 0, "reflect", False)
    np.testing.assert_array_equal(np.asarray(out), images)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_augment_outputs_are_windows_of_the_padded_input(pad_mode):
    size, pad = 8, 3
    # Values in [1, 2): all distinct, and a zero can only come from constant padding.
    images = np.random.default_rng(1).uniform(1, 2, (48, size, size, 3)).astype(np.float32)
    out = data.random_crop_flip(jnp.asarray(images), jax.random.key(5), pad, pad_mode, True)
    out = np.asarray(out)
    assert out.shape == images.shape and out.dtype == np.float32
    offsets, flips = set(), []
    for image, result in zip(images, out):
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
        (window,) = _recover_window(result, padded, size)
        offsets.add(window[:2])
        flips.append(window[2])
    assert len(offsets) > 10  # offsets are drawn per example over the whole range
    assert 0 < sum(flips) < len(flips)
    has_zero = np.any(out == 0)
    assert has_zero if pad_mode == "constant" else not has_zero


def test_augment_offsets_are_uniform_over_every_shift():
    """Each axis's shift is uniform over all 2*pad+1 positions (torchvision's RandomCrop on the
    padded image), the right and bottom ends included."""
    size, pad, n = 12, 4, 9000
    # Pixel (y, x) holds y*size + x: the output's pixel (pad, pad) is the input's (dy, dx).
    coords = np.arange(size * size, dtype=np.int32).reshape(size, size)
    images = jnp.broadcast_to(jnp.asarray(coords)[None, :, :, None], (n, size, size, 1))
    out = data.random_crop_flip(images, jax.random.key(11), pad, "constant", False)
    at = np.asarray(out[:, pad, pad, 0])
    for shifts in (at // size, at % size):
        counts = np.bincount(shifts, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1
        # n / 9 = 1000 each; 5 standard deviations ~ 150.
        assert counts.min() > 850 and counts.max() < 1150, counts


def test_augment_flip_rate_is_one_half():
    images = jnp.broadcast_to(jnp.arange(4, dtype=jnp.uint8)[None, None, :, None], (4000, 4, 4, 1))
    out = data.random_crop_flip(images, jax.random.key(2), 0, "reflect", True)
    flipped = np.asarray(out[:, 0, 0, 0] == 3)
    assert np.all(np.asarray(out[:, 0, 0, 0]) % 3 == 0)  # every output is original or mirrored
    assert 0.45 < flipped.mean() < 0.55


def test_augment_is_deterministic_and_jittable():
    images = jnp.asarray(np.random.default_rng(3).integers(0, 256, (16, 32, 32, 3), np.uint8))
    eager = data.random_crop_flip(images, jax.random.key(7), 4, "reflect", True)
    jitted = jax.jit(data.random_crop_flip, static_argnames=AUG_STATIC)(
        images, jax.random.key(7), pad=4, pad_mode="reflect", flip=True
    )
    other = data.random_crop_flip(images, jax.random.key(8), 4, "reflect", True)
    assert eager.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    assert not np.array_equal(np.asarray(eager), np.asarray(other))


def test_normalize_matches_numpy():
    images = np.random.default_rng(4).integers(0, 256, (3, 4, 4, 3), np.uint8)
    info = data.DATASETS["cifar100"]
    out = data.normalize(jnp.asarray(images), info.mean, info.std)
    expected = (images / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_config_mean_and_std_replace_the_datasets_normalisation():
    """data.mean / data.std (an imported teacher's statistics) reach the run's DatasetInfo, which
    the train step's preprocessing and the evaluation both normalise with."""
    from test_config import load_config

    from dfa_jax import inputs

    config = load_config("demo", "tiny")
    config.data.mean, config.data.std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    config.data.pad, config.data.flip = 0, False  # Normalisation alone.
    run = inputs.load(config, workdir="", search=False)
    assert run.info.mean == config.data.mean and run.info.std == config.data.std
    assert run.info.num_classes == data.DATASETS["digits"].num_classes
    images = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), np.uint8)
    preprocess = inputs.make_train_preprocess(config.data, run.info)
    out = preprocess({"image": jnp.asarray(images)}, jax.random.key(0))["image"]
    expected = (images / 255.0 - np.asarray(config.data.mean)) / np.asarray(config.data.std)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    config.data.mean = config.data.std = None
    assert inputs.load(config, workdir="", search=False).info == data.DATASETS["digits"]


# ----------------------------------------------------------------------------------------- loader


def _indexed_examples(n):
    """uint8 images whose pixels all equal the example index; label = index % 7."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3))
    return data.ArrayExamples(np.ascontiguousarray(images), np.arange(n) % 7)


def _ids(batches):
    return np.concatenate([b["image"][:, 0, 0, 0] for b in batches]).astype(int)


def test_train_batches_order_resume_and_remainder():
    examples = _indexed_examples(103)
    batches = list(data.train_batches(examples, 10, seed=0, epoch=0))
    assert len(batches) == data.steps_per_epoch(103, 10) == 10
    assert len(set(_ids(batches))) == 100  # each example at most once, 3 dropped
    for b in batches:
        assert b["image"].shape == (10, 4, 4, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32
        np.testing.assert_array_equal(b["label"], b["image"][:, 0, 0, 0] % 7)
    same = list(data.train_batches(examples, 10, seed=0, epoch=0))
    next_epoch = list(data.train_batches(examples, 10, seed=0, epoch=1))
    resumed = list(data.train_batches(examples, 10, seed=0, epoch=0, start_batch=7))
    for a, b in zip(batches, same):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(batches[0]["image"], next_epoch[0]["image"])
    assert len(resumed) == 3
    for a, b in zip(batches[7:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
    with pytest.raises(ValueError):
        data.steps_per_epoch(5, 10)


@pytest.mark.parametrize("processes", [2, 5])
def test_process_rows_of_train_batches_make_the_one_process_batches(processes):
    """Each process reads only its rows; together, in process order, they are the batches one
    process would read, so the run does not depend on the process count."""
    examples = _indexed_examples(103)
    whole = list(data.train_batches(examples, 10, seed=3, epoch=2))
    per = 10 // processes
    parts = [
        list(data.train_batches(examples, 10, 3, 2, rows=slice(p * per, (p + 1) * per)))
        for p in range(processes)
    ]
    for k, batch in enumerate(whole):
        np.testing.assert_array_equal(
            np.concatenate([parts[p][k]["image"] for p in range(processes)]), batch["image"]
        )
        assert all(len(parts[p][k]["label"]) == per for p in range(processes))


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_eval_batches_cover_every_example_once_with_masks(processes):
    examples = _indexed_examples(23)
    per = 12 // processes
    seen, count = [], 0
    for p in range(processes):
        batches = list(data.eval_batches(examples, 12, rows=slice(p * per, (p + 1) * per)))
        assert len(batches) == 2  # every process runs the same number of steps
        for b in batches:
            assert b["image"].shape == (per, 4, 4, 3) and b["mask"].dtype == np.float32
            real = b["mask"] == 1
            seen.extend(b["image"][real, 0, 0, 0].astype(int))
            np.testing.assert_array_equal(b["label"][real], b["image"][real, 0, 0, 0] % 7)
            count += int(real.sum())
    assert count == 23 and sorted(seen) == list(range(23))


# ------------------------------------------------------------------------------------------- tfds


@pytest.mark.parametrize("random_access", [False, True], ids=["tf.data", "data_source"])
@pytest.mark.parametrize("dataset, num_classes", [("cifar100", 100), ("cifar10", 10)])
def test_tfds_source_under_mock_data(tmp_path, monkeypatch, dataset, num_classes, random_access):
    """Prepared as tfrecord, tf.data reads the split; as array_record, `tfds.data_source`."""
    readers = []
    real_data_source = tfds.core.DatasetBuilder.as_data_source

    def as_data_source(self, *args, **kwargs):
        readers.append("data_source")
        return real_data_source(self, *args, **kwargs)

    monkeypatch.setattr(sources, "_random_access", lambda builder: random_access)
    with tfds.testing.mock_data(num_examples=12):
        monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", as_data_source)
        source = data.make_source(data_cfg(dataset=dataset, data_dir=str(tmp_path)))
        labels = source.labels("train")
        images = source.images("train", np.array([0, 5, 11]))
    assert labels.shape == (12,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < num_classes
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert readers == (["data_source"] if random_access else [])


def test_tfds_prepare_reads_the_train_split_once(tmp_path):
    """`prepare` (process 0's, before the others read) goes through the read path, which
    prepares an unprepared dataset, and keeps what it read: the run's own read is not a second
    one."""
    reads = []
    with tfds.testing.mock_data(num_examples=12):
        source = data.make_source(data_cfg(dataset="cifar10", data_dir=str(tmp_path)))
        real_read = source._read
        source._read = lambda tfds_module, split: (
            reads.append(split) or real_read(tfds_module, split)
        )
        source.prepare()
        assert reads == ["train"]
        assert source.labels("train").shape == (12,)
        assert reads == ["train"]
        # Prepared already: nothing to do, and the other processes do not wait for a read.
        prepared = data.make_source(data_cfg(dataset="cifar10", data_dir=str(tmp_path)))
        prepared._read = lambda tfds_module, split: reads.append(split)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
            prepared.prepare()
    assert reads == ["train"]


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_0_prepares_the_data_and_the_others_wait_for_it(monkeypatch, process):
    """Processes sharing a data directory (a gs:// TFDS data_dir on a pod) must not download
    and prepare it at once: process 0 prepares before the barrier, every process reads after."""
    from test_config import load_config

    from dfa_jax import inputs, parallel

    events = []
    real_make_source = data.make_source

    def make_source(data_cfg):
        source = real_make_source(data_cfg)
        source.prepare = lambda: events.append("prepare")
        real_labels = source.labels
        source.labels = lambda split: events.append("read") or real_labels(split)
        return source

    monkeypatch.setattr(data, "make_source", make_source)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(parallel, "sync", lambda tag: events.append("sync"))
    inputs.load(load_config("demo", "tiny"), workdir="", search=False)
    first_read = events.index("read")
    assert events[:first_read] == (["prepare", "sync"] if process == 0 else ["sync"])
    assert "prepare" not in events[first_read:] and events.count("sync") == 1


# Runs the tfds source in a process where `import tensorflow` fails, as after `pip install -e .`.
# `tfds.testing` itself needs TensorFlow, so a stand-in builder holds the prepared dataset.
_WITHOUT_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None  # `import tensorflow` raises ImportError from here on.
import numpy as np
import tensorflow_datasets as tfds
from dfa_jax import config_lib, data, errors, pipeline
from dfa_jax.data import sources

class PreparedBuilder:
    def __init__(self, name, data_dir=None):
        self.name = name
    def is_prepared(self):
        return True
    def as_data_source(self, split):
        return [{"image": np.full((32, 32, 3), i, np.uint8), "label": i % 10} for i in range(12)]

tfds.builder = PreparedBuilder
config = config_lib.base_config()
config.stages = ("teacher",)
config.data.dataset = "cifar10"
config.teacher.model = "wrn_10_1"
sources._random_access = lambda builder: True  # Prepared as array_record.
source = data.make_source(config.data)
labels, images = source.labels("train"), source.images("train", np.array([0, 3]))
print("array_record:", labels.tolist(), images[:, 0, 0, 0].tolist())
sources._random_access = lambda builder: False  # Prepared as tfrecord.
try:
    pipeline.run(config, sys.argv[1])
except errors.InputError as e:
    print("InputError:", e)
"""


def test_tfds_without_tensorflow(tmp_path):
    """After `pip install -e .` (no TensorFlow), array_record data is read; tfrecord data fails
    before any stage starts, naming the extra that brings tf.data."""
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "array_record: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] [0, 3]" in run.stdout, run.stdout
    assert "InputError:" in run.stdout and "pip install -e '.[tfds]'" in run.stdout, run.stdout
    assert "--file_format=array_record" in run.stdout  # The way without TensorFlow.
    assert not (tmp_path / "w" / "teacher").exists()


def _closed_local_port():
    """A local port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return ("127.0.0.1", s.getsockname()[1])


def test_tfds_offline_fails_fast_with_how_to(tmp_path, monkeypatch):
    """Nothing prepared and no network: one probe (refused at once here), then the error; no
    download is attempted."""
    monkeypatch.setattr(sources, "NETWORK_PROBE_ADDRESS", _closed_local_port())
    probes = []
    real_probe = sources.network_reachable
    monkeypatch.setattr(
        sources, "network_reachable", lambda *a, **k: probes.append(1) or real_probe(*a, **k)
    )
    source = data.make_source(data_cfg(dataset="cifar100", data_dir=str(tmp_path / "empty")))
    with pytest.raises(data.DataError) as error:
        source.labels("train")
    assert len(probes) == 1
    assert not any((tmp_path / "empty").glob("**/*.tfrecord*"))
    message = str(error.value)
    for hint in ["tfds build cifar100", "--config.data.data_dir", "source=npz", "image_folder"]:
        assert hint in message


def test_network_probe():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert sources.network_reachable(server.getsockname(), timeout_s=2)
    # Bounds at half of what waiting would take, so that a loaded machine cannot fail them.
    start = time.monotonic()
    assert not sources.network_reachable(_closed_local_port(), timeout_s=120)
    assert time.monotonic() - start < 60  # a refusal ends the probe, no waiting for the timeout
    start = time.monotonic()
    # TEST-NET-1 is never routed: either refused at once or timed out by the probe, well before
    # the operating system's own connect timeout (minutes).
    assert not sources.network_reachable(("192.0.2.1", 9), timeout_s=1)
    assert time.monotonic() - start < 60


def test_make_source_rejects_bad_config():
    with pytest.raises(data.DataError, match="data.dataset"):
        data.make_source(data_cfg(dataset="mnist"))
    with pytest.raises(data.DataError, match="data.source"):
        data.make_source(data_cfg(source="hdf5"))
    with pytest.raises(data.DataError, match="image_folder"):
        data.make_source(data_cfg(dataset="cinic10", source="tfds"))
    with pytest.raises(data.DataError, match="data.path"):
        data.make_source(data_cfg(source="npz"))


# ----------------------------------------------------------------------------------- image_folder

CLASSES = ["dog", "ant", "cat"]  # sorted: ant=0, cat=1, dog=2


def _write_tree(root):
    """root/{train,valid,test}/{class}/: PNGs (exact pixels) and a JPG per class in train."""
    rng = np.random.default_rng(0)
    pixels = {}
    for split, per_class in [("train", 3), ("valid", 2), ("test", 1)]:
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                if split == "train" and k == 2:
                    # One flat colour: JPEG keeps it nearly exact (noise it would not).
                    image = np.broadcast_to(rng.integers(0, 256, 3, np.uint8), (32, 32, 3))
                    Image.fromarray(np.ascontiguousarray(image)).save(folder / f"img{k}.jpg")
                else:
                    image = rng.integers(0, 256, (32, 32, 3), np.uint8)
                    Image.fromarray(image).save(folder / f"img{k}.png")
                pixels[(split, name, k)] = image
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return pixels


@pytest.fixture
def open_counter(monkeypatch):
    opened = []
    real_open = sources.Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources.Image, "open", counting_open)
    return opened


def test_image_folder_labels_and_lazy_decoding(tmp_path, open_counter, caplog):
    pixels = _write_tree(tmp_path)
    cfg = data_cfg(dataset="cinic10", source="image_folder", path=str(tmp_path))
    source = data.make_source(cfg)
    caplog.set_level(logging.WARNING, logger="absl")
    np.testing.assert_array_equal(source.labels("train"), [0, 0, 0, 1, 1, 1, 2, 2, 2])
    # Three class folders for CINIC-10's ten: trainable, but said (a partly extracted dataset?).
    assert "has 3 class folders but data.dataset = 'cinic10' has 10 classes" in caplog.text
    np.testing.assert_array_equal(source.labels("valid"), [0, 0, 1, 1, 2, 2])
    assert source.class_names == ["ant", "cat", "dog"]
    assert open_counter == []  # labels never decode

    images = source.images("train", np.array([4, 0, 2]))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert sorted(os.path.basename(p) for p in open_counter) == ["img0.png", "img1.png", "img2.jpg"]
    np.testing.assert_array_equal(images[0], pixels[("train", "cat", 1)])
    np.testing.assert_array_equal(images[1], pixels[("train", "ant", 0)])
    # JPEG is lossy: close, not equal.
    assert np.abs(images[2].astype(int) - pixels[("train", "ant", 2)]).max() <= 3

    source.images("train", np.array([0, 4]))
    assert len(open_counter) == 3  # cached
    test_image = source.images("test", np.array([2]))[0]
    np.testing.assert_array_equal(test_image, pixels[("test", "dog", 0)])


def test_image_folder_errors_name_the_path(tmp_path):
    _write_tree(tmp_path)
    bad = tmp_path / "test" / "cat" / "img9.png"
    bad.write_bytes(b"not a png")
    small = tmp_path / "valid" / "dog" / "img9.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small)
    (tmp_path / "valid" / "eel").mkdir()
    source = data.make_source(data_cfg(source="image_folder", path=str(tmp_path)))
    with pytest.raises(data.DataError, match=str(bad)):
        source.images("test", np.arange(len(source.labels("test"))))
    with pytest.raises(data.DataError, match=str(tmp_path / "nope")):
        source.labels("nope")
    with pytest.raises(data.DataError, match="eel"):
        source.labels("valid")
    (tmp_path / "valid" / "eel").rmdir()
    with pytest.raises(data.DataError, match=f"{small}.*16x16"):
        source.images("valid", np.arange(len(source.labels("valid"))))


def test_image_folder_reads_torchvisions_formats_and_refuses_an_empty_class(tmp_path):
    """The authors read CINIC-10 with torchvision's ImageFolder: the formats it reads are read
    (lossless ones exactly), and a class folder with none of them is refused, as it refuses it,
    instead of the split silently losing that class (or all its images)."""
    pixels = _write_tree(tmp_path)
    for k, image_format in enumerate(["bmp", "tiff", "webp"]):  # webp: lossless below
        folder = tmp_path / "test" / ["ant", "cat", "dog"][k]
        png = folder / "img0.png"
        Image.open(png).save(folder / f"img0.{image_format}", lossless=True)
        png.unlink()
    source = data.make_source(data_cfg(source="image_folder", path=str(tmp_path)))
    np.testing.assert_array_equal(source.labels("test"), [0, 1, 2])
    images = source.images("test", np.arange(3))
    for k, name in enumerate(["ant", "cat", "dog"]):
        np.testing.assert_array_equal(images[k], pixels[("test", name, 0)])

    for f in (tmp_path / "valid" / "cat").iterdir():
        f.rename(f.with_suffix(".gif"))  # A format ImageFolder does not read either.
    with pytest.raises(data.DataError, match=r"no image file in class folder\(s\) cat of"):
        source.labels("valid")


def test_a_split_without_a_class_folder_keeps_the_training_splits_labels(tmp_path):
    """Labels are the train split's sorted class folders (ant=0, cat=1, dog=2) in every split:
    a test split that lacks the 'ant' folder labels its cat and dog images 1 and 2, not 0 and 1
    (which would score the model against the wrong classes)."""
    pixels = _write_tree(tmp_path)
    for f in (tmp_path / "test" / "ant").iterdir():
        f.unlink()
    (tmp_path / "test" / "ant").rmdir()
    source = data.make_source(data_cfg(source="image_folder", path=str(tmp_path)))
    np.testing.assert_array_equal(source.labels("test"), [1, 2])
    np.testing.assert_array_equal(
        source.images("test", np.array([1]))[0], pixels[("test", "dog", 0)]
    )


def test_image_folder_reads_grey_palette_and_upper_case_files_as_rgb(tmp_path):
    """As torchvision's ImageFolder reads CINIC-10 (the authors' reader): a file's extension
    matches in any case ('IMG0.PNG'), and a grey or palette image (CINIC-10 holds grey ones from
    ImageNet) is read as RGB, its grey value in all three channels, its palette's colours."""
    _write_tree(tmp_path)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (32, 32), np.uint8)
    palette = rng.integers(0, 256, (256, 3), np.uint8)
    indices = rng.integers(0, 256, (32, 32), np.uint8)
    test = tmp_path / "test"
    for name in CLASSES:
        for f in (test / name).iterdir():
            f.unlink()
    Image.fromarray(grey, mode="L").save(test / "ant" / "IMG0.PNG")
    paletted = Image.fromarray(indices, mode="P")
    paletted.putpalette(palette.ravel().tolist())
    paletted.save(test / "cat" / "img0.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(test / "dog" / "img0.Png")
    source = data.make_source(data_cfg(source="image_folder", path=str(tmp_path)))
    np.testing.assert_array_equal(source.labels("test"), [0, 1, 2])
    images = source.images("test", np.arange(2))
    np.testing.assert_array_equal(images[0], np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(images[1], palette[indices])


def test_an_empty_test_split_is_refused_before_training(tmp_path):
    """Evaluated after every epoch: an empty test split used to train a whole epoch first and
    then die dividing by zero."""
    from test_config import load_config

    from dfa_jax import inputs

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "train.npz",
        images=rng.integers(0, 256, (64, 32, 32, 3), np.uint8),
        labels=np.arange(64) % 10,
    )
    np.savez(
        tmp_path / "test.npz", images=np.zeros((0, 32, 32, 3), np.uint8), labels=np.zeros(0, int)
    )
    config = load_config("demo", "tiny")
    config.data.source, config.data.path, config.data.dataset = "npz", str(tmp_path), "cifar10"
    run = inputs.load(config, workdir="", search=False)
    with pytest.raises(data.DataError, match="data.test_split = 'test' has no examples"):
        inputs.check_batch_sizes(config, run)


# -------------------------------------------------------------------------------------------- npz


def _write_npz(root, image_key="x", label_key="y"):
    rng = np.random.default_rng(0)
    arrays = {}
    for name, n in [("train_00", 5), ("train_01", 7), ("test", 4)]:
        images = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        np.savez(root / f"{name}.npz", **{image_key: images, label_key: labels})
        arrays[name] = (images, labels)
    return arrays


def test_npz_source_concatenates_shards_and_loads_only_needed_files(tmp_path, monkeypatch):
    arrays = _write_npz(tmp_path)
    source = data.make_source(
        data_cfg(source="npz", path=str(tmp_path), npz_image_key="x", npz_label_key="y")
    )
    train_labels = np.concatenate([arrays["train_00"][1], arrays["train_01"][1]])
    np.testing.assert_array_equal(source.labels("train"), train_labels)
    np.testing.assert_array_equal(source.labels("test"), arrays["test"][1])

    loaded = []
    real_load = np.load
    monkeypatch.setattr(
        np, "load", lambda f, *a, **k: loaded.append(os.path.basename(f)) or real_load(f, *a, **k)
    )
    images = source.images("train", np.array([8, 6]))
    assert loaded == ["train_01.npz"]  # rows 5..11 live in the second shard only
    np.testing.assert_array_equal(images, arrays["train_01"][0][[3, 1]])
    images = source.images("train", np.array([6, 1]))
    assert loaded == ["train_01.npz", "train_00.npz"]
    np.testing.assert_array_equal(images[0], arrays["train_01"][0][1])
    np.testing.assert_array_equal(images[1], arrays["train_00"][0][1])
    source.images("train", np.array([0, 11]))
    assert len(loaded) == 2  # cached

    only_train = data.make_source(
        data_cfg(
            source="npz", path=str(tmp_path / "train_*.npz"), npz_image_key="x", npz_label_key="y"
        )
    )
    assert len(only_train.labels("train")) == 12
    with pytest.raises(data.DataError, match="test"):
        only_train.labels("test")


def test_npz_shards_are_read_in_sorted_order_whatever_order_the_directory_lists(
    tmp_path, monkeypatch
):
    """A split's rows are its shards' in sorted path order, not in the order the file system
    lists them (which differs between file systems and copies): the search's saved split and
    every host's rows name the same images wherever the data lives."""
    arrays = _write_npz(tmp_path)
    real_glob = sources.glob.glob
    monkeypatch.setattr(sources.glob, "glob", lambda pattern: sorted(real_glob(pattern))[::-1])
    source = data.make_source(
        data_cfg(source="npz", path=str(tmp_path), npz_image_key="x", npz_label_key="y")
    )
    np.testing.assert_array_equal(
        source.labels("train"), np.concatenate([arrays["train_00"][1], arrays["train_01"][1]])
    )
    np.testing.assert_array_equal(source.images("train", np.array([0])), arrays["train_00"][0][:1])


def test_npz_files_of_a_longer_split_name_are_its_own(tmp_path):
    """`train_val_0.npz` is the 'train_val' split's when the run uses one, never also 'train''s
    (the search would train w on its beta's images); without such a split it is 'train''s."""
    arrays = _write_npz(tmp_path)
    np.savez(tmp_path / "train_val_0.npz", x=arrays["test"][0], y=arrays["test"][1])
    with_val = data.make_source(
        data_cfg(
            source="npz",
            path=str(tmp_path),
            npz_image_key="x",
            npz_label_key="y",
            val_split="train_val",
        )
    )
    assert len(with_val.labels("train")) == 12
    np.testing.assert_array_equal(with_val.labels("train_val"), arrays["test"][1])
    without = data.make_source(
        data_cfg(source="npz", path=str(tmp_path), npz_image_key="x", npz_label_key="y")
    )
    assert len(without.labels("train")) == 16


def test_npz_missing_key_names_file_key_and_field(tmp_path):
    _write_npz(tmp_path)
    source = data.make_source(data_cfg(source="npz", path=str(tmp_path), npz_label_key="y"))
    with pytest.raises(data.DataError) as error:
        source.labels("train")
    message = str(error.value)
    assert "train_00.npz" in message and "'images'" in message and "data.npz_image_key" in message


# ---------------------------------------------------------------------------------------- bundled


def test_digits_read_without_scikit_learn_are_load_digits(monkeypatch):
    """The file read directly holds `load_digits`'s images and labels in its order (the split
    depends on it), without importing scikit-learn; where the file is missing, `load_digits`."""
    script = (
        "import sys; from dfa_jax.data import sources; table = sources.digits_table();"
        " assert 'sklearn' not in sys.modules, 'imported'; print(table.shape)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "(1797, 65)", done.stderr[-2000:]

    from sklearn.datasets import load_digits

    reference = load_digits()
    direct = sources.digits_table()
    # As if the file were not found: this module's view of importlib only, not the process's.
    no_spec = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: None))
    monkeypatch.setattr(sources, "importlib", no_spec)
    for table in (direct, sources.digits_table()):
        np.testing.assert_array_equal(table[:, :-1].reshape(-1, 8, 8), reference.images)
        np.testing.assert_array_equal(table[:, -1], reference.target)


def test_bundled_digits():
    from sklearn.datasets import load_digits

    source = data.make_source(data_cfg(dataset="digits", source="bundled"))
    train, test = source.labels("train"), source.labels("test")
    assert (len(train), len(test)) == (1438, 359)
    assert set(train) == set(test) == set(range(10))
    train_images = source.images("train", np.arange(len(train)))
    test_images = source.images("test", np.arange(len(test)))
    assert train_images.shape == (1438, 32, 32, 3) and train_images.dtype == np.uint8
    assert train_images.max() == 255
    np.testing.assert_array_equal(train_images[..., 0], train_images[..., 2])
    # Together the two splits are exactly the 1797 digits (so they are disjoint).
    originals = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    ours = np.concatenate([train_images, test_images])[:, ::4, ::4, 0]
    assert sorted(map(bytes, ours)) == sorted(map(bytes, originals))
    info = data.DATASETS["digits"]
    np.testing.assert_allclose(train_images.mean() / 255, info.mean[0], atol=1e-4)
    np.testing.assert_allclose(train_images.std() / 255, info.std[0], atol=1e-4)


def test_bundled_digits_images_carry_scikit_learns_labels():
    """Each bundled image, train and test, has the label scikit-learn's `load_digits` gives that
    digit: the demo's accuracy is scored against the digits' own labels."""
    from sklearn.datasets import load_digits

    reference = load_digits()
    originals = np.rint(reference.images * (255 / 16)).astype(np.uint8)
    labels_of = {}
    for image, label in zip(originals, reference.target):
        labels_of.setdefault(bytes(image), set()).add(int(label))
    source = data.make_source(data_cfg(dataset="digits", source="bundled"))
    for split in ("train", "test"):
        labels = source.labels(split)
        images = source.images(split, np.arange(len(labels)))[:, ::4, ::4, 0]
        wrong = [i for i, (x, y) in enumerate(zip(images, labels)) if y not in labels_of[bytes(x)]]
        assert wrong == [], (split, len(wrong))


def test_max_examples_caps_keep_every_class():
    source = data.make_source(
        data_cfg(dataset="digits", source="bundled", max_train_examples=25, max_test_examples=5)
    )
    train, test = source.labels("train"), source.labels("test")
    assert len(train) == 25 and set(train) == set(range(10))
    assert len(test) == 5 and len(set(test)) == 5
    assert source.images("train", np.arange(25)).shape == (25, 32, 32, 3)
    with pytest.raises(IndexError):
        source.images("train", np.array([25]))


def test_a_capped_splits_images_are_the_ones_its_labels_name(tmp_path):
    """Under max_train_examples / max_test_examples (which caps every split but the training
    one, a given val split too), the image at index i of a split is the one whose label is
    labels(split)[i], and a split's kept images are its own: each image here carries its label
    and its example id in its pixels, so the pairs are checked against the files, not against
    the source."""
    rng = np.random.default_rng(0)

    def write(name, ids):
        labels = rng.integers(0, 10, len(ids))
        images = np.zeros((len(ids), 32, 32, 3), np.uint8)
        images[:, 0, 0, 0] = labels
        images[:, 0, 0, 1], images[:, 0, 0, 2] = ids % 256, ids // 256
        np.savez(tmp_path / f"{name}.npz", images=images, labels=labels)

    write("train_00", np.arange(0, 37))  # Two shards: rows 37.. live in the second.
    write("train_01", np.arange(37, 80))
    write("test", np.arange(1000, 1040))
    write("val", np.arange(2000, 2030))  # A given val split: capped as the test split is.
    source = data.make_source(
        data_cfg(
            source="npz",
            path=str(tmp_path),
            val_split="val",
            max_train_examples=25,
            max_test_examples=10,
        )
    )
    expected = (("train", 25, range(80)), ("test", 10, range(1000, 1040)))
    for split, count, ids in expected + (("val", 10, range(2000, 2030)),):
        labels = source.labels(split)
        assert len(labels) == count
        # In a scrambled order, so that an image read at another row would show.
        order = rng.permutation(count)
        images = source.images(split, order)
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels[order], err_msg=split)
        read_ids = images[:, 0, 0, 1].astype(int) + 256 * images[:, 0, 0, 2].astype(int)
        assert len(set(read_ids)) == count and set(read_ids) <= set(ids), split


def test_random_resized_crop_full_box_is_identity():
    from dfa_jax.data import augment

    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)), jnp.uint8)
    y = augment.random_resized_crop_flip(
        x, jax.random.key(0), flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float32), atol=1e-4)


def _torchvision_boxes(rng, n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's `RandomResizedCrop.get_params`, in NumPy: ten tries, then the centre."""
    out = []
    for _ in range(n):
        for _ in range(10):
            area = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                out.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
                break
        else:  # A square image: the whole of it.
            out.append((0, 0, height, width))
    return np.array(out)


def test_random_resized_crop_draws_torchvisions_boxes():
    """Box sizes distributed as torchvision's (redrawn, not clipped, when too large: clipping
    piled ~14 % of draws at the full width or height), whole pixels, inside the image."""
    from dfa_jax.data import augment

    n = 20000
    ours = np.stack(
        [np.asarray(v) for v in augment.resized_crop_boxes(jax.random.key(0), n, 32, 32)], 1
    )
    theirs = _torchvision_boxes(np.random.default_rng(0), n, 32, 32)
    assert np.array_equal(ours, np.round(ours)) and ours[:, 2:].min() >= 1
    assert (ours[:, 0] + ours[:, 2] <= 32).all() and (ours[:, 1] + ours[:, 3] <= 32).all()
    assert (ours[:, :2] >= 0).all()
    for column, name in ((2, "height"), (3, "width")):
        mine = np.bincount(ours[:, column].astype(int), minlength=33) / n
        ref = np.bincount(theirs[:, column].astype(int), minlength=33) / n
        assert 0.5 * np.abs(mine - ref).sum() < 0.03, name  # total variation
    # Offsets uniform over the places the box fits: the mean slack used is one half.
    used = ours[:, 1] / np.maximum(32 - ours[:, 3], 1)
    assert abs(used[ours[:, 3] < 32].mean() - 0.5) < 0.02


def test_random_resized_crop_equals_torchvisions_crop_and_resize_of_a_pil_image():
    """What torchvision's RandomResizedCrop does to a PIL image (CINIC-10's ImageFolder), given
    the box: `img.crop(box).resize((32, 32), BILINEAR)`, equal to the pixel (a resample from
    the whole image blended in the pixels beyond the box's edges, 20-25 levels off there)."""
    image_module = pytest.importorskip("PIL.Image")
    from dfa_jax.data import augment

    images = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3)).astype(np.uint8)
    key = jax.random.key(5)
    ours = np.asarray(augment.random_resized_crop_flip(jnp.asarray(images), key, flip=False))
    box_key, _ = jax.random.split(key)
    boxes = augment.resized_crop_boxes(box_key, 48, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3))
    y0, x0, h, w = (np.asarray(v).astype(int) for v in boxes)
    assert len(set(h)) > 10 and len(set(w)) > 10
    theirs = [
        np.asarray(
            image_module.fromarray(image)
            .crop((x0[i], y0[i], x0[i] + w[i], y0[i] + h[i]))
            .resize((32, 32), image_module.BILINEAR)
        )
        for i, image in enumerate(images)
    ]
    np.testing.assert_array_equal(ours, np.stack(theirs).astype(np.float32))


def test_random_resized_crop_zooms_a_quarter_box_by_two():
    """On a horizontal ramp f(y, x) = 8x, a 16x16 box resampled to 32x32 has slope 8 * 16/32."""
    from dfa_jax.data import augment

    ramp = np.broadcast_to(8.0 * np.arange(32.0)[None, None, :, None], (64, 32, 32, 1))
    y = np.asarray(
        augment.random_resized_crop_flip(
            jnp.asarray(ramp), jax.random.key(3), flip=False, scale=(0.25, 0.25), ratio=(1.0, 1.0)
        )
    )
    slopes = np.diff(y[:, :, 2:-2, 0], axis=2)  # interior: bilinear on a linear map is exact
    np.testing.assert_allclose(slopes, 4.0, atol=1e-3)
    starts = y[:, 0, 2, 0]
    # Each example its own whole-pixel box position, 17 possible: 64 examples take most.
    assert len(np.unique(np.round(starts, 3))) >= 12
    # Bilinear weights sum to one up to rounding: the output stays in the input's range.
    assert ramp.min() - 1e-3 <= y.min() and y.max() <= ramp.max() + 1e-3
    again = augment.random_resized_crop_flip(
        jnp.asarray(ramp), jax.random.key(3), flip=False, scale=(0.25, 0.25), ratio=(1.0, 1.0)
    )
    np.testing.assert_array_equal(np.asarray(again), y)


def test_random_resized_crop_flips_half_of_the_examples_horizontally():
    """CINIC-10's recipe (RandomResizedCrop + RandomHorizontalFlip): with the full box the crop is
    the image itself, so each output is its input or its left-right mirror, about half each."""
    from dfa_jax.data import augment

    row = jnp.arange(4, dtype=jnp.uint8)[None, None, :, None]
    images = jnp.broadcast_to(row, (4000, 4, 4, 1))
    out = np.asarray(
        augment.random_resized_crop_flip(
            images, jax.random.key(3), flip=True, scale=(1.0, 1.0), ratio=(1.0, 1.0)
        )
    )
    mirrored = np.all(out == np.arange(4)[::-1][None, None, :, None], axis=(1, 2, 3))
    kept = np.all(out == np.arange(4)[None, None, :, None], axis=(1, 2, 3))
    assert np.all(mirrored | kept)
    assert 0.45 < mirrored.mean() < 0.55


def test_stratified_split_rounds_half_a_class_up():
    """floor(n_c * f + 0.5), as the docstring states: 15 examples at 0.3 (4.5) give 5 to val,
    5 at 0.5 (2.5) give 3; NumPy's round-half-to-even would give 4 and 2."""
    labels = np.repeat([0, 1], [15, 5])
    for fraction, want in ((0.3, (5, 2)), (0.5, (8, 3))):
        _, val = data.stratified_split(labels, fraction, seed=0)
        assert tuple(np.bincount(labels[val], minlength=2)) == want, fraction


def test_the_searchs_splits_partition_the_training_split(tmp_path):
    """With no data.val_split, beta's validation part and w's training part of the search are
    disjoint rows of the training split that together cover it, in data.search_val_fraction
    (3/10) per class, with the training split's labels."""
    from test_config import load_config

    from dfa_jax import inputs

    config = load_config("demo", "tiny")
    assert config.data.val_split is None
    run = inputs.load(config, str(tmp_path), search=True)
    train, val = run.search_train, run.search_val
    assert train.split == val.split == config.data.train_split
    assert not set(train.rows) & set(val.rows)
    assert sorted([*train.rows, *val.rows]) == list(range(len(run.train.labels)))
    np.testing.assert_array_equal(val.labels, np.asarray(run.train.labels)[val.rows])
    for c in np.unique(run.train.labels):
        n = int(np.sum(run.train.labels == c))
        assert int(np.sum(val.labels == c)) == math.floor(n * 0.3 + 0.5), c


def test_an_epoch_that_divides_into_batches_reads_every_example_once():
    """100 examples in batches of 10: 10 full batches, every example exactly once, for one
    process and for each process's rows together."""
    examples = _indexed_examples(100)
    whole = list(data.train_batches(examples, 10, seed=1, epoch=0))
    assert [len(b["label"]) for b in whole] == [10] * 10
    assert sorted(_ids(whole)) == list(range(100))
    parts = [
        list(data.train_batches(examples, 10, 1, 0, rows=slice(p * 5, p * 5 + 5))) for p in (0, 1)
    ]
    assert sorted(np.concatenate([_ids(part) for part in parts])) == list(range(100))


@pytest.mark.parametrize(
    "field, size, split",
    [
        ("teacher.optim.batch_size", 41, "train"),
        ("distill.optim.batch_size", 41, "train"),
        ("search.batch_size", 13, "search val"),
        ("search.batch_size", 29, "search train"),
    ],
)
def test_a_split_smaller_than_one_batch_names_its_batch_size(field, size, split):
    """40 training examples split 28 / 12 for the search: a batch one larger than the split a
    stage trains on is refused before any compile, naming the split and the field; a batch of
    the split's size is not. A teacher loaded from a checkpoint trains nothing: no check."""
    from test_config import load_config

    from dfa_jax import inputs

    def examples(n):
        return types.SimpleNamespace(labels=np.zeros(n, np.int32))

    val = 12 if split != "search train" else 40  # (so that a batch of 28 fits it)
    run = types.SimpleNamespace(
        train=examples(40), search_train=examples(28), search_val=examples(val), test=examples(8)
    )
    config = load_config("demo", "tiny")
    for name in ("teacher.optim", "distill.optim", "search"):
        node = config
        for part in name.split("."):
            node = node[part]
        node.batch_size = 8
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = size
    with pytest.raises(data.DataError, match=f"the {split} split has .* {field} = {size}"):
        inputs.check_batch_sizes(config, run)
    node[leaf] = size - 1
    inputs.check_batch_sizes(config, run)
    if field.startswith("teacher"):
        node[leaf] = size
        config.teacher.checkpoint = "/runs/teacher"
        inputs.check_batch_sizes(config, run)


def test_a_given_val_split_trains_beta_and_the_whole_train_split_trains_w(tmp_path):
    """CINIC-10's protocol (data.val_split = 'valid'): the search trains w on the whole training
    split and beta on the named split, nothing held out of the training split."""
    from test_config import load_config

    from dfa_jax import inputs

    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("valid", 20), ("test", 10)):
        np.savez(
            tmp_path / f"{name}.npz",
            images=rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
            labels=np.arange(n) % 10,
        )
    config = load_config("demo", "tiny")
    config.data.source, config.data.path, config.data.dataset = "npz", str(tmp_path), "cifar10"
    config.data.val_split = "valid"
    run = inputs.load(config, str(tmp_path / "run"), search=True)
    assert run.search_train.split == "train" and len(run.search_train.labels) == 40
    assert run.search_val.split == "valid" and len(run.search_val.labels) == 20


def test_a_label_equal_to_num_classes_is_refused_by_the_sources_own_check():
    """Labels 1..10 for 10 classes (a 1-based export): label 10 has no output. The npz read
    refuses them (test_errors.py); the check of every source behind it does too, for a source
    without one of its own."""

    class OneBased(sources.BundledDigitsSource):
        def _load_labels(self, split):
            return super()._load_labels(split) + 1

    one_based = OneBased(data_cfg(source="bundled", dataset="digits"))
    with pytest.raises(data.DataError, match=r"has labels in \[1, 10\] but .* 10 classes"):
        one_based.labels("train")
