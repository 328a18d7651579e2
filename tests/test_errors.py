"""Every user-fixable mistake ends as one named error before anything compiles.

Each case builds a bad input (config, data tree, npz shard, teacher checkpoint, alpha.json) in
tmp_path and runs the real entry point, `pipeline.run`, on a tiny config in a workdir that already
holds a previous run's files. It checks the error class, that the message names the field or file
and the fix, that JAX compiled nothing, and that the workdir's files are untouched. A property
test then sets every field of `base_config()` to wrong values and checks that `validate` names it.
"""

import errno
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable

import hypothesis
import jax
import ml_collections
import numpy as np
import pytest
from hypothesis import strategies as st
from PIL import Image

from dfa_jax import config_lib
from dfa_jax import errors
from dfa_jax import models
from dfa_jax import parallel
from dfa_jax import pipeline
from dfa_jax import teacher

ROOT = os.path.join(os.path.dirname(__file__), "..")

# Backend compilations seen since the last clear (jax.monitoring has no per-call scope).
COMPILES: list[str] = []


def _on_event(event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    # Lowering happens for every compile request, also those the persistent compilation cache
    # (conftest) answers without a backend compile.
    if event in (
        "/jax/core/compile/backend_compile_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
    ):
        COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """configs/demo.py:tiny (bundled digits, wrn_16_1 -> wrn_10_1), teacher stage only."""
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.stages = ("teacher",)
    for path, value in overrides.items():
        node = config
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# ------------------------------------------------------------------------------------- inputs


def write_image_tree(root, classes=("ant", "bee"), per_class=(8, 4), size=32) -> str:
    """root/{train,test}/<class>/img<k>.png of random pixels."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"img{k}.png")
    return str(root)


def image_folder_config(root) -> ml_collections.ConfigDict:
    return tiny_config(
        **{"data.dataset": "cifar10", "data.source": "image_folder", "data.path": root}
    )


def write_npz(root, name: str, n: int = 20, **arrays) -> str:
    """root/{name}.npz of n good images and labels, `arrays` replacing (None: dropping) them."""
    rng = np.random.default_rng(0)
    good = {"images": rng.integers(0, 256, (n, 32, 32, 3), np.uint8), "labels": np.arange(n) % 10}
    arrays = {k: v for k, v in {**good, **arrays}.items() if v is not None}
    np.savez(root / f"{name}.npz", **arrays)
    return str(root / f"{name}.npz")


def npz_config(root, **train_arrays) -> tuple[ml_collections.ConfigDict, str]:
    """A good test.npz and a train.npz made of `train_arrays`; returns (config, train file)."""
    root.mkdir(parents=True, exist_ok=True)
    write_npz(root, "test", n=8)
    file = write_npz(root, "train", **train_arrays)
    config = tiny_config(
        **{"data.dataset": "cifar10", "data.source": "npz", "data.path": str(root)}
    )
    return config, file


def save_fake_variables(directory, model_name: str, num_classes: int) -> str:
    """Zero teacher variables of `model_name` saved as the teacher stage exports them."""
    model = models.get_model(model_name, num_classes)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)), train=False)
    )
    variables = {
        k: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes[k])
        for k in ("params", "batch_stats")
    }
    teacher.save_variables(str(directory), variables)
    return str(directory)


def alpha_record(model_name="wrn_16_1") -> dict:
    groups = models.get_model(model_name, 10).feature_groups()
    return {
        "teacher": model_name,
        "groups": [
            {"group": i + 1, "layers": list(g), "alpha": [1 / len(g)] * len(g)}
            for i, g in enumerate(groups)
        ],
    }


def alpha_config(tmp_path, content) -> tuple[ml_collections.ConfigDict, str]:
    """Teacher then distillation with the 'file' aggregation reading `content` (str or dict)."""
    path = tmp_path / "other_run" / "alpha.json"
    path.parent.mkdir()
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    config = tiny_config(
        **{
            "stages": ("teacher", "distill"),
            "distill.aggregation": "file",
            "distill.alpha_file": str(path),
            "distill.compare_with": (),
        }
    )
    return config, str(path)


def edit_alpha(edit: Callable[[dict], None]) -> dict:
    record = alpha_record()
    edit(record)
    return record


# -------------------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    id: str
    # tmp_path -> (config, the file or field the message must name)
    build: Callable
    error: type
    fix: str  # A hint of the fix the message must contain.


def _text_as_png(tmp_path):
    root = write_image_tree(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "bee" / "img3.png"
    bad.write_text("this is a text file")
    return image_folder_config(root), str(bad)


def _truncated_png(tmp_path):
    root = write_image_tree(tmp_path / "data")
    bad = tmp_path / "data" / "test" / "ant" / "img1.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return image_folder_config(root), str(bad)


def _truncated_jpeg(tmp_path):
    root = write_image_tree(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "ant" / "img9.jpg"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:-40])
    return image_folder_config(root), str(bad)


def _small_image(tmp_path):
    root = write_image_tree(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "ant" / "img0.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad)
    return image_folder_config(root), str(bad)


def _missing_test_folder(tmp_path):
    root = write_image_tree(tmp_path / "data")
    config = image_folder_config(root)
    config.data.test_split = "valid"
    return config, "data.test_split"


def _too_many_class_folders(tmp_path):
    classes = tuple(f"c{i:02d}" for i in range(11))
    root = write_image_tree(tmp_path / "data", classes=classes, per_class=(2, 1))
    return image_folder_config(root), os.path.join(root, "train")


def _npz_not_a_zip(tmp_path):
    config, file = npz_config(tmp_path / "npz")
    with open(file, "w") as f:
        f.write("garbage")
    return config, file


def _npz_no_test_files(tmp_path):
    config, _ = npz_config(tmp_path / "npz")
    (tmp_path / "npz" / "test.npz").unlink()
    return config, "data.test_split"


def _teacher_dir_without_variables(tmp_path):
    (tmp_path / "empty").mkdir()
    return tiny_config(**{"teacher.checkpoint": str(tmp_path / "empty")}), str(tmp_path / "empty")


def _teacher_training_checkpoints(tmp_path):
    checkpoints = tmp_path / "old" / "teacher" / "checkpoints"
    (checkpoints / "7").mkdir(parents=True)
    return tiny_config(**{"teacher.checkpoint": str(checkpoints)}), "training checkpoints"


def _teacher_still_training(tmp_path):
    (tmp_path / "run" / "teacher" / "checkpoints" / "7").mkdir(parents=True)
    return tiny_config(**{"teacher.checkpoint": str(tmp_path / "run")}), "has not finished"


def _train_smaller_than_a_batch(tmp_path):
    config, _ = npz_config(tmp_path / "npz", images=None, labels=None)
    write_npz(tmp_path / "npz", "train", n=10)  # No cap configured: the data itself is short.
    return config, "teacher.optim.batch_size"


CASES = [
    Case(
        "stages_given_twice",
        # What `--config.stages=(...)` given twice makes: ml_collections appends the second.
        lambda tmp_path: (tiny_config(stages=("teacher", "search", "teacher")), "stages"),
        errors.ConfigError,
        "give each stage once",
    ),
    Case(
        "npz_train_smaller_than_a_batch",
        _train_smaller_than_a_batch,
        errors.DataError,
        "provide more data",
    ),
    Case("image_folder_text_file_as_png", _text_as_png, errors.DataError, "replace or delete"),
    Case("image_folder_truncated_png", _truncated_png, errors.DataError, "truncated"),
    Case("image_folder_truncated_jpeg", _truncated_jpeg, errors.DataError, "truncated"),
    Case("image_folder_16px_image", _small_image, errors.DataError, "expected 32x32"),
    Case("image_folder_missing_split", _missing_test_folder, errors.DataError, "fix data.path"),
    Case(
        "image_folder_11_classes_for_cifar10",
        _too_many_class_folders,
        errors.DataError,
        "set data.dataset",
    ),
    Case(
        "npz_missing_labels_key",
        lambda p: npz_config(p / "npz", labels=None, y=np.zeros(20, np.int64)),
        errors.DataError,
        "data.npz_label_key",
    ),
    Case(
        "npz_float_images",
        lambda p: npz_config(p / "npz", images=np.zeros((20, 32, 32, 3), np.float32)),
        errors.DataError,
        "astype(np.uint8)",
    ),
    Case(
        "npz_grey_images",
        lambda p: npz_config(p / "npz", images=np.zeros((20, 32, 32), np.uint8)),
        errors.DataError,
        "[N, 32, 32, 3]",
    ),
    Case(
        "npz_28px_images",
        lambda p: npz_config(p / "npz", images=np.zeros((20, 28, 28, 3), np.uint8)),
        errors.DataError,
        "[N, 32, 32, 3]",
    ),
    Case(
        "npz_fewer_labels_than_images",
        lambda p: npz_config(p / "npz", labels=np.zeros(19, np.int64)),
        errors.DataError,
        "exactly one label",
    ),
    Case(
        "npz_float_labels",
        lambda p: npz_config(p / "npz", labels=np.zeros(20, np.float32)),
        errors.DataError,
        "integers",
    ),
    Case(
        "npz_labels_outside_num_classes",
        # Labels 0..10 for 10 classes: the one label equal to num_classes is already outside.
        lambda p: npz_config(p / "npz", labels=np.arange(20) % 11),
        errors.DataError,
        "relabel",
    ),
    Case("npz_not_a_zip", _npz_not_a_zip, errors.DataError, "np.savez"),
    Case("npz_no_test_files", _npz_no_test_files, errors.DataError, "test_*.npz"),
    Case(
        "teacher_checkpoint_of_100_classes",
        lambda p: (
            tiny_config(**{"teacher.checkpoint": save_fake_variables(p / "t100", "wrn_16_1", 100)}),
            "(64, 100), expected (64, 10)",
        ),
        errors.CheckpointError,
        "classifier has 100 classes",
    ),
    Case(
        "teacher_checkpoint_of_another_architecture",
        lambda p: (
            tiny_config(
                **{
                    "teacher.model": "wrn_40_2",
                    "student.model": "wrn_16_1",
                    "teacher.checkpoint": save_fake_variables(p / "t", "wrn_16_2", 10),
                }
            ),
            "not in the checkpoint",
        ),
        errors.CheckpointError,
        "set them to what the checkpoint was trained with",
    ),
    Case(
        "teacher_checkpoint_without_variables",
        _teacher_dir_without_variables,
        errors.CheckpointError,
        "teacher/variables",
    ),
    Case(
        "teacher_checkpoint_is_training_checkpoints",
        _teacher_training_checkpoints,
        errors.CheckpointError,
        "teacher/variables",
    ),
    Case(
        "teacher_checkpoint_is_a_run_whose_teacher_still_trains",
        _teacher_still_training,
        errors.CheckpointError,
        "let that run finish",
    ),
    Case(
        "teacher_checkpoint_missing",
        lambda p: (
            tiny_config(**{"teacher.checkpoint": str(p / "nope")}),
            "teacher.checkpoint",
        ),
        errors.ConfigError,
        "unset it to train one",
    ),
    Case(
        "alpha_file_not_json",
        lambda p: alpha_config(p, "{'groups': oops"),
        errors.AlphaFileError,
        "not valid JSON",
    ),
    Case(
        "alpha_file_of_another_layout",
        lambda p: alpha_config(p, alpha_record("wrn_22_1")),
        errors.AlphaFileError,
        "this teacher",
    ),
    Case(
        "alpha_file_with_two_groups",
        lambda p: alpha_config(p, edit_alpha(lambda r: r["groups"].pop())),
        errors.AlphaFileError,
        "has 2 groups",
    ),
    Case(
        "alpha_not_summing_to_one",
        lambda p: alpha_config(p, edit_alpha(lambda r: r["groups"][1].update(alpha=[0.5, 0.7]))),
        errors.AlphaFileError,
        "summing to 1",
    ),
    Case(
        "alpha_negative",
        lambda p: alpha_config(p, edit_alpha(lambda r: r["groups"][0].update(alpha=[-0.5, 1.5]))),
        errors.AlphaFileError,
        "non-negative",
    ),
    Case(
        "alpha_file_without_groups",
        lambda p: alpha_config(p, {"teacher": "wrn_16_1"}),
        errors.AlphaFileError,
        "'groups'",
    ),
    Case(
        "alpha_group_without_alpha",
        lambda p: alpha_config(p, edit_alpha(lambda r: r["groups"][2].pop("alpha"))),
        errors.AlphaFileError,
        "group 3 has no 'alpha'",
    ),
    Case(
        "alpha_file_is_a_directory",
        lambda p: (
            tiny_config(
                **{
                    "stages": ("teacher", "distill"),
                    "distill.aggregation": "file",
                    "distill.alpha_file": str(p),
                }
            ),
            "distill.alpha_file",
        ),
        errors.ConfigError,
        "OTHER_WORKDIR/alpha.json",
    ),
    Case(
        "bundled_val_split",
        lambda p: (
            tiny_config(**{"stages": ("teacher", "search"), "data.val_split": "valid"}),
            "data.val_split",
        ),
        errors.ConfigError,
        "leave data.val_split unset",
    ),
    Case(
        "tfds_unknown_test_split",
        lambda p: (
            tiny_config(
                **{"data.dataset": "cifar10", "data.source": "tfds", "data.test_split": "val"}
            ),
            "data.test_split",
        ),
        errors.ConfigError,
        "'train' and 'test'",
    ),
    Case(
        "eval_batch_not_positive",
        lambda p: (tiny_config(**{"data.eval_batch_size": 0}), "data.eval_batch_size"),
        errors.ConfigError,
        "must be positive",
    ),
    Case(
        "train_cap_smaller_than_batch",
        lambda p: (tiny_config(**{"data.max_train_examples": 8}), "teacher.optim.batch_size"),
        errors.ConfigError,
        "lower the batch size",
    ),
    Case(
        "image_folder_path_missing",
        lambda p: (image_folder_config(str(p / "nowhere")), "data.path"),
        errors.ConfigError,
        "point it at",
    ),
    Case(
        "search_val_split_of_the_train_cap_smaller_than_a_batch",
        lambda p: (
            # 40 digits, 4 a class: the 7:3 split keeps 1 a class (10) for beta's batch of 16.
            tiny_config(**{"stages": ("teacher", "search"), "data.max_train_examples": 40}),
            "data.search_val_fraction",
        ),
        errors.ConfigError,
        "raise data.max_train_examples, raise data.search_val_fraction, or lower search.batch_size",
    ),
    Case(
        "search_validates_on_slices_of_the_test_split",
        lambda p: (
            tiny_config(
                **{
                    "data.dataset": "cifar10",
                    "data.source": "tfds",
                    "data.val_split": "test[:50%]",
                }
            ),
            "data.val_split = 'test[:50%]' overlaps data.test_split = 'test'",
        ),
        errors.ConfigError,
        "disjoint slices",
    ),
    Case(
        "alpha_file_that_no_student_reads",
        lambda p: (
            tiny_config(
                **{"stages": ("teacher", "search", "distill"), "distill.alpha_file": str(p)}
            ),
            "distill.alpha_file",
        ),
        errors.ConfigError,
        "add --config.distill.aggregation=file (or 'file' to distill.compare_with), or unset it",
    ),
    Case(
        "search_validates_on_the_test_split",
        lambda p: (tiny_config(**{"data.val_split": "test"}), "data.val_split"),
        errors.ConfigError,
        "is also data.test_split",
    ),
    Case(
        "test_split_is_the_training_split",
        lambda p: (tiny_config(**{"data.test_split": "train"}), "data.train_split"),
        errors.ConfigError,
        "give the test split its own name",
    ),
    Case(
        "epochs_none",
        lambda p: (tiny_config(**{"teacher.optim.epochs": None}), "teacher.optim.epochs"),
        errors.ConfigError,
        "drop the override",
    ),
]


def _snapshot(root) -> dict[str, bytes]:
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _plant_previous_run(workdir, config) -> None:
    """A previous run of the same config: its config.json, a checkpoint and metrics."""
    step = workdir / "teacher" / "checkpoints" / "3"
    step.mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text('{"step": 3}')
    (step / "state.bin").write_bytes(os.urandom(256))
    (workdir / "teacher" / "metrics.jsonl").write_text('{"step": 2, "loss": 2.3}\n')
    # As `files.write_json_atomic` writes it, so the workdir check sees the same experiment.
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))


def _message_names(message: str, needle: str) -> bool:
    return needle in message or needle.replace(os.sep, "/") in message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mistake_fails_early_with_a_named_error(case, tmp_path):
    config, named = case.build(tmp_path)
    workdir = tmp_path / "workdir"
    _plant_previous_run(workdir, config)
    before = _snapshot(workdir)
    jax.clear_caches()  # Anything compiled by an earlier test would compile again here.
    COMPILES.clear()

    with pytest.raises(errors.InputError) as raised:
        pipeline.run(config, str(workdir))

    message = str(raised.value)
    assert type(raised.value) is case.error, f"{type(raised.value).__name__}: {message}"
    assert _message_names(message, named), f"{named!r} not in: {message}"
    assert case.fix in message, f"fix {case.fix!r} not in: {message}"
    assert not COMPILES, f"compiled {len(COMPILES)} computation(s) before failing"
    after = _snapshot(workdir)
    assert {k: after.get(k) for k in before} == before, "a file of the previous run changed"
    assert set(after) - set(before) <= {"config_hash", "search_split.json", ".lock"}, sorted(after)


def _tiny_demo_command(workdir, *flags) -> list[str]:
    """`python -m dfa_jax.main` of the tiny demo in `workdir`, with `flags` after the config."""
    config = f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:tiny"
    return [sys.executable, "-m", "dfa_jax.main", config, f"--workdir={workdir}", *flags]


def test_main_prints_one_error_line(tmp_path):
    """The command line turns the error into `error: ...` on stderr, no traceback."""
    write_npz(tmp_path, "train", images=np.zeros((20, 32, 32, 3), np.float32))
    write_npz(tmp_path, "test", n=8)
    command = _tiny_demo_command(
        tmp_path / "workdir",
        "--config.stages=('teacher',)",
        "--config.data.dataset=cifar10",
        "--config.data.source=npz",
        f"--config.data.path={tmp_path}",
        "--config.num_cpu_devices=1",
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors_lines) == 1 and "train.npz" in errors_lines[0], done.stderr[-2000:]
    assert not os.path.exists(tmp_path / "workdir" / "teacher")


def test_main_refuses_a_cpu_device_count_no_batch_fits_before_jax_starts(tmp_path):
    """--config.num_cpu_devices=100000 kept JAX's start busy for many minutes making the
    devices (4096 took 12 s); more devices than the largest batch has examples is refused before
    any backend starts (the time limit: a start that made them would not end within it)."""
    command = _tiny_demo_command(tmp_path / "workdir", "--config.num_cpu_devices=100000")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "num_cpu_devices = 100000" in line]
    assert "more CPU devices than the largest batch (teacher.optim.batch_size = 16)" in line
    assert not os.path.exists(tmp_path / "workdir")


def test_checkpoint_check_accepts_a_matching_teacher(tmp_path):
    """The shape check passes a checkpoint of the right architecture and class count."""
    directory = save_fake_variables(tmp_path / "teacher" / "variables", "wrn_16_1", 10)
    config = tiny_config(**{"teacher.checkpoint": str(tmp_path)})
    config_lib.validate(config, device_count=2)
    model = models.get_model("wrn_16_1", 10)
    assert teacher.check_checkpoint(str(tmp_path), model) == directory


# ------------------------------------------------------------------------- property: validate

_REFERENCE = config_lib.base_config()


def _leaves(node, prefix=""):
    for key in node:
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", node, key


LEAVES = {path: (node.get_type(key), node[key]) for path, node, key in _leaves(_REFERENCE)}

_INT = st.integers(-(2**40), 2**40)
_TEXT = st.text(max_size=6)
_NAN_INF = st.sampled_from([math.nan, math.inf, -math.inf])


def _enum(values):
    values = tuple(values)
    return st.sampled_from(values), _TEXT.filter(lambda s: s not in values)


def _positive_int(low=1):
    return st.integers(low, 10**6), st.integers(-(10**6), low - 1)


def _non_negative_float():
    return st.floats(0, 1e6), st.floats(max_value=-1e-9, allow_infinity=False) | _NAN_INF


def _positive_float():
    return st.floats(1e-9, 1e6), st.floats(max_value=0, allow_infinity=False) | _NAN_INF


def _unit_interval():  # [0, 1)
    return (
        st.floats(0, 1, exclude_max=True),
        st.floats(max_value=-1e-9, allow_infinity=False) | st.floats(min_value=1) | _NAN_INF,
    )


def _even_positive():  # Batch sizes with 2 devices.
    return st.integers(1, 4096).map(lambda n: 2 * n), st.integers(-50, 50).map(lambda n: 2 * n + 1)


def _optim(prefix):
    return {
        f"{prefix}.epochs": _positive_int(),
        f"{prefix}.batch_size": _even_positive(),
        f"{prefix}.lr": _positive_float(),
        f"{prefix}.momentum": _unit_interval(),
        f"{prefix}.weight_decay": _non_negative_float(),
        f"{prefix}.schedule": _enum(config_lib.SCHEDULES),
        f"{prefix}.decay": _positive_float(),
        f"{prefix}.milestones": (
            st.lists(st.integers(1, 500), max_size=4, unique=True).map(lambda m: tuple(sorted(m))),
            st.sampled_from([(0,), (-5, 10), (120, 60), (60, 60), (60, "120")]),
        ),
    }


_WRN = st.sampled_from(["wrn_16_1", "wrn_16_2", "wrn_28_4", "wrn_40_2", "wrn_10_1"])
_BAD_MODEL = st.sampled_from(["resnet_50", "wrn_11_2", "shufflenet_v2_1.0", ""])
_LABELS = config_lib.METHODS[:-1] + config_lib.AGGREGATIONS

# Per field: (valid values, invalid values) in the context of base_config() with 2 devices.
# Wrong types (None, a string for a number, a number for a string, NaN...) come on top, from
# the field's type alone, so a field missing here is still tested for those.
SPEC = {
    "seed": (st.integers(0, 2**32 - 1), st.integers(max_value=-1) | st.integers(min_value=2**32)),
    "stages": (
        st.sampled_from([("teacher",), ("teacher", "search"), ("teacher", "search", "distill")]),
        st.sampled_from([(), ("teacher", "pretrain"), ("search",), ("teacher", "distill")]),
    ),
    "data.dataset": (st.sampled_from(["cifar10", "cifar100"]), _TEXT | st.just("cinic10")),
    "data.source": (st.just("tfds"), st.sampled_from(["bundled", "npz", "image_folder", "s3"])),
    "data.data_dir": (st.none() | _TEXT.filter(str.strip), st.sampled_from(["", "  "])),
    # base_config() reads TFDS, which reads data.data_dir: any data.path is refused there.
    "data.path": (st.none(), st.just("") | _TEXT.filter(str.strip)),
    "data.npz_image_key": (st.sampled_from(["x", "images"]), st.sampled_from(["", "labels"])),
    "data.npz_label_key": (st.sampled_from(["y", "labels"]), st.sampled_from(["", "images"])),
    # Against the other splits' defaults (train 'train', test 'test', val None): a split read
    # by two of them, or a TFDS slice of one another reads, is refused.
    "data.train_split": (
        st.sampled_from(["train", "train[:90%]"]),
        st.sampled_from(["", "valid", "validation", "tran", "test", "train+test", "test[:5%]"]),
    ),
    "data.test_split": (
        st.sampled_from(["test", "test[50%:]"]),
        st.sampled_from(["", " ", "valid", "train", "train[90%:]", "test+train"]),
    ),
    "data.val_split": (
        st.none(),
        st.sampled_from(["", "v", "test", "test[:50%]", "train[70%:]", "train"]),
    ),
    "data.search_val_fraction": (
        st.floats(0.01, 0.99),
        st.floats(max_value=0) | st.floats(min_value=1) | _NAN_INF,
    ),
    "data.max_train_examples": (
        st.none() | st.integers(128, 10**7),
        st.integers(-(10**6), 127),  # Non-positive, or fewer than the teacher's batch of 128.
    ),
    "data.max_test_examples": (st.none() | st.integers(1, 10**7), st.integers(-(10**6), 0)),
    "data.augment": _enum(["pad_crop", "random_resized_crop"]),
    "data.pad": (st.integers(0, 31), st.integers(-100, -1) | st.integers(32, 10**6)),
    "data.pad_mode": _enum(["reflect", "constant"]),
    "data.prefetch": (st.integers(0, 100), st.integers(-100, -1)),
    "data.eval_batch_size": _positive_int(),
    "teacher.model": (_WRN, _BAD_MODEL),
    "teacher.checkpoint": (st.none(), st.sampled_from(["", "/nonexistent/teacher"])),
    "student.model": (_WRN, _BAD_MODEL),
    "features.clamp_min": (st.none() | st.floats(-100, 100), _NAN_INF),
    "search.epochs_per_group": _positive_int(),
    "search.batch_size": _even_positive(),
    "search.w_lr": _positive_float(),
    "search.w_momentum": _unit_interval(),
    "search.w_weight_decay": _non_negative_float(),
    "search.beta_lr": _positive_float(),
    "search.beta_b1": _unit_interval(),
    "search.beta_b2": _unit_interval(),
    "search.beta_weight_decay": _non_negative_float(),
    "search.init_last_logit": (st.floats(-50, 50), _NAN_INF),
    "search.order": (
        st.sampled_from([1, 2]),
        st.integers(-5, 10).filter(lambda n: n not in (1, 2)),
    ),
    "search.gamma_st": _non_negative_float(),
    "search.gamma_ts": _non_negative_float(),
    "distill.method": _enum(config_lib.METHODS),
    "distill.aggregation": (
        st.sampled_from([a for a in config_lib.AGGREGATIONS if a != "file"]),
        _TEXT.filter(lambda s: s not in config_lib.AGGREGATIONS) | st.just("file"),  # File unset.
    ),
    "distill.alpha_file": (st.none() | _TEXT, st.nothing()),  # Unused unless aggregation 'file'.
    "distill.compare_with": (
        st.lists(st.sampled_from([n for n in _LABELS if n != "file"]), max_size=3).map(tuple),
        st.sampled_from([("best",), ("last", "median"), ("file",)]),
    ),
    "distill.seeds": (
        st.lists(st.integers(0, 2**32 - 1), max_size=3, unique=True).map(tuple),
        st.sampled_from([(-1,), (2**32,), (0, 2**32), (2**63,), (1, 1)]),
    ),
    "distill.distance": _enum(["partial_l2", "l2"]),
    "distill.margin": (st.floats(-10, 10), _NAN_INF),
    "distill.gamma_fd": _non_negative_float(),
    "distill.teacher_bn": _enum(["eval", "batch"]),
    "baselines.kd_temperature": _positive_float(),
    "baselines.ft_rate": _positive_float(),
    "baselines.ft_pretrain_epochs": _positive_int(),
    "baselines.ab_init_epochs": _positive_int(),
    "dtype": _enum(["float32", "bfloat16"]),
    # Alone (base_config() sets neither): a mean without a std, or the reverse, is refused.
    "data.mean": (
        st.none(),
        st.tuples(*[st.floats(1.01, 300.0)] * 3)
        | st.tuples(*[st.floats(0.0, 1.0)] * 2)
        | st.tuples(*[st.floats(0.0, 1.0)] * 3),
    ),
    "data.std": (
        st.none(),
        st.tuples(st.floats(-1.0, 0.0), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
        | st.tuples(*[st.floats(0.01, 1.0)] * 3),
    ),
    "teacher.distill_from": _enum(["best", "last"]),
    "num_cpu_devices": (st.integers(0, 64), st.integers(-64, -1)),
    "log_every_steps": _positive_int(),
    "checkpoint_every_steps": _positive_int(),
    "checkpoints_to_keep": _positive_int(),
    **_optim("teacher.optim"),
    **_optim("distill.optim"),
}
for _field in (
    "kd_weight",
    "kd_ce_weight",
    "fitnets_weight",
    "at_weight",
    "sp_weight",
    "ft_weight",
    "ab_margin",
    "jacobian_weight",
    "margin_gamma",
):
    SPEC[f"baselines.{_field}"] = _non_negative_float()


_TUPLE_ITEMS = {"data.mean": float, "data.std": float}  # Tuples with no default to judge by.


def _wrong_types(path: str):
    """Values of the wrong type for field `path`, judged from its type in base_config()."""
    kind, default = LEAVES[path]
    nullable = default is None or path == "features.clamp_min"
    options = [] if nullable else [st.none()]
    if kind is bool:
        options += [_INT, _TEXT, st.floats()]
    elif kind is int:
        options += [_TEXT, st.booleans(), st.floats()]
    elif kind is float:
        options += [_TEXT, st.booleans(), _NAN_INF]
    elif kind is str:
        options += [_INT, st.booleans(), st.floats(), st.just(("a",))]
    elif kind is tuple:
        item = _TUPLE_ITEMS.get(path, type(default[0]) if default else str)
        bad_items = _INT if item is str else _TEXT
        options += [_TEXT, _INT, st.lists(bad_items, min_size=1, max_size=3).map(tuple)]
    return st.one_of(options)


@st.composite
def field_values(draw):
    """(dotted field, value, whether validate must accept it)."""
    path = draw(st.sampled_from(sorted(LEAVES)))
    valid, invalid = SPEC.get(path, (st.just(LEAVES[path][1]), st.nothing()))
    kind = draw(st.sampled_from(["valid", "invalid", "type"]))
    if kind == "valid":
        return path, draw(valid), True
    if kind == "invalid" and not invalid.is_empty:
        return path, draw(invalid), False
    return path, draw(_wrong_types(path)), False


def _loose(path, value) -> ml_collections.ConfigDict:
    """base_config() with `path` = `value` as is: no type kept or converted (even a type-unsafe
    ConfigDict turns a bool given to a float field into 0.0 or 1.0)."""
    tree = _REFERENCE.to_dict()
    node = tree
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return ml_collections.ConfigDict(tree, type_safe=False)


def _set(config, path, value):
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def _names(message: str, path: str) -> bool:
    """Whether `message` names `path` as a whole dotted word (not `data.pad` in `data.pad_mode`)."""
    return re.search(rf"(?<![\w.]){re.escape(path)}(?![\w])", message) is not None


def _check(config, path, value, valid):
    if valid:
        config_lib.validate(config, device_count=2)
        return
    with pytest.raises(errors.ConfigError) as raised:
        config_lib.validate(config, device_count=2)
    assert _names(str(raised.value), path), f"{path} = {value!r}: {raised.value}"


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(field_values())
def test_every_field_wrong_value_is_named(case):
    _judge(*case)


# 60 draws over every field reach about 40 of them: each field of SPEC is also drawn on its own,
# half valid and half invalid values, so no range check goes untried.
@pytest.mark.parametrize("path", sorted(SPEC))
@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_each_fields_valid_and_invalid_values_are_judged(path, data):
    valid, invalid = SPEC[path]
    if invalid.is_empty or data.draw(st.booleans(), label="valid"):
        _judge(path, data.draw(valid, label="value"), True)
    else:
        _judge(path, data.draw(invalid, label="value"), False)


def _judge(path, value, valid):
    # What the command line and config files give: ml_collections refuses some types itself,
    # and converts others (an int or a bool to a float field's float), judged by the loose check.
    config = config_lib.base_config()
    try:
        _set(config, path, value)
    except (TypeError, ValueError):
        assert not valid, f"ml_collections refused a valid {path} = {value!r}"
    else:
        stored = config
        for key in path.split("."):
            stored = stored[key]
        if type(stored) is type(value):
            _check(config, path, value, valid)
    # What it lets through or not, validate must catch alone (a config built without types).
    _check(_loose(path, value), path, value, valid)


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_every_field_rejects_none_or_a_wrong_type(path):
    """Each field once, deterministically: a value of the wrong type is named."""
    kind, default = LEAVES[path]
    wrong = {bool: 1, int: "1", float: "0.5", str: 3, tuple: 3}.get(kind, object())
    _check(_loose(path, wrong), path, wrong, valid=False)
    nullable = default is None or path == "features.clamp_min"
    _check(_loose(path, None), path, None, valid=nullable)


def test_spec_fields_exist():
    assert set(SPEC) <= set(LEAVES), set(SPEC) - set(LEAVES)


def test_unknown_field_is_named_with_a_suggestion():
    loose = _loose("teacher.optim.weight_deacy", 1e-4)
    with pytest.raises(errors.ConfigError, match=r"weight_deacy .*did you mean .*weight_decay\?"):
        config_lib.validate(loose, device_count=2)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--config=configs/demo.py", "--config.data.pads=3"], "'pads'"),
        (["--config=configs/demo.py", "--config.seed=abc"], "--config.seed=abc"),
        (["--config=configs/no_such_config.py"], "configs/no_such_config.py"),
        (["--config=configs/demo.py:huge"], "'huge'"),
        (
            [
                "--config=configs/demo.py",
                "--config.distill.seeds=(0,1)",
                "--config.distill.seeds=(2,)",
            ],
            "--config.distill.seeds given more than once",
        ),
        (["--config=configs/demo.py", "--config.seed=None"], "seed is None but needs an integer"),
        (
            ["--config=configs/demo.py", "--config.no.such=None"],
            "unknown config field config.no.such",
        ),
    ],
    ids=[
        "unknown_field",
        "bad_value",
        "missing_config_file",
        "bad_config_argument",
        "field_given_twice",
        "none_where_not_allowed",
        "none_for_unknown_field",
    ],
)
def test_command_line_mistakes_are_one_error_line(flags, named, tmp_path):
    """Mistakes found while absl parses the flags or loads the config file: no traceback."""
    command = [sys.executable, "-m", "dfa_jax.main", f"--workdir={tmp_path / 'w'}", *flags]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert named in done.stderr[done.stderr.index(lines[0]) :], done.stderr[-2000:]  # Its list.
    assert not (tmp_path / "w").exists()


def test_none_on_the_command_line_unsets_a_field_that_allows_it(tmp_path):
    """`--config.X=None` sets None where the field allows it (a number field's parser used to
    fail on the word; a string field took the string 'None'): only the seeds' mistake is left."""
    command = [
        sys.executable,
        "-m",
        "dfa_jax.main",
        "--config=configs/cinic10_pair1.py",
        f"--workdir={tmp_path / 'w'}",
        "--config.data.path=/nonexistent",
        "--config.data.max_train_examples=None",
        "--config.data.val_split=None",
        "--config.teacher.checkpoint=None",
        "--config.distill.seeds=(0,0)",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    problems = done.stderr[done.stderr.index(lines[0]) :]
    assert "distill.seeds" in problems, problems
    for field in ("max_train_examples", "val_split", "checkpoint", "'None'"):
        assert field not in problems, problems


def test_none_on_the_command_line_clears_a_value_the_config_file_sets(monkeypatch):
    """`--config.X=None` is taken out of what the flag parser reads and sets the field to None
    even where the config file gave it a value (a teacher.checkpoint to train from scratch
    instead); the other overrides stay for the parser."""
    from dfa_jax import main  # pylint: disable=g-import-not-at-top
    from test_config import load_config  # pylint: disable=g-import-not-at-top

    monkeypatch.setattr(main, "_NONE_OVERRIDES", [])
    argv = [
        "prog",
        "--config=configs/demo.py",
        "--config.teacher.checkpoint=None",
        "--config.seed=3",
    ]
    assert main._without_none_overrides(argv) == [
        "prog",
        "--config=configs/demo.py",
        "--config.seed=3",
    ]
    config = load_config("demo")
    config.teacher.checkpoint = "/runs/earlier/teacher"
    config.lock()
    main._set_none_overrides(config)
    assert config.teacher.checkpoint is None
    assert config.seed == load_config("demo").seed


@pytest.mark.parametrize(
    "kind, device_file, extras",
    [
        ("NVIDIA GPU", "nvidia0", ["'.[cuda12]'", "'.[cuda13]'"]),
        ("TPU", "accel0", ["'.[tpu]'"]),
    ],
)
def test_accelerator_unused_by_jax_is_an_error_naming_the_install(
    tmp_path, monkeypatch, kind, device_file, extras
):
    """A GPU or TPU on the machine while JAX runs on the CPU (a CPU-only jaxlib): an error that
    names the device, the extra to install and --allow_cpu; JAX_PLATFORMS=cpu or the flag go
    on."""
    (tmp_path / device_file).touch()
    monkeypatch.setattr(
        parallel, "ACCELERATOR_DEVICE_FILES", {kind: (str(tmp_path / f"{device_file[:-1]}*"),)}
    )
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert jax.default_backend() == "cpu"
    with pytest.raises(errors.InputError) as error:
        parallel.check_accelerators_used(allow_cpu=False)
    message = str(error.value)
    assert kind in message and str(tmp_path / device_file) in message and "--allow_cpu" in message
    assert all(extra in message for extra in extras), message
    parallel.check_accelerators_used(allow_cpu=True)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    parallel.check_accelerators_used(allow_cpu=False)
    # No accelerator on the machine: nothing to say.
    monkeypatch.setattr(parallel, "ACCELERATOR_DEVICE_FILES", {kind: (str(tmp_path / "none*"),)})
    monkeypatch.delenv("JAX_PLATFORMS")
    parallel.check_accelerators_used(allow_cpu=False)


def test_a_stop_that_comes_as_the_run_finishes_says_the_run_is_complete(tmp_path):
    """A SIGTERM during the last stage's last step (or the records after it) was acknowledged
    ("stopping after the step in flight") and then the command ended 0 without a word: the run
    says it is complete, so a script or scheduler log reads right."""
    script = (
        "import sys\n"
        "from absl import app\n"
        "from dfa_jax import main, pipeline, preemption\n"
        "def finished(*args, **kwargs):\n"
        "    preemption.request('SIGTERM')  # As if it came during the last step.\n"
        "    return {}\n"
        "pipeline.run = finished\n"
        f"sys.argv = ['main', '--config=configs/demo.py:tiny', '--workdir={tmp_path / 'w'}']\n"
        "app.run(main.main, flags_parser=main.parse_flags)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SIGTERM came as the run finished: it is complete (status 0)" in done.stderr


def test_a_disk_that_fills_during_the_run_is_an_error_saying_what_to_do(tmp_path):
    """A record written when the disk is full (an OSError, not a checkpoint's WorkdirError):
    one error line saying to free space and run the same command again, no traceback; any
    other OSError keeps its traceback."""
    script = (
        "import errno, sys\n"
        "from absl import app\n"
        "import os\n"
        "from dfa_jax import files, main, pipeline\n"
        "code = int(sys.argv[1])\n"
        f"record = {str(tmp_path / 'w' / 'teacher' / 'metrics.jsonl')!r}\n"
        "def full(*args, **kwargs):  # A record's write, as a full disk fails it: no file named.\n"
        "    def failing_fsync(fd):\n"
        "        raise OSError(code, os.strerror(code))\n"
        "    os.makedirs(os.path.dirname(record), exist_ok=True)\n"
        "    os.fsync = failing_fsync\n"
        "    files.write_text_atomic(record, 'rows')\n"
        "pipeline.run = full\n"
        f"sys.argv = ['main', '--config=configs/demo.py:tiny', '--workdir={tmp_path / 'w'}']\n"
        "app.run(main.main, flags_parser=main.parse_flags)\n"
    )
    for code, full in ((errno.ENOSPC, True), (errno.EACCES, False)):
        done = subprocess.run(
            [sys.executable, "-c", script, str(code)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 1, done.stderr[-2000:]
        assert ("Traceback" in done.stderr) != full, done.stderr[-2000:]
        record = tmp_path / "w" / "teacher" / "metrics.jsonl"
        assert (
            f"error: the disk is full (No space left on device writing {record}); free space,"
            " then run the same command again" in done.stderr
        ) == full
        assert str(record) in done.stderr  # Which file, and so which disk.
        assert os.listdir(record.parent) == []  # No partial copy left.


def test_checkpoint_check_refuses_a_deeper_teacher_of_the_same_width(tmp_path):
    """wrn_22_1's variables hold every wrn_16_1 array at its shape, and more blocks: those are
    named before anything starts, not left to orbax's tree-structure error at the restore."""
    directory = save_fake_variables(tmp_path / "variables", "wrn_22_1", 10)
    with pytest.raises(errors.CheckpointError, match="not in the model"):
        teacher.check_checkpoint(directory, models.get_model("wrn_16_1", 10))
