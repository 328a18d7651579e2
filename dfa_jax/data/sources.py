"""Where the images come from, behind one interface, and what each dataset is.

A `Source` answers two questions about a split (named as the source names it: TFDS 'train' and
'test', an image folder's sub-folder names, an npz file prefix): `labels(split)`, cheap and for
the whole split, and `images(split, indices)`, which reads only the requested rows where the
format allows it. Every host computes the same index split from the labels and then reads just
its own rows of each global batch (see `loader.py`). What was read stays cached in the object.

Four kinds (`data.source`):
- `tfds`: CIFAR-10/100 through TensorFlow Datasets. Offline with nothing prepared it fails within
  seconds with a `DataError` saying how to provide the data, instead of letting tfds retry its
  downloads for minutes.
- `image_folder`: `data.path/{split}/{class_name}/*.png|jpg|...` (torchvision ImageFolder's
  extensions), classes sorted by name (the layout CINIC-10 ships in).
- `npz`: `{split}.npz` or `{split}_*.npz` files holding uint8 images [N, 32, 32, 3] and integer
  labels [N] under configurable keys.
- `bundled`: scikit-learn's 8x8 `digits` (no download), the offline demo.

`data.max_train_examples` caps `data.train_split` and `data.max_test_examples` caps every other
split (test, and val where the source has one). The cap is applied here, by the source: a capped
split is the class-balanced `splits.stratified_subset` (fixed seed `SUBSET_SEED`, so it is the
same subset for every run seed), and all indices given to or returned by the source refer to the
capped split.
"""

import abc
import concurrent.futures
import dataclasses
import glob
import importlib.util
import math
import os
import re
import socket
import threading
import zipfile

import numpy as np
from absl import logging
from PIL import Image

from dfa_jax import files
from dfa_jax.data.splits import DataError, stratified_split, stratified_subset


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; `mean` and `std` are per RGB channel, in [0, 1] units."""

    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int


_CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
_CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
# Digits statistics: mean and std over all pixels of the bundled 'train' split, computed once
# with (cfg: data.dataset='digits', data.source='bundled', no caps)
#   src = make_source(cfg); x = src.images('train', np.arange(len(src.labels('train')))) / 255
#   print(x.mean(), x.std())  # 0.30553, 0.37595
# and rounded to 4 digits; the three channels are the same grey image.
_DIGITS_MEAN, _DIGITS_STD = 0.3055, 0.3759

DATASETS: dict[str, DatasetInfo] = {
    "cifar100": DatasetInfo(100, _CIFAR_MEAN, _CIFAR_STD, 32),
    "cifar10": DatasetInfo(10, _CIFAR_MEAN, _CIFAR_STD, 32),
    "cinic10": DatasetInfo(10, (0.4789, 0.4723, 0.4305), (0.2421, 0.2383, 0.2587), 32),
    "digits": DatasetInfo(10, (_DIGITS_MEAN,) * 3, (_DIGITS_STD,) * 3, 32),
}

SOURCES = ("tfds", "image_folder", "npz", "bundled")

# The max_*_examples subset is a property of the data, not of the run: one seed for all runs.
SUBSET_SEED = 0


class Source(abc.ABC):
    """One dataset's splits: all labels cheaply, images only for the rows asked for.

    Subclasses implement `_load_labels` / `_load_images` on the full split; this class applies
    the max_*_examples cap, checks labels against the dataset's class count, and validates
    indices.
    """

    def __init__(self, data_cfg):
        self.info = DATASETS[data_cfg.dataset]
        self._dataset = data_cfg.dataset
        self._train_split = data_cfg.train_split
        self._max_train_examples = data_cfg.max_train_examples
        self._max_test_examples = data_cfg.max_test_examples
        # The config fields that name each split, for messages ("data.test_split = 'x'").
        self._split_fields = {}
        for field in ("val_split", "test_split", "train_split"):  # train wins a shared name.
            if data_cfg.get(field) is not None:
                self._split_fields[data_cfg[field]] = f"data.{field}"
        # split -> (rows of the full split that are kept, their int32 labels)
        self._kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # The location field this source reads (data.path or data.data_dir), or None: the other is
    # refused when set, since it would be ignored (a TFDS run given data.path reads tfds' default
    # directory, whatever the path holds).
    LOCATION_FIELD: str | None = None
    # How a user gives this source the data, for that message.
    LOCATION_HINT = ""

    @classmethod
    def check(cls, data_cfg) -> list[str]:
        """Problems with the `config.data` fields this source reads, each naming the field and
        the fix; cheap (no data read), for `config_lib.validate`."""
        fields = ["train_split", "test_split"]
        fields += ["val_split"] if data_cfg.val_split is not None else []
        problems = []
        for field in ("path", "data_dir"):
            if field != cls.LOCATION_FIELD and data_cfg.get(field) is not None:
                readers = [n for n, c in SOURCE_CLASSES.items() if c.LOCATION_FIELD == field]
                problems.append(
                    f"data.{field} = {data_cfg[field]!r} is not read by data.source ="
                    f" {data_cfg.source!r}, which would ignore it: {cls.LOCATION_HINT}; or set"
                    f" data.source to a source that reads data.{field} ({' or '.join(readers)})."
                )
        for field in fields:
            split = data_cfg[field]
            if not split.strip():
                problems.append(
                    f"data.{field} = {split!r}: name a split of the data, e.g. 'train'."
                )
            else:
                problems.extend(cls._split_problems(field, split))
        return problems

    @classmethod
    def _split_problems(cls, field: str, split: str) -> list[str]:
        """Problems with the non-empty split name `split` of `data.<field>`."""
        del field, split
        return []

    def prepare(self) -> None:
        """Makes the data readable where that writes files (a TFDS download and preparation);
        nothing for sources that only read. A run of several processes calls it on process 0
        alone before any process reads (`inputs.load`), so that processes sharing one data
        directory do not write it at once."""

    def labels(self, split: str) -> np.ndarray:
        """int32 [N] (read-only) labels of `split` after the max_*_examples cap."""
        return self._subset(split)[1]

    def images(self, split: str, indices: np.ndarray) -> np.ndarray:
        """uint8 [len(indices), S, S, 3] images of `split` at `indices` (into `labels(split)`)."""
        rows, _ = self._subset(split)
        indices = np.asarray(indices)
        size = self.info.image_size
        if indices.size == 0:
            return np.zeros((0, size, size, 3), np.uint8)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(
                f"indices must be a 1-D integer array, got {indices.dtype}{indices.shape}"
            )
        if indices.min() < 0 or indices.max() >= len(rows):
            raise IndexError(f"indices out of range for split {split!r} of {len(rows)} examples")
        return self._load_images(split, rows[indices])

    def _split_name(self, split: str) -> str:
        """`split` with the config field that names it, for messages."""
        field = self._split_fields.get(split)
        return f"{field} = {split!r}" if field else f"split {split!r}"

    def _subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._kept:
            full = np.asarray(self._load_labels(split))
            if len(full) and (full.min() < 0 or full.max() >= self.info.num_classes):
                raise DataError(
                    f"{self._split_name(split)} has labels in [{full.min()}, {full.max()}] but "
                    f"data.dataset = {self._dataset!r} has {self.info.num_classes} classes "
                    f"(labels 0..{self.info.num_classes - 1}); set data.dataset to the data's "
                    "dataset or relabel the data"
                )
            if split == self._train_split:
                cap = self._max_train_examples
            else:
                cap = self._max_test_examples
            rows = stratified_subset(full, cap, SUBSET_SEED)
            # Images are read lazily, during training; a broken one must fail here, before it.
            self._check_rows(split, rows)
            labels = full[rows].astype(np.int32)
            labels.setflags(write=False)
            self._kept[split] = (rows, labels)
        return self._kept[split]

    def _check_rows(self, split: str, rows: np.ndarray) -> None:
        """Raises DataError if an image at `rows` of the whole split cannot be read (cheaply,
        without decoding); sources whose `_load_labels` already checked the images do nothing."""
        del split, rows

    @abc.abstractmethod
    def _load_labels(self, split: str) -> np.ndarray:
        """int [N] labels of the whole (uncapped) split."""

    @abc.abstractmethod
    def _load_images(self, split: str, rows: np.ndarray) -> np.ndarray:
        """uint8 [len(rows), S, S, 3] images at non-empty `rows` of the whole split."""


# ------------------------------------------------------------------------------------------ tfds

TFDS_NAMES = {"cifar100": "cifar100", "cifar10": "cifar10"}
# Where tfds downloads CIFAR from; probed before any download so an offline host fails fast.
# Module-level so tests (and hosts behind a proxy) can point it elsewhere.
NETWORK_PROBE_ADDRESS = ("www.cs.toronto.edu", 443)
NETWORK_PROBE_TIMEOUT_S = 3.0
# Examples per tf.data batch while converting to NumPy (batch_size=-1 aborts under mock_data).
_TFDS_BATCH = 10_000


def network_reachable(
    address: tuple[str, int] | None = None, timeout_s: float | None = None
) -> bool:
    """True when a TCP connection to `address` opens within `timeout_s` seconds.

    The probe runs in a daemon thread joined with the timeout, because name resolution does not
    honour socket timeouts and can hang for tens of seconds on a host without DNS.
    """
    address = address or NETWORK_PROBE_ADDRESS
    timeout_s = NETWORK_PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    connected = []
    finished = threading.Event()

    def probe():
        try:
            with socket.create_connection(address, timeout=timeout_s):
                connected.append(True)
        except OSError:
            pass  # Unreachable: `connected` stays empty.
        finally:
            finished.set()

    threading.Thread(target=probe, daemon=True).start()
    finished.wait(timeout_s)
    return bool(connected)


TFDS_EXTRA = "pip install -e '.[tfds]'"


def _import_tfds():
    """tensorflow_datasets, which imports TensorFlow only when tf.data is used."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"data.source='tfds' needs tensorflow-datasets: install it with `{TFDS_EXTRA}`"
        ) from None
    return tfds


def _import_tensorflow(why: str):
    """TensorFlow for tf.data, kept off the GPUs JAX needs; DataError naming the extra if absent."""
    try:
        import tensorflow as tf
    except ImportError:
        raise DataError(
            f"{why}, which needs TensorFlow's tf.data: install it with `{TFDS_EXTRA}`, or prepare"
            " the dataset as array_record (`tfds build NAME --file_format=array_record`), which is"
            " read without TensorFlow"
        ) from None
    # tf.data needs no accelerator, and TF would otherwise reserve most of the GPU memory. This
    # raises once TF has initialised its devices, in which case the program already chose.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass
    return tf


def _random_access(builder) -> bool:
    """Whether the prepared dataset has array_record files, which `tfds.data_source` reads."""
    from tensorflow_datasets.core import file_adapters

    return file_adapters.FileFormat.ARRAY_RECORD in builder.info.available_file_formats()


_TFDS_SLICE = re.compile(r"^\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\]$")


def _tfds_parts(split: str) -> list[tuple[str, tuple | None]]:
    """(base split, slice) of each '+' part of a TFDS split name; a slice is (unit, start, end)
    with unit '%' or '' (indices), or None for the whole split or a form not parsed here."""
    parts = []
    for part in split.split("+"):
        part = part.strip()
        base = re.sub(r"\[.*\]$", "", part).strip()
        parts.append((base, _tfds_slice(part[len(base) :].strip())))
    return parts


def _tfds_slice(text: str) -> tuple | None:
    match = _TFDS_SLICE.match(text)
    if not text or not match or not any(match.groups()):
        return None
    bounds = match.groups()
    units = {b.endswith("%") for b in bounds if b}
    if len(units) != 1:
        return None  # '[10%:500]': percent against an index needs the split's size.
    percent = units.pop()
    values = [int(b.rstrip("%")) if b else None for b in bounds]
    if percent:  # Negative percents count from the end; tfds rounds both sides alike.
        start, end = (
            min(max(v + 100 if v < 0 else v, 0), 100) if v is not None else d
            for v, d in zip(values, (0, 100))
        )
        return ("%", start, end)
    if any(v is not None and v < 0 for v in values):
        return None  # Counted from an end whose index needs the split's size.
    return ("", values[0] or 0, math.inf if values[1] is None else values[1])


def _slices_overlap(a: tuple | None, b: tuple | None) -> bool:
    """Whether two slices of one split may share an example (None: the whole split)."""
    if any(s is not None and s[1] >= s[2] for s in (a, b)):
        return False  # An empty slice shares nothing (and fails as an empty split).
    if a is None or b is None:
        return True
    if a[0] != b[0]:
        return True  # Percents against indices: not decided without the split's size.
    return max(a[1], b[1]) < min(a[2], b[2])


class TfdsSource(Source):
    """CIFAR-10/100 from TensorFlow Datasets; a split is loaded whole on first use.

    Prepared as array_record, a split is read with `tfds.data_source` (no TensorFlow); prepared as
    tfrecord (tfds' default), with tf.data, which the `[tfds]` extra installs.
    """

    LOCATION_FIELD = "data_dir"
    LOCATION_HINT = "tfds reads data.data_dir (unset: $TFDS_DATA_DIR or ~/tensorflow_datasets)"

    @classmethod
    def check(cls, data_cfg) -> list[str]:
        problems = []
        if data_cfg.dataset in DATASETS and data_cfg.dataset not in TFDS_NAMES:
            problems.append(
                f"data.source = 'tfds' has {sorted(TFDS_NAMES)}, not data.dataset ="
                f" {data_cfg.dataset!r}; use data.source='image_folder' or 'npz' with data.path."
            )
        names = super().check(data_cfg)
        return problems + (names or cls._overlap_problems(data_cfg))

    # What reading two overlapping splits would do, per pair of fields.
    _OVERLAP_HARM = {
        ("train_split", "test_split"): "the test accuracy would be measured on training images",
        ("train_split", "val_split"): "the search would train beta on images it trains w on",
        ("test_split", "val_split"): (
            "the search would tune beta on the images the test accuracy is measured on"
        ),
    }

    @classmethod
    def _overlap_problems(cls, data_cfg) -> list[str]:
        """Two of the splits in use that may share examples: slices of one TFDS split that are
        not disjoint percent or index ranges (`_slices_overlap`). Equal names are
        `config_lib.validate`'s to report, for every source."""
        fields = ["train_split", "test_split"]
        fields += ["val_split"] if data_cfg.val_split is not None else []
        problems = []
        for i, first in enumerate(fields):
            for second in fields[i + 1 :]:
                a, b = data_cfg[first], data_cfg[second]
                if a == b:
                    continue
                shared = sorted(
                    base
                    for base, slice_a in _tfds_parts(a)
                    for other, slice_b in _tfds_parts(b)
                    if base == other and _slices_overlap(slice_a, slice_b)
                )
                if not shared:
                    continue
                base = shared[0]
                unset_val = (
                    ", or leave data.val_split unset to carve the search's val split out of"
                    " data.train_split"
                    if second == "val_split"
                    else ""
                )
                problems.append(
                    f"data.{second} = {b!r} overlaps data.{first} = {a!r} (both read TFDS split"
                    f" {base!r}): {cls._OVERLAP_HARM[(first, second)]}; give each its own split"
                    f" or disjoint slices of one (e.g. '{base}[:90%]' and '{base}[90%:]')"
                    f"{unset_val}."
                )
        return problems

    @classmethod
    def _split_problems(cls, field: str, split: str) -> list[str]:
        # CIFAR in TFDS has 'train' and 'test'; slices and unions ('train[:90%]+test') work.
        bases = {re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")}
        if bases <= {"train", "test"}:
            return []
        return [
            (
                f"data.{field} = {split!r}: TFDS CIFAR has the splits 'train' and 'test' (or"
                " slices such as 'train[:90%]'); leave data.val_split unset to carve the"
                " search's val split out of train."
            )
        ]

    def __init__(self, data_cfg):
        super().__init__(data_cfg)
        if data_cfg.dataset not in TFDS_NAMES:
            raise DataError(
                f"data.source='tfds' supports {sorted(TFDS_NAMES)}, not {data_cfg.dataset!r}; "
                "use data.source='image_folder' or 'npz' (or 'bundled' for digits)"
            )
        self._name = TFDS_NAMES[data_cfg.dataset]
        self._data_dir = data_cfg.data_dir
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def prepare(self) -> None:
        # Prepared already (the usual case): nothing to write, and the other processes need not
        # wait for this one's read. Otherwise reading a split prepares the dataset (all its
        # splits at once) by the one path the reads take; what it read stays loaded.
        if _import_tfds().builder(self._name, data_dir=self._data_dir).is_prepared():
            return
        self.labels(self._train_split)

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._arrays:
            tfds = _import_tfds()
            try:
                self._arrays[split] = self._read(tfds, split)
            except ValueError as e:
                if "split" not in str(e).lower():
                    raise
                raise DataError(
                    f"{self._split_name(split)} is not a split of TFDS {self._name!r} ({e}); use "
                    "'train' or 'test' (slices such as 'train[:90%]' work too)"
                ) from None
        return self._arrays[split]

    def _read(self, tfds, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [N, 32, 32, 3] images, int [N] labels) of the whole `split`."""
        builder = tfds.builder(self._name, data_dir=self._data_dir)
        if _random_access(builder):
            examples = builder.as_data_source(split=split)
            records = [examples[i] for i in range(len(examples))]
            images = (
                np.stack([r["image"] for r in records]) if records else np.zeros((0, 32, 32, 3))
            )
            labels = np.asarray([r["label"] for r in records], np.int64)
            return images.astype(np.uint8), labels
        if not builder.is_prepared():
            # Preparing here needs TensorFlow too; offline, say how to bring the data instead.
            if importlib.util.find_spec("tensorflow") is None and not network_reachable():
                raise DataError(self._how_to_provide())
            why = f"TFDS {self._name!r} is not prepared in {self._where()} and preparing it"
        else:
            why = f"TFDS {self._name!r} in {self._where()} is prepared as tfrecord"
        _import_tensorflow(why)
        images, labels = [], []
        for image, label in tfds.as_numpy(self._open_prepared(tfds, split)):
            images.append(image)
            labels.append(label)
        return np.concatenate(images), np.concatenate(labels)

    def _open_prepared(self, tfds, split: str):
        kwargs = dict(
            split=split,
            data_dir=self._data_dir,
            as_supervised=True,
            batch_size=_TFDS_BATCH,
            shuffle_files=False,
        )
        try:
            return tfds.load(self._name, download=False, **kwargs)
        except AssertionError:
            # tfds reports "not prepared in data_dir" as an AssertionError; anything else that
            # raises one is re-raised as is.
            builder = tfds.builder(self._name, data_dir=self._data_dir)
            if builder.is_prepared():
                raise
            if not network_reachable():
                raise DataError(self._how_to_provide()) from None
            builder.download_and_prepare()
            return tfds.load(self._name, download=False, **kwargs)

    def _where(self) -> str:
        return self._data_dir or "the default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"

    def _how_to_provide(self) -> str:
        where = self._where()
        host, port = NETWORK_PROBE_ADDRESS
        return (
            f"TFDS dataset {self._name!r} is not prepared in {where}, and it cannot be "
            f"downloaded: {host}:{port} is unreachable (offline?). Provide the data in one of "
            f"these ways:\n"
            f"  1. on a machine with internet run `tfds build {self._name} --data_dir=DIR"
            f" --file_format=array_record` (read without TensorFlow; the default tfrecord needs"
            f" `{TFDS_EXTRA}`), copy DIR here (or use a gs:// DIR) and pass"
            f" --config.data.data_dir=DIR;\n"
            f"  2. pass --config.data.source=npz --config.data.path=DIR, DIR holding "
            f"train.npz|train_*.npz and test.npz|test_*.npz (uint8 'images' [N,32,32,3], "
            f"'labels' [N]);\n"
            f"  3. pass --config.data.source=image_folder --config.data.path=ROOT, with "
            f"ROOT/train/<class>/*.png and ROOT/test/<class>/*.png."
        )

    def _load_labels(self, split: str) -> np.ndarray:
        return self._split(split)[1]

    def _load_images(self, split: str, rows: np.ndarray) -> np.ndarray:
        return self._split(split)[0][rows]


# ---------------------------------------------------------------------------------- image_folder

# torchvision's ImageFolder's (the DFA authors' CINIC-10 reader): every one of them PIL decodes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DECODE_THREADS = min(32, (os.cpu_count() or 1) + 4)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # The empty IEND chunk and its CRC.
_JPEG_HEADER_BYTES = 65536  # Where a JPEG's frame header (its size) is looked for.
# JPEG start-of-frame markers (SOF0-15 but DHT 0xC4, JPG 0xC8 and DAC 0xCC): they hold the size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the frame header of a JPEG's first bytes `head`, or None."""
    i = 2
    while i + 9 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # Fill byte.
            i += 1
            continue
        if marker in _JPEG_SOF:
            height = int.from_bytes(head[i + 5 : i + 7], "big")
            width = int.from_bytes(head[i + 7 : i + 9], "big")
            return width, height
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # No length field.
            i += 2
            continue
        i += 2 + int.from_bytes(head[i + 2 : i + 4], "big")
    return None


def _path_problems(data_cfg, globs: bool) -> list[str]:
    """data.path set, and existing unless remote (or, with `globs`, a glob pattern)."""
    source, path = data_cfg.source, data_cfg.path
    if not path:
        return [
            (
                f"data.path is unset but data.source = {source!r} reads from it; set"
                " --config.data.path=DIR."
            )
        ]
    if files.is_remote(path) or os.path.exists(path) or (globs and any(c in path for c in "*?[")):
        return []
    return [f"data.path = {path!r} does not exist; point it at the {source} data."]


class ImageFolderSource(Source):
    """`root/{split}/{class_name}/*.png|jpg|...`; the class list is the train split's folders.

    Labels come from file paths alone (no decoding). Images are decoded with PIL on first
    request, in a thread pool (decoding releases the GIL), and cached per row.
    """

    LOCATION_FIELD = "path"
    LOCATION_HINT = "image_folder reads data.path (the root holding split folders)"

    @classmethod
    def check(cls, data_cfg) -> list[str]:
        return _path_problems(data_cfg, globs=False) + super().check(data_cfg)

    def __init__(self, data_cfg):
        super().__init__(data_cfg)
        if not data_cfg.path:
            raise DataError(
                "data.source='image_folder' needs data.path (the root holding split folders)"
            )
        self._root = data_cfg.path
        self._files: dict[str, tuple[list[str], np.ndarray]] = {}
        self._decoded: dict[str, dict[int, np.ndarray]] = {}
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """Sorted class folder names of the train split; label i is `class_names[i]`."""
        if self._class_names is None:
            names = self._class_folders(self._train_split)
            if len(names) > self.info.num_classes:
                raise DataError(
                    f"{os.path.join(self._root, self._train_split)} has {len(names)} class folders"
                    f" but data.dataset = {self._dataset!r} has {self.info.num_classes} classes;"
                    " set data.dataset to the data's dataset or fix data.path"
                )
            if len(names) < self.info.num_classes:
                # Trainable (those classes' outputs go unused), but most likely a dataset
                # extracted in part, or the wrong folder.
                logging.warning(
                    "%s has %d class folders but data.dataset = %r has %d classes: %d outputs"
                    " of the model will never be a label; check data.path if that is not meant",
                    os.path.join(self._root, self._train_split),
                    len(names),
                    self._dataset,
                    self.info.num_classes,
                    self.info.num_classes - len(names),
                )
            self._class_names = names
        return self._class_names

    def _split_dir(self, split: str) -> str:
        path = os.path.join(self._root, split)
        if not os.path.isdir(path):
            raise DataError(
                f"image_folder {self._split_name(split)}: no folder {path} (expected "
                f"{self._root}/{split}/<class_name>/*.png|jpg|...); fix data.path or set "
                "data.train_split/test_split/val_split to the split folders' names"
            )
        return path

    def _class_folders(self, split: str) -> list[str]:
        with os.scandir(self._split_dir(split)) as entries:
            return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))

    def _list(self, split: str) -> tuple[list[str], np.ndarray]:
        if split not in self._files:
            label_of = {name: i for i, name in enumerate(self.class_names)}
            split_dir = self._split_dir(split)
            paths, labels, empty = [], [], []
            for name in self._class_folders(split):
                if name not in label_of:
                    raise DataError(
                        f"class folder {os.path.join(split_dir, name)} is not a class of the "
                        f"train split {os.path.join(self._root, self._train_split)}"
                    )
                class_dir = os.path.join(split_dir, name)
                files = sorted(
                    f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS)
                )
                empty += [] if files else [name]
                paths += [os.path.join(class_dir, f) for f in files]
                labels += [label_of[name]] * len(files)
            if empty:
                # As torchvision's ImageFolder: a class folder without images is a dataset
                # extracted in part or in another format, not a class with no examples.
                raise DataError(
                    f"image_folder {self._split_name(split)}: no image file in class folder(s)"
                    f" {', '.join(empty)} of {split_dir} (read: {' '.join(IMAGE_EXTENSIONS)});"
                    " complete the data or fix data.path"
                )
            self._files[split] = (paths, np.asarray(labels, np.int64))
            self._decoded[split] = {}
        return self._files[split]

    def _decode(self, path: str) -> np.ndarray:
        size = self.info.image_size
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), np.uint8)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from e
        if pixels.shape != (size, size, 3):
            height, width = pixels.shape[:2]
            raise DataError(f"image {path} is {width}x{height}, expected {size}x{size}")
        return pixels

    def _check_rows(self, split: str, rows: np.ndarray) -> None:
        paths, _ = self._list(split)
        with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
            found = pool.map(self._check_file, [paths[r] for r in rows])
            problems = [p for p in found if p is not None]
        if problems:
            shown = "\n  ".join(problems[:5])
            more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise DataError(
                f"{len(problems)} bad image file(s) in image_folder {self._split_name(split)}"
                f" (data.path = {self._root!r}):\n  {shown}{more}\nreplace or delete them"
            )

    def _check_file(self, path: str) -> str | None:
        """What is wrong with image file `path`, or None; reads its header and end only.

        PNG: signature, IHDR size and the final IEND chunk (a truncated file lacks it). JPEG:
        SOI, the frame header's size and the EOI marker at the end. Anything else is decoded in
        full with PIL (which may read formats beyond these two whatever the extension).
        """
        size = self.info.image_size
        try:
            with open(path, "rb") as f:
                head = f.read(_JPEG_HEADER_BYTES)
                f.seek(0, os.SEEK_END)
                length = f.tell()
                f.seek(max(0, length - 64))
                tail = f.read()
        except OSError as e:
            return f"{path}: cannot read ({e})"
        if head.startswith(_PNG_SIGNATURE):
            if len(head) < 24 or head[12:16] != b"IHDR":
                return f"{path}: broken PNG header"
            if not tail.endswith(_PNG_END):
                return f"{path}: truncated PNG (no IEND chunk at the end)"
            width, height = (int.from_bytes(head[i : i + 4], "big") for i in (16, 20))
        elif head.startswith(b"\xff\xd8"):
            if b"\xff\xd9" not in tail:
                return f"{path}: truncated JPEG (no end-of-image marker)"
            found = _jpeg_size(head)
            if found is None:
                return self._decode_problem(path)
            width, height = found
        else:
            return self._decode_problem(path)
        if (width, height) != (size, size):
            return f"image {path} is {width}x{height}, expected {size}x{size}"
        return None

    def _decode_problem(self, path: str) -> str | None:
        try:
            self._decode(path)
        except DataError as e:
            cause = e.__cause__
            if isinstance(cause, (OSError, ValueError)):
                return (
                    f"{path}: neither PNG nor JPEG, and PIL cannot read it ({type(cause).__name__})"
                )
            return str(e)
        return None

    def _load_labels(self, split: str) -> np.ndarray:
        return self._list(split)[1]

    def _load_images(self, split: str, rows: np.ndarray) -> np.ndarray:
        paths, _ = self._list(split)
        cache = self._decoded[split]
        missing = sorted({int(r) for r in rows} - cache.keys())
        if missing:
            with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
                decoded = pool.map(self._decode, [paths[r] for r in missing])
                for row, image in zip(missing, decoded):
                    cache[row] = image
        return np.stack([cache[int(r)] for r in rows])


# ------------------------------------------------------------------------------------------- npz


def _npy_header(npz, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array `key` of an open npz, read from its header without loading it."""
    with npz.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


class NpzSource(Source):
    """`{split}.npz` / `{split}_*.npz` files in a directory (or matching a glob), concatenated
    in sorted path order.

    Labels are read for the whole split, image arrays only from the files that hold requested
    rows (a host reading a contiguous shard typically opens one or two files), and cached.
    """

    LOCATION_FIELD = "path"
    LOCATION_HINT = "npz reads data.path (a directory or a glob of .npz files)"

    @classmethod
    def check(cls, data_cfg) -> list[str]:
        return _path_problems(data_cfg, globs=True) + super().check(data_cfg)

    def __init__(self, data_cfg):
        super().__init__(data_cfg)
        if not data_cfg.path:
            raise DataError(
                "data.source='npz' needs data.path (a directory or a glob of .npz files)"
            )
        self._path = data_cfg.path
        self._image_key = data_cfg.npz_image_key
        self._label_key = data_cfg.npz_label_key
        # The run's split names: a file goes to the longest that names it (`_split_files`).
        self._splits = tuple(
            s for s in (data_cfg.train_split, data_cfg.test_split, data_cfg.val_split) if s
        )
        # split -> (files, first row of each file and the total [len(files) + 1], labels)
        self._index: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
        self._file_images: dict[str, np.ndarray] = {}

    def _split_files(self, split: str) -> list[str]:
        pattern = os.path.join(self._path, "*.npz") if os.path.isdir(self._path) else self._path

        def names(f: str, name: str) -> bool:
            base = os.path.basename(f)
            return base == f"{name}.npz" or (base.startswith(f"{name}_") and f.endswith(".npz"))

        # `train_val_0.npz` is the 'train_val' split's where the run has one, not 'train''s.
        longer = [s for s in self._splits if len(s) > len(split) and s.startswith(split)]
        files = sorted(
            f
            for f in glob.glob(pattern)
            if names(f, split) and not any(names(f, other) for other in longer)
        )
        if not files:
            raise DataError(
                f"no npz files for {self._split_name(split)}: expected {split}.npz or "
                f"{split}_*.npz in or matching data.path = {self._path!r}; fix data.path or set "
                "data.train_split/test_split/val_split to the files' prefixes"
            )
        return files

    def _read_labels(self, file: str) -> np.ndarray:
        size = self.info.image_size
        images, labels = self._image_key, self._label_key
        if os.path.isfile(file) and not zipfile.is_zipfile(file):
            raise DataError(
                f"{file} is not an npz file (not a zip archive); write it with np.savez(path,"
                f" {images}=..., {labels}=...)"
            )
        try:
            npz = np.load(file)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(
                f"cannot read npz file {file}: {e}; write it with np.savez(path, "
                f"{images}=..., {labels}=...)"
            ) from e
        with npz:
            for key, field in ((images, "data.npz_image_key"), (labels, "data.npz_label_key")):
                if key not in npz.files:
                    raise DataError(
                        f"{file} has no array {key!r} (it has {npz.files}); set {field} to the"
                        " key that holds them"
                    )
            try:
                label_array = npz[labels]
                shape, dtype = _npy_header(npz, images)
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise DataError(f"cannot read {labels!r} or {images!r} of {file}: {e}") from e
        if label_array.ndim != 1 or not np.issubdtype(label_array.dtype, np.integer):
            raise DataError(
                f"{file}: {labels!r} (data.npz_label_key) must be integer [N], got "
                f"{label_array.dtype}{list(label_array.shape)}; save the class indices as"
                " integers (labels.astype(np.int64))"
            )
        if dtype != np.uint8:
            raise DataError(
                f"{file}: {images!r} (data.npz_image_key) must be uint8 pixels 0..255, got "
                f"{dtype}; save (images * 255).round().astype(np.uint8) if they are floats in"
                " [0, 1], images.astype(np.uint8) if in [0, 255]"
            )
        if len(shape) != 4 or shape[1:] != (size, size, 3):
            raise DataError(
                f"{file}: {images!r} (data.npz_image_key) must be [N, {size}, {size}, 3] (RGB, "
                f"channels last), got {list(shape)}; resize or convert the images"
            )
        if shape[0] != len(label_array):
            raise DataError(
                f"{file}: {shape[0]} images ({images!r}) but {len(label_array)} labels "
                f"({labels!r}); every image needs exactly one label"
            )
        num_classes = self.info.num_classes
        if len(label_array) and (label_array.min() < 0 or label_array.max() >= num_classes):
            raise DataError(
                f"{file}: {labels!r} holds labels in [{label_array.min()}, {label_array.max()}]"
                f" but data.dataset = {self._dataset!r} has {num_classes} classes (labels "
                f"0..{num_classes - 1}); set data.dataset to the data's dataset or relabel it"
            )
        return label_array

    def _split_index(self, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        if split not in self._index:
            files = self._split_files(split)
            per_file = [self._read_labels(f) for f in files]
            starts = np.cumsum([0] + [len(labels) for labels in per_file])
            self._index[split] = (files, starts, np.concatenate(per_file))
        return self._index[split]

    def _load_labels(self, split: str) -> np.ndarray:
        return self._split_index(split)[2]

    def _load_images(self, split: str, rows: np.ndarray) -> np.ndarray:
        files, starts, _ = self._split_index(split)
        file_of_row = np.searchsorted(starts, rows, side="right") - 1
        size = self.info.image_size
        out = np.empty((len(rows), size, size, 3), np.uint8)
        for i in np.unique(file_of_row):
            here = file_of_row == i
            out[here] = self._images_of(files[i])[rows[here] - starts[i]]
        return out

    def _images_of(self, file: str) -> np.ndarray:
        if file not in self._file_images:
            with np.load(file) as npz:
                self._file_images[file] = npz[self._image_key]
        return self._file_images[file]


# --------------------------------------------------------------------------------------- bundled


def digits_table() -> np.ndarray:
    """scikit-learn's `digits` as its file holds them: [1797, 65] float64, each row 64 pixels
    (0..16, row-major 8x8) and then the label, in `load_digits`'s order.

    Read straight from the file scikit-learn ships, without importing scikit-learn: that import
    pulls in much of SciPy (~1 s of every process that runs the demo). `load_digits` where the
    file is not where scikit-learn has kept it (`sklearn/datasets/data/digits.csv.gz`).
    """
    spec = importlib.util.find_spec("sklearn")  # Finds the package without running it.
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = os.path.join(root, "datasets", "data", "digits.csv.gz")
            if os.path.isfile(path):
                return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    return np.concatenate([digits.data, digits.target[:, None]], axis=1)


class BundledDigitsSource(Source):
    """scikit-learn's `digits` (1797 8x8 grey images, 10 classes), shipped inside scikit-learn and
    read by `digits_table`.

    Pixels 0..16 are scaled to uint8 0..255, upsampled nearest-neighbour to 32x32 (each pixel a
    4x4 block: exact and keeps the pixel statistics of the originals) and replicated to RGB.
    Splits 'train' (80%) and 'test' (20%) are a fixed class-stratified split (seed 0).
    """

    TEST_FRACTION = 0.2
    SPLIT_SEED = 0
    LOCATION_HINT = "the digits ship inside scikit-learn; unset it"

    @classmethod
    def check(cls, data_cfg) -> list[str]:
        problems = []
        if data_cfg.dataset != "digits":
            problems.append(
                "data.source = 'bundled' provides only 'digits', not data.dataset ="
                f" {data_cfg.dataset!r}; set data.dataset='digits' or another data.source."
            )
        return problems + super().check(data_cfg)

    @classmethod
    def _split_problems(cls, field: str, split: str) -> list[str]:
        if split in ("train", "test"):
            return []
        return [
            (
                f"data.{field} = {split!r}: bundled digits has the splits 'train' and 'test';"
                " leave data.val_split unset."
            )
        ]

    def __init__(self, data_cfg):
        super().__init__(data_cfg)
        if data_cfg.dataset != "digits":
            raise DataError(
                f"data.source='bundled' only provides dataset 'digits', not {data_cfg.dataset!r};"
                " set data.dataset='digits' or another data.source"
            )
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            table = digits_table()
            originals, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
            pixels = np.rint(originals * (255.0 / 16.0)).astype(np.uint8)
            scale = self.info.image_size // pixels.shape[1]
            pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
            images = np.repeat(pixels[..., None], 3, axis=-1)
            train, test = stratified_split(labels, self.TEST_FRACTION, self.SPLIT_SEED)
            self._arrays = {
                "train": (images[train], labels[train]),
                "test": (images[test], labels[test]),
            }
        if split not in self._arrays:
            raise DataError(
                f"{self._split_name(split)}: bundled digits has splits {sorted(self._arrays)}"
                " only; set data.train_split='train' and data.test_split='test' (and leave"
                " data.val_split unset)"
            )
        return self._arrays[split]

    def _load_labels(self, split: str) -> np.ndarray:
        return self._split(split)[1]

    def _load_images(self, split: str, rows: np.ndarray) -> np.ndarray:
        return self._split(split)[0][rows]


SOURCE_CLASSES: dict[str, type[Source]] = {
    "tfds": TfdsSource,
    "image_folder": ImageFolderSource,
    "npz": NpzSource,
    "bundled": BundledDigitsSource,
}


def make_source(data_cfg) -> Source:
    """The `Source` chosen by `data_cfg.source` for `data_cfg.dataset` (`config.data`)."""
    if data_cfg.dataset not in DATASETS:
        raise DataError(f"data.dataset must be one of {sorted(DATASETS)}, got {data_cfg.dataset!r}")
    if data_cfg.source not in SOURCE_CLASSES:
        raise DataError(f"data.source must be one of {SOURCES}, got {data_cfg.source!r}")
    return SOURCE_CLASSES[data_cfg.source](data_cfg)
