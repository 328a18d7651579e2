"""validate(): one clear error per mistake, naming the field and the fix, before anything builds."""

import ast
import importlib.util
import json
import os
import re

import numpy as np
import pytest

from dfa_jax import baseline_presets
from dfa_jax import config_lib
from dfa_jax import models

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


SHIPPED = sorted(
    os.path.relpath(os.path.join(root, f), CONFIGS)[:-3]
    for root, _, files in os.walk(CONFIGS)
    for f in files
    if f.endswith(".py")
)


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_shipped_configs_validate(name, arg, tmp_path):
    config = load_config(name, arg)
    if config.data.source == "image_folder":
        config.data.path = str(tmp_path)  # Where a user's CINIC-10 would be.
    if config.distill.aggregation == "file":
        config.distill.alpha_file = write_alpha_file(tmp_path / "alpha.json", config.teacher.model)
    config_lib.validate(config, device_count=2)
    if (
        arg is None
    ):  # The README's 8-GPU and TPU v4-32 launches run the shipped configs as they are.
        config_lib.validate(config, device_count=8)
        config_lib.validate(config, device_count=16)


def write_alpha_file(path, teacher_model: str) -> str:
    """An alpha.json as a search of `teacher_model` writes it (uniform alpha per group)."""
    groups = models.get_model(teacher_model, 10).feature_groups()
    record = {
        "teacher": teacher_model,
        "groups": [{"layers": list(g), "alpha": [1 / len(g)] * len(g)} for g in groups],
    }
    path.write_text(json.dumps(record))
    return str(path)


def test_pair_configs_follow_the_paper():
    for i, student in enumerate(["wrn_16_4", "wrn_28_2", "wrn_16_2"], start=1):
        config = load_config(f"cifar100_pair{i}")
        assert (config.teacher.model, config.student.model) == ("wrn_28_4", student)
        assert config.search.epochs_per_group == 40
        assert config.stages == ("teacher", "search", "distill")
    for i, (t, s) in enumerate([("2.0", "1.0"), ("2.0", "0.5"), ("1.0", "0.5")], start=1):
        config = load_config(f"cinic10_pair{i}")
        assert (config.teacher.model, config.student.model) == (
            f"shufflenet_v2_{t}",
            f"shufflenet_v2_{s}",
        )
        assert config.search.epochs_per_group == 5 and config.data.val_split == "valid"
        assert (config.distill.optim.epochs, config.distill.optim.batch_size) == (140, 96)
        # §4.3: batch size 96 throughout (the search too); AB's initialisation at the student's
        # rate 0.01, as RepDistiller's `helper/pretrain.py` runs it.
        assert config.search.batch_size == 96, i
        assert config.baselines.ab_init_lr == config.distill.optim.lr == 0.01, i
    for name in ("cifar100_pair1", "cifar100_pair2", "cifar100_pair3", "cinic10_pair1"):
        config = load_config(name)
        search = config.search
        # §3.4: the bridge loss's weights (Eq. 12), beta's Adam (lr 1e-3, momentum (0.5, 0.999),
        # weight decay 1e-3), pre-ReLU values no smaller than -1, the 7:3 split.
        assert (search.gamma_st, search.gamma_ts) == (1e-3, 1.0), name
        assert (search.beta_lr, search.beta_b1, search.beta_b2) == (1e-3, 0.5, 0.999), name
        assert search.beta_weight_decay == 1e-3 and search.order == 1, name
        assert config.features.clamp_min == -1.0 and config.data.search_val_fraction == 0.3
        # Eq. 4's gamma_fd, which the paper leaves open: the authors' MarginReLU weight on CIFAR
        # and CINIC-10 alike, the Margin baseline's, so Table 4 and 5 compare targets alone.
        margin = baseline_presets.settings(config).margin_gamma
        assert config.distill.gamma_fd == margin == 1e-3, name
        # The search's w: SGD, momentum 0.9, no Nesterov, coupled weight decay 5e-4 (§3.4),
        # one cosine from 0.05 over the whole search (DARTS' w schedule).
        from dfa_jax import search as search_lib  # pylint: disable=g-import-not-at-top

        w = search_lib.w_optim(search, 3)
        assert (w.momentum, w.nesterov, w.weight_decay) == (0.9, False, 5e-4), name
        assert (w.lr, w.schedule, w.epochs) == (0.05, "cosine", 3 * search.epochs_per_group)


def _recipe(optim):
    fields = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule")
    return {f: optim[f] for f in fields} | {
        "milestones": tuple(optim.milestones),
        "decay": optim.decay,
    }


def test_recipes_are_the_papers_and_the_peers():
    """§4.1's CIFAR recipe (the WRN recipe: SGD 0.1 Nesterov, wd 5e-4, x0.2 at 60/120/160 of
    200, batch 128), §4.2's CINIC-10 one (0.01, x0.1 at 100/120 of 140, batch 96) for teachers
    and students, and each dataset's augmentation: CIFAR pads 4 by reflection, CINIC-10 takes
    the authors' RandomResizedCrop."""
    paper = {
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "step",
        "milestones": (60, 120, 160),
        "decay": 0.2,
    }
    cinic = paper | {
        "epochs": 140,
        "batch_size": 96,
        "lr": 0.01,
        "milestones": (100, 120),
        "decay": 0.1,
    }
    crd = paper | {
        "epochs": 240,
        "batch_size": 64,
        "lr": 0.05,
        "nesterov": False,
        "milestones": (150, 180, 210),
        "decay": 0.1,
    }
    for name, recipe in (
        ("cifar100_pair1", paper),
        ("cinic10_pair1", cinic),
        ("crd/resnet56_to_resnet20", crd),
    ):
        config = load_config(name)
        assert _recipe(config.teacher.optim) == _recipe(config.distill.optim) == recipe, name
    config = load_config("cifar100_pair1")
    assert (config.data.augment, config.data.pad, config.data.pad_mode, config.data.flip) == (
        "pad_crop",
        4,
        "reflect",
        True,
    )
    assert load_config("cinic10_pair1").data.augment == "random_resized_crop"


def test_unknown_config_argument():
    with pytest.raises(ValueError, match="tiny"):
        load_config("demo", "huge")


def _mutate(path, value):
    def apply(config):
        node = config
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value

    return apply


CASES = [
    ("teacher.model", "resnet_50", "teacher.model", "wrn_"),
    ("student.model", "wrn_11_2", "student.model", "wrn_{depth}_{width}"),
    ("data.dataset", "imagenet", "data.dataset", "cifar100"),
    ("data.source", "s3", "data.source", "tfds"),
    ("teacher.optim.batch_size", 127, "teacher.optim.batch_size", "multiple of 2"),
    ("teacher.optim.lr", 0.0, "teacher.optim.lr", "positive"),
    ("teacher.optim.lr", -0.1, "teacher.optim.lr", "positive"),
    ("teacher.optim.epochs", 0, "teacher.optim.epochs", "positive"),
    ("data.search_val_fraction", 1.0, "data.search_val_fraction", "(0, 1)"),
    ("data.search_val_fraction", 0.0, "data.search_val_fraction", "(0, 1)"),
    ("data.eval_batch_size", 0, "data.eval_batch_size", "positive"),
    ("teacher.checkpoint", "/nonexistent/teacher", "teacher.checkpoint", "does not exist"),
    ("stages", ("teacher", "pretrain"), "stages", "subset"),
    ("search.order", 3, "search.order", "second order"),
    ("search.epochs_per_group", 0, "search.epochs_per_group", "positive"),
    ("search.beta_lr", 0.0, "search.beta_lr", "positive"),
    (
        "search.batch_size",
        33,
        "search.batch_size",
        "divisible by the 2 devices; use a multiple of 2",
    ),
    ("search.batch_size", 0, "search.batch_size", "must be positive"),
    ("distill.aggregation", "median", "distill.aggregation", "'last'"),
    ("distill.compare_with", ("last", "best"), "distill.compare_with", "'none'"),
    ("distill.compare_with", ("kd", "last", "kd"), "distill.compare_with", "each label once"),
    ("distill.distance", "l1", "distill.distance", "partial_l2"),
    ("distill.teacher_bn", "frozen", "distill.teacher_bn", "'batch'"),
    ("distill.optim.lr", -1.0, "distill.optim.lr", "positive"),
    ("dtype", "float16", "dtype", "bfloat16"),
    ("data.pad_mode", "wrap", "data.pad_mode", "reflect"),
    # Ranges and types ml_collections lets through (None, NaN, bools, tuple elements).
    ("seed", -1, "seed", "[0, 2**32)"),
    # Seeds 2**32 apart gave one student twice; 2**63 failed at the student's init.
    ("distill.seeds", (0, 2**32), "distill.seeds", "4294967296 is outside [0, 2**32)"),
    ("distill.seeds", (2**63,), "distill.seeds", "give integers in [0, 2**32)"),
    ("distill.seeds", (-1,), "distill.seeds", "give integers in [0, 2**32)"),
    ("teacher.optim.epochs", None, "teacher.optim.epochs", "drop the override"),
    ("teacher.optim.lr", float("nan"), "teacher.optim.lr", "finite number"),
    ("teacher.optim.momentum", 1.0, "teacher.optim.momentum", "[0, 1)"),
    ("teacher.optim.milestones", (120, 60), "teacher.optim.milestones", "increasing"),
    ("teacher.optim.milestones", (60, "120"), "teacher.optim.milestones", "tuple of integers"),
    ("teacher.optim.decay", 0.0, "teacher.optim.decay", "positive"),
    ("stages", (1,), "stages", "tuple of strings"),
    ("data.pad", 40, "data.pad", "[0, 32)"),
    ("data.prefetch", -1, "data.prefetch", ">= 0"),
    ("data.npz_label_key", "images", "data.npz_label_key", "own npz keys"),
    ("data.train_split", "", "data.train_split", "name a split"),
    ("data.val_split", "valid", "data.val_split", "'train' and 'test'"),
    ("data.val_split", "test[:50%]", "data.test_split = 'test'", "disjoint slices"),
    ("data.test_split", "train[:10%]", "data.train_split = 'train'", "disjoint slices"),
    ("data.source", "bundled", "data.source", "'digits'"),
    ("data.dataset", "cinic10", "data.dataset", "image_folder"),
    ("data.max_train_examples", 100, "data.max_train_examples", "lower the batch size"),
    ("features.clamp_min", float("inf"), "features.clamp_min", "finite number"),
    ("search.beta_b2", 1.0, "search.beta_b2", "[0, 1)"),
    ("search.gamma_st", -1.0, "search.gamma_st", ">= 0"),
    ("distill.gamma_fd", -1e-3, "distill.gamma_fd", ">= 0"),
    ("baselines.kd_temperature", 0.0, "baselines.kd_temperature", "positive"),
    ("baselines.ab_init_epochs", 0, "baselines.ab_init_epochs", "positive"),
    ("checkpoints_to_keep", 0, "checkpoints_to_keep", "at least 1"),
    ("num_cpu_devices", -2, "num_cpu_devices", "one per usable core"),
    ("num_cpu_devices", 100000, "num_cpu_devices", "more CPU devices than the largest batch"),
    ("teacher.distill_from", "middle", "teacher.distill_from", "'best'"),
    ("data.mean", (125.3, 123.0, 113.9), "data.mean", "(0.4914, 0.4824, 0.4467)"),
    ("data.std", (0.2, 0.2), "data.std", "three numbers"),
    ("data.std", (0.2, 0.0, 0.2), "data.std", "> 0"),
    ("data.mean", (-0.1, 0.5, 0.5), "data.mean", "[0, 1]"),
    # The bounds of ranges (the property tests in test_errors.py draw inside and outside them).
    ("search.w_momentum", 1.0, "search.w_momentum", "[0, 1)"),
    ("search.beta_b1", 1.0, "search.beta_b1", "[0, 1)"),
    ("search.beta_b2", -1e-9, "search.beta_b2", "[0, 1)"),
    ("distill.max_students_per_step", -1, "distill.max_students_per_step", "use 0"),
    ("distill.cohort", "vmapp", "distill.cohort", "'auto', 'loop'"),
]


@pytest.mark.parametrize("path,value,field,fix", CASES)
def test_each_mistake_names_field_and_fix(path, value, field, fix):
    config = load_config("cifar100_teacher")
    if path in ("data.mean", "data.std"):  # A normalisation is given as a pair.
        config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    _mutate(path, value)(config)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, device_count=2)
    message = str(e.value)
    assert field in message and fix in message, message
    assert message.count("\n  - ") == 1, f"one mistake should give one line: {message}"


@pytest.mark.parametrize("given, missing", [("mean", "std"), ("std", "mean")])
def test_a_normalisation_is_given_whole(given, missing):
    """An imported teacher's mean with the dataset's std (or the reverse) matches neither
    normalisation: refused, naming both fields."""
    config = load_config("cifar100_teacher")
    config.data[given] = (0.5, 0.5, 0.5)
    with pytest.raises(
        config_lib.ConfigError, match=f"data.{given} is set but data.{missing} is not.*give both"
    ):
        config_lib.validate(config, device_count=2)
    config.data[missing] = (0.25, 0.25, 0.25)
    config_lib.validate(config, device_count=2)


def test_a_bridge_loss_of_no_terms_is_refused():
    config = load_config("cifar100_pair1")
    config.search.gamma_st = config.search.gamma_ts = 0.0
    with pytest.raises(config_lib.ConfigError, match="leaves beta no loss; set search.gamma_ts"):
        config_lib.validate(config, device_count=2)
    config.search.gamma_ts = 1.0  # The TS term alone is a bridge loss (the ST term's weight 0).
    config_lib.validate(config, device_count=2)


def test_stage_dependencies():
    config = load_config("cifar100_pair1")
    config.stages = ("teacher", "distill")
    with pytest.raises(config_lib.ConfigError, match="add 'search' to stages"):
        config_lib.validate(config, device_count=1)
    config.stages = ("search",)
    with pytest.raises(config_lib.ConfigError, match="need a teacher"):
        config_lib.validate(config, device_count=1)
    config.distill.aggregation = "file"
    config.stages = ("teacher", "distill")
    with pytest.raises(config_lib.ConfigError, match="distill.alpha_file is unset"):
        config_lib.validate(config, device_count=1)


def test_missing_data_path():
    config = load_config("cifar100_teacher")
    config.data.source = "image_folder"
    with pytest.raises(config_lib.ConfigError, match=r"data.path is unset.*--config.data.path"):
        config_lib.validate(config, device_count=1)
    config.data.path = "/nonexistent/cinic10"
    with pytest.raises(
        config_lib.ConfigError, match="data.path = '/nonexistent/cinic10' does not exist"
    ):
        config_lib.validate(config, device_count=1)


@pytest.mark.parametrize(
    "config_name, source, field, reads",
    [
        ("cifar100_pair1", "tfds", "path", "tfds reads data.data_dir"),
        ("cinic10_pair1", "image_folder", "data_dir", "image_folder reads data.path"),
        ("cinic10_pair1", "npz", "data_dir", "npz reads data.path"),
        ("demo", "bundled", "path", "the digits ship inside scikit-learn"),
    ],
)
def test_a_location_the_source_does_not_read_is_refused(config_name, source, field, reads):
    """A TFDS run given data.path (the npz/image_folder field) read tfds' default directory,
    whatever the path held; the field the source ignores is named with the one it reads."""
    config = load_config(config_name)
    config.data.source = source
    if source in ("image_folder", "npz"):
        config.data.path = os.path.dirname(__file__)
    config.data[field] = "/data/cifar"
    with pytest.raises(config_lib.ConfigError) as caught:
        config_lib.validate(config, device_count=1)
    message = str(caught.value)
    assert f"data.{field} = '/data/cifar' is not read by data.source = {source!r}" in message
    assert reads in message
    config.data[field] = None
    config_lib.validate(config, device_count=1)


def test_teacher_student_groups_must_pair_up():
    """As many groups, each teacher map the student's size or a whole multiple of it (pooled to
    the student's); anything else is refused before a model is built, naming the fix."""
    config = load_config("cifar100_teacher")
    config.student.model = "shufflenet_v2_0.5"  # 5 groups against the WRN's 3.
    with pytest.raises(config_lib.ConfigError, match="has 3 groups but .* has 5; pick a student"):
        config_lib.validate(config, device_count=1)
    config.teacher.model, config.student.model = "ShuffleV1", "resnet20"  # 16/8/4 vs 32/16/8.
    with pytest.raises(config_lib.ConfigError, match="at spatial sizes .* whole multiple"):
        config_lib.validate(config, device_count=1)
    config.teacher.model, config.student.model = "resnet20", "ShuffleV1"  # Pooled 2x: accepted.
    config_lib.validate(config, device_count=1)


def test_all_mistakes_reported_together():
    config = load_config("cifar100_teacher")
    config.teacher.optim.lr = -1.0
    config.data.dataset = "mnist"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, device_count=1)
    assert "teacher.optim.lr" in str(e.value) and "data.dataset" in str(e.value)


def test_recipes():
    paper, overhaul = config_lib.optim_recipe("paper"), config_lib.optim_recipe("overhaul")
    assert (paper.lr, paper.milestones, paper.decay, paper.nesterov) == (
        0.1,
        (60, 120, 160),
        0.2,
        True,
    )
    # Teachers train as students do, with Nesterov (the authors' simple_train.py).
    base = config_lib.base_config()
    assert base.teacher.optim.nesterov and base.distill.optim.nesterov
    assert config_lib.optim_recipe("cinic").nesterov
    assert (overhaul.milestones, overhaul.decay, overhaul.nesterov) == ((100, 150), 0.1, True)
    with pytest.raises(config_lib.ConfigError, match="paper"):
        config_lib.optim_recipe("adam")


def test_base_config_is_lockable_and_rejects_typos():
    config = config_lib.base_config()
    config.lock()
    with pytest.raises(AttributeError):
        config.teacher.optim.learning_rate = 0.1


def test_helper_stage_learning_rates_are_repdistillers():
    """FT's paraphraser pre-training and AB's initialisation run at RepDistiller's rates
    (`helper/pretrain.py`): 0.01 and 0.05; the Jacobian weight is Knowledge-Distillation-Zoo's
    scripts' 20, not its argparse default of 1."""
    base = config_lib.base_config().baselines
    assert (base.ft_pretrain_lr, base.ab_init_lr, base.jacobian_weight) == (0.01, 0.05, 20.0)


def _package_imports() -> dict[str, set[str]]:
    """dfa_jax's modules -> the dfa_jax modules each imports (at the top or inside a function)."""
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dfa_jax")
    paths = {}
    for directory, _, names in os.walk(package):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path[:-3], os.path.dirname(package)).replace(os.sep, ".")
                paths[module.removesuffix(".__init__")] = path
    graph = {}
    for module, path in paths.items():
        imported = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dfa_jax"):
                for alias in node.names:
                    name = f"{node.module}.{alias.name}"
                    imported.add(name if name in paths else node.module)
        graph[module] = {m for m in imported if m in paths and m != module}
    return graph


def test_package_imports_have_no_cycles():
    """The modules form layers: no module imports, however indirectly, one that imports it (the
    config's checks sit below the stages they check)."""
    graph, done, path = _package_imports(), set(), []

    def visit(module):
        if module in path:
            raise AssertionError(
                "import cycle: " + " -> ".join(path[path.index(module) :] + [module])
            )
        if module not in done:
            path.append(module)
            for imported in sorted(graph[module]):
                visit(imported)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)
    assert "dfa_jax.distill" not in graph["dfa_jax.config_lib"]


def test_crd_recipe_and_pairs_are_repdistillers():
    """RepDistiller's CIFAR-100 recipe (`train_student.py`), as mdistiller's configs keep it, and
    one shipped config per pair of its benchmark."""
    recipe = config_lib.optim_recipe("crd")
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.momentum) == (240, 64, 0.05, 0.9)
    assert (recipe.weight_decay, recipe.schedule, recipe.decay) == (5e-4, "step", 0.1)
    assert tuple(recipe.milestones) == (150, 180, 210) and recipe.nesterov is False
    shipped = {name for name in SHIPPED if name.startswith("crd" + os.sep)}
    assert len(config_lib.CRD_PAIRS) == 13 and len(shipped) == 13
    for teacher, student in config_lib.CRD_PAIRS:
        name = os.path.join("crd", f"{teacher.lower()}_to_{student.lower()}")
        config = load_config(name)
        assert (config.teacher.model, config.student.model) == (teacher, student)
        assert config.teacher.optim.to_dict() == recipe.to_dict()
        light = student in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
        assert config.distill.optim.lr == (0.01 if light else 0.05), student
        # `helper/pretrain.py`: AB at the student's rate; FT at 0.01 for its resnet*/wrn_*
        # students, else the student's; the teacher of the last epoch (`ckpt_epoch_240.pth`).
        assert config.baselines.ab_init_lr == config.distill.optim.lr, student
        vgg = student.startswith("vgg")
        assert config.baselines.ft_pretrain_lr == (0.05 if vgg else 0.01), student
        assert config.teacher.distill_from == "last"
        assert tuple(config.data.mean) == (0.5071, 0.4867, 0.4408)
        assert tuple(config.data.std) == (0.2675, 0.2565, 0.2761)
        assert (config.data.pad, config.data.pad_mode, config.data.flip) == (4, "constant", True)
        assert config.stages == ("teacher", "search", "distill")
    # A pair of one's own with a light teacher: RepDistiller's `train_teacher.py` rate for it.
    assert config_lib.crd_pair("ShuffleV2", "resnet8").teacher.optim.lr == 0.01
    assert config_lib.crd_pair("resnet32x4", "ShuffleV2").teacher.optim.lr == 0.05


def test_milestones_a_shortened_run_never_reaches_are_warned_about():
    """30 epochs of the paper's recipe keep lr 0.1 throughout (its milestones are 60/120/160):
    valid, but named; a teacher loaded from a checkpoint is not trained, so its are not."""
    config = load_config("cifar100_teacher")
    config.teacher.optim.epochs = 30
    (line,) = config_lib.schedule_warnings(config)
    assert "teacher.optim.milestones = (60, 120, 160)" in line and "(30)" in line
    config.teacher.optim.milestones = (10, 30)  # A decay after the last epoch: none.
    (line,) = config_lib.schedule_warnings(config)
    assert "(30,) at or after its last epoch (30)" in line
    config.teacher.optim.milestones = (10, 20)
    assert config_lib.schedule_warnings(config) == []
    config.distill.optim.epochs = 100
    config.teacher.checkpoint = "/runs/teacher"
    (line,) = config_lib.schedule_warnings(config)
    assert line.startswith("distill.optim.milestones") and "(120, 160)" in line
    config.distill.optim.epochs = 1  # No milestone fits: the fix is a constant rate.
    (line,) = config_lib.schedule_warnings(config)
    assert "--config.distill.optim.schedule=constant" in line


def test_a_rising_step_decay_and_a_search_no_student_reads_are_warned_about():
    config = load_config("cifar100_pair1")
    assert config_lib.schedule_warnings(config) == []
    config.distill.optim.decay = 5.0  # A typo for 0.5 (or 5e-1).
    (line,) = config_lib.schedule_warnings(config)
    assert line.startswith("distill.optim.decay = 5.0 multiplies the learning rate")
    config.distill.optim.decay = 0.2
    config.distill.method, config.distill.compare_with = "kd", ("none",)
    (line,) = config_lib.schedule_warnings(config)
    assert "runs the search, but no student of this command reads its alpha" in line
    assert "('kd', 'none')" in line
    config.stages = ("teacher", "distill")
    assert config_lib.schedule_warnings(config) == []


def test_a_weight_decay_far_above_the_recipes_and_a_positive_clamp_are_warned_about():
    config = load_config("cifar100_pair1")
    config.teacher.optim.weight_decay = 5.0  # A typo for 5e-4.
    (line,) = config_lib.schedule_warnings(config)
    assert line.startswith("teacher.optim.weight_decay = 5.0: 10000x the recipes' 5e-4")
    config.teacher.optim.weight_decay = 1e-3  # Large, but some recipes' setting: no warning.
    assert config_lib.schedule_warnings(config) == []
    config.features.clamp_min = 1.0  # A sign slip for -1.
    (line,) = config_lib.schedule_warnings(config)
    assert "features.clamp_min = 1.0 raises every teacher value below 1.0" in line
    assert "(clamp_min = -1.0; None: no clamp)" in line
    config.features.clamp_min = None
    assert config_lib.schedule_warnings(config) == []


def test_ft_rate_that_leaves_the_factor_no_channel_is_refused():
    """FT's factor has int(C * ft_rate) channels of the teacher's last group (256 for wrn_28_4):
    0 failed at FT's helper init after the teacher trained; now the rate and its minimum are
    named, for FT as the method or among compare_with, whenever a distill stage runs."""
    config = load_config("cifar100_pair1")
    config.distill.method = "ft"
    config.baselines.ft_rate = 0.001
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, device_count=1)
    message = str(e.value)
    assert "baselines.ft_rate = 0.001" in message and "int(256 * 0.001) = 0" in message
    assert "teacher.model = 'wrn_28_4'" in message and ">= 0.00391" in message, message
    config.distill.method, config.distill.compare_with = "dfa", ("kd", "ft")
    with pytest.raises(config_lib.ConfigError, match=r"ft_rate >= 0\.00391"):
        config_lib.validate(config, device_count=1)
    config.baselines.ft_rate = 0.00391  # The named minimum keeps one channel.
    config_lib.validate(config, device_count=1)
    config.baselines.ft_rate = 0.001
    config.stages = ("teacher", "search")  # No student trains: nothing to refuse.
    config_lib.validate(config, device_count=1)
    config.stages, config.distill.compare_with = ("teacher", "search", "distill"), ("kd",)
    config_lib.validate(config, device_count=1)  # No FT student.


def test_an_alpha_file_no_student_reads_is_refused(tmp_path):
    """Setting distill.alpha_file alone looks like DFA-T but distils with this run's search."""
    config = load_config("cifar100_pair1")
    config.distill.alpha_file = write_alpha_file(tmp_path / "alpha.json", config.teacher.model)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, device_count=1)
    assert (
        f"distill.alpha_file = {config.distill.alpha_file!r} is set but no student reads it; add"
        " --config.distill.aggregation=file (or 'file' to distill.compare_with), or unset it."
    ) in str(e.value)
    config.distill.method = "kd"  # The aggregation is DFA's: a KD student reads no alpha.
    config.distill.aggregation = "file"
    with pytest.raises(config_lib.ConfigError, match="with --config.distill.method=dfa"):
        config_lib.validate(config, device_count=1)
    config.distill.method = "dfa"
    config_lib.validate(config, device_count=1)
    config.distill.aggregation, config.distill.compare_with = "dfa", ("file",)
    config_lib.validate(config, device_count=1)
    config.distill.compare_with = ()
    config.stages = ("teacher", "search")  # No distill stage: nothing reads or misses it.
    config_lib.validate(config, device_count=1)


def test_the_authors_preset_accepts_its_own_values():
    """A field the 'authors' preset sets may repeat the preset's value; another is refused."""
    config = load_config("cifar100_teacher")
    config.data.dataset = "cifar10"  # The authors' KD temperature is 16 off CIFAR-100.
    config.baselines.preset = "authors"
    config.baselines.kd_temperature, config.baselines.kd_weight = 16.0, 0.2
    config_lib.validate(config, device_count=1)
    config.baselines.kd_temperature = 8.0
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, device_count=1)
    message = str(e.value)
    assert "baselines.kd_temperature = 8.0 is set" in message and "sets it to 16.0" in message
    assert "drop one of the two" in message and message.count("\n  - ") == 1, message


@pytest.mark.parametrize(
    "path, value, fix",
    [
        ("stages", ("teacher,search",), """--config.stages='("teacher","search")'"""),
        ("stages", ("(teacher,search)",), """--config.stages='("teacher","search")'"""),
        (
            "distill.compare_with",
            ("last,none",),
            """--config.distill.compare_with='("last","none")'""",
        ),
        ("distill.compare_with", ("(kd)",), """--config.distill.compare_with='("kd",)'"""),
    ],
)
def test_a_comma_list_for_a_tuple_field_says_how_to_give_a_tuple(path, value, fix):
    """`--config.stages=teacher,search` is the one name 'teacher,search' (and the shell eats the
    quotes of `--config.stages=(teacher,search)`): the message shows the tuple syntax."""
    config = load_config("cifar100_pair1")
    _mutate(path, value)(config)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, device_count=1)
    message = str(e.value)
    assert f"{path}" in message and f"give a tuple: {fix}" in message, message
    _mutate(path, ("teacher", "nope") if path == "stages" else ("nope",))(config)
    with pytest.raises(config_lib.ConfigError) as e:  # A plain typo gets no tuple advice.
        config_lib.validate(config, device_count=1)
    assert "give a tuple" not in str(e.value)


def test_a_train_cap_whose_search_split_cannot_fill_a_batch_is_refused():
    """The cap's 7:3 split (as `splits.stratified_split` makes it) must fill search.batch_size on
    both sides; the message names the three fields a user controls."""
    config = load_config("demo")  # Digits, 10 classes, search.batch_size 64.
    config.data.max_train_examples = 100  # 7:3 -> 70 / 30.
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, device_count=1)
    message = str(e.value)
    assert "data.max_train_examples = 100 with data.search_val_fraction = 0.3" in message
    assert "search's val split 30 examples" in message and "search.batch_size = 64" in message
    assert "raise data.search_val_fraction" in message and message.count("\n  - ") == 1
    config.data.search_val_fraction = 0.7  # 30 / 70: now the train side is short.
    with pytest.raises(config_lib.ConfigError, match="train split 30 .* lower data.search_val"):
        config_lib.validate(config, device_count=1)
    config.data.max_train_examples, config.data.search_val_fraction = 220, 0.3  # 150 / 70.
    config_lib.validate(config, device_count=1)
    config.data.max_train_examples = 100
    config.stages = ("teacher", "distill")  # No search: the 7:3 split is never made.
    config.distill.aggregation, config.distill.compare_with = "last", ()
    config_lib.validate(config, device_count=1)


def test_the_batch_messages_count_devices_in_words():
    config = load_config("cifar100_pair1")
    config.search.batch_size = 0
    config.teacher.optim.batch_size = 3
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, device_count=2)
    message = str(e.value)
    assert "search.batch_size = 0: must be positive." in message
    assert "teacher.optim.batch_size = 3 is not divisible by the 2 devices" in message
    assert config_lib._devices(1) == "1 device"  # pylint: disable=protected-access


def test_a_teacher_whose_group_maps_differ_in_shape_is_refused_for_aggregation():
    """RepDistiller's MobileNetV2 widens channels inside a group: no weighted sum of a group's
    maps exists, so the search (and every DFA aggregation) is refused before the teacher trains
    (it failed at the search's first step); as a KD teacher it is fine."""
    config = load_config("demo")
    config.teacher.model = config.student.model = "MobileNetV2"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"teacher.model = 'MobileNetV2' cannot be aggregated: its group 1's maps are"
        r" 16x16x8 and 16x16x12 \(H x W x C\)",
    ):
        config_lib.validate(config, device_count=1)
    config.stages, config.distill.method, config.distill.compare_with = (
        ("teacher", "distill"),
        "kd",
        (),
    )
    config_lib.validate(config, device_count=1)


def test_a_dfa_t_config_trains_its_teacher_before_any_alpha_file_exists(tmp_path):
    """The 'file' aggregation's alpha.json is read by the distillation: a teacher-only command
    of a DFA-T config (its alpha.json still being searched elsewhere) is not refused for it."""
    config = load_config("cinic10_dfa_t")
    config.data.path = str(tmp_path)
    config.distill.alpha_file = None
    config.stages = ("teacher",)
    config_lib.validate(config, device_count=1)
    config.stages = ("teacher", "distill")
    with pytest.raises(config_lib.ConfigError, match="distill.alpha_file is unset"):
        config_lib.validate(config, device_count=1)


def test_a_teacher_of_a_run_on_other_inputs_is_warned_about(tmp_path):
    """A teacher.checkpoint beside its run's config.json that trained on another dataset (of the
    same class count: shapes fit) or other normalisation statistics gets a warning."""
    run = tmp_path / "digits_run"
    (run / "teacher" / "best_variables").mkdir(parents=True)
    theirs = load_config("demo")  # digits, 10 classes.
    (run / "config.json").write_text(json.dumps(theirs.to_dict()))
    config = load_config("demo")
    for given in (run, run / "teacher", run / "teacher" / "best_variables"):
        config.teacher.checkpoint = str(given)
        assert config_lib.teacher_data_warnings(config) == []
    config.data.dataset = "cifar10"
    (warning,) = config_lib.teacher_data_warnings(config)
    assert (
        "was trained on data.dataset = 'digits'" in warning and "this run's is 'cifar10'" in warning
    )
    config.data.dataset = "digits"
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    (warning,) = config_lib.teacher_data_warnings(config)
    assert "set data.mean and data.std to the teacher's" in warning
    config.teacher.checkpoint = str(tmp_path / "elsewhere" / "variables")  # No run beside it.
    assert config_lib.teacher_data_warnings(config) == []


def test_normalisation_is_the_peers():
    """CIFAR's per-channel statistics as overhaul-distillation and the authors normalise
    (`transforms.Normalize(np.array([125.3, 123.0, 113.9]) / 255, np.array([63.0, 62.1, 66.7]) /
    255)`), CINIC-10's as its authors publish them (BayesWatch/cinic-10's README)."""
    from dfa_jax.data import DATASETS  # pylint: disable=g-import-not-at-top

    for name in ("cifar100", "cifar10"):
        np.testing.assert_allclose(DATASETS[name].mean, (0.49137, 0.48235, 0.44667), atol=1e-5)
        np.testing.assert_allclose(DATASETS[name].std, (0.24706, 0.24353, 0.26157), atol=1e-5)
    np.testing.assert_allclose(
        DATASETS["cinic10"].mean, (0.47889522, 0.47227842, 0.43047404), atol=1e-4
    )
    np.testing.assert_allclose(
        DATASETS["cinic10"].std, (0.24205776, 0.23828046, 0.25874835), atol=1e-4
    )


@pytest.mark.parametrize(
    "field, refused, accepted",
    [("seed", 2**32, 2**32 - 1), ("data.pad", 32, 31), ("teacher.optim.weight_decay", -1e-4, 0.0)],
)
def test_validation_bounds_are_exact(field, refused, accepted):
    """The edge of each range: a seed must fit 32 bits, a pad must leave part of a 32-pixel image,
    weight decay may be 0 (no decay) but not negative."""

    def with_value(value):
        config = load_config("cifar100_teacher")
        *parents, leaf = field.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
        return config

    with pytest.raises(config_lib.ConfigError, match=re.escape(f"{field} = {refused}")):
        config_lib.validate(with_value(refused), device_count=2)
    config_lib.validate(with_value(accepted), device_count=2)


def test_baseline_settings_are_repdistillers_and_beta_starts_on_the_last_map():
    """The defaults every baseline row runs with, as RepDistiller's `train_student.py` and
    README run them (KD: --kd_T 4 -r 0.1 -a 0.9; --init_epochs 30 for FT and AB; AB's margin 1.0,
    FT's paraphraser rate k 0.5), overhaul's teacher in train mode for Margin, DFA's own
    aggregation by default, and beta's start giving the last map the alpha the comment promises."""
    config = config_lib.base_config()
    base = config.baselines
    assert (base.kd_temperature, base.kd_ce_weight, base.kd_weight) == (4.0, 0.1, 0.9)
    assert (base.ft_pretrain_epochs, base.ab_init_epochs) == (30, 30)
    assert (base.ab_margin, base.ft_rate, base.margin_teacher_bn) == (1.0, 0.5, "batch")
    assert config.distill.aggregation == "dfa"
    for maps, alpha_last in ((2, 0.982), (4, 0.948), (8, 0.886)):
        logits = np.zeros(maps)
        logits[-1] = config.search.init_last_logit
        alpha = np.exp(logits) / np.exp(logits).sum()
        assert round(float(alpha[-1]), 3) == alpha_last, maps


def test_a_teacher_map_must_pool_to_the_students_size_by_a_whole_factor(monkeypatch):
    """A teacher with group ends at (32, 16, 8) teaches students at (32, 16, 8) and (16, 8, 4)
    (pooled by 2); its map at 16 pools to neither 12 nor 32 by a whole factor: refused."""
    sizes = {"t": (32, 16, 8), "same": (32, 16, 8), "half": (16, 8, 4), "odd": (32, 12, 8)}
    sizes["big"] = (32, 32, 8)
    monkeypatch.setattr(config_lib, "group_sizes", lambda name: sizes[name])
    assert config_lib._pair_size_problems("t", "same") == []
    assert config_lib._pair_size_problems("t", "half") == []
    for student in ("odd", "big"):
        (problem,) = config_lib._pair_size_problems("t", student)
        assert "whole multiple" in problem, student


def test_every_pair_distills_dfa_from_its_own_search():
    """Each shipped pair (Tables 2 and 4, RepDistiller's benchmark) trains a DFA student on the
    aggregation its own search finds (cinic10_pair sets it itself, beside base_config's)."""
    pairs = [f"cifar100_pair{i}" for i in (1, 2, 3)] + [f"cinic10_pair{i}" for i in (1, 2, 3)]
    for name in pairs + [name for name in SHIPPED if name.startswith("crd" + os.sep)]:
        config = load_config(name)
        assert (config.distill.method, config.distill.aggregation) == ("dfa", "dfa"), name
        assert config.stages == ("teacher", "search", "distill"), name


def test_the_default_keeps_a_checkpoint_to_fall_back_on():
    """A damaged newest checkpoint falls back to the one before it (checkpointing.py): the
    default must keep two, or a corrupted save restarts the stage from step 0."""
    assert config_lib.base_config().checkpoints_to_keep == 2


def test_a_cap_one_example_short_of_a_batch_is_refused():
    """A cap of exactly one teacher batch (128) trains; 127 cannot fill one."""
    config = load_config("cifar100_teacher")
    config.data.max_train_examples = 128
    config_lib.validate(config, device_count=2)
    config.data.max_train_examples = 127
    with pytest.raises(config_lib.ConfigError, match="cannot fill one batch of teacher.optim"):
        config_lib.validate(config, device_count=2)


def test_a_search_split_one_example_short_of_a_batch_is_refused():
    """100 digits capped 7:3 give 70 / 30: a search batch of 30 fits both sides, 31 does not."""
    config = load_config("demo")
    config.data.max_train_examples = 100
    config.search.batch_size = 30
    config_lib.validate(config, device_count=1)
    config.search.batch_size = 31
    with pytest.raises(config_lib.ConfigError, match="search's val split 30 examples"):
        config_lib.validate(config, device_count=1)
