"""The registries: methods (`method_registry`), model families (`models.FAMILIES`) and data
sources (`Source.check`). A method added as docs/design.md's "Adding a method" shows (its code
read from that page) is accepted by the config, trains and gets its report column."""

import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import config_lib
from dfa_jax import distill
from dfa_jax import errors
from dfa_jax import inputs
from dfa_jax import method_registry
from dfa_jax import methods
from dfa_jax import models
from dfa_jax import parallel
from dfa_jax import report
from dfa_jax import teacher as teacher_lib
from dfa_jax.data import loader
from dfa_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _documented_method() -> tuple[str, str]:
    """docs/design.md's "Adding a method": (the module's source, the registry entry)."""
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        section = f.read().split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    module, entry = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return module, entry


@pytest.fixture
def logit_l2(monkeypatch):
    """The documented method, its module installed as `dfa_jax.methods.logit_l2` and its entry
    registered, for the test only."""
    source, entry = _documented_method()
    module = types.ModuleType("dfa_jax.methods.logit_l2")
    exec(compile(source, "docs/design.md", "exec"), module.__dict__)  # noqa: S102 (the docs)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    method = eval(entry.strip().rstrip(","), {"Method": method_registry.Method})
    method_registry.register(method)
    yield method
    method_registry.unregister(method.name)


def _tiny_config(**overrides):
    config = config_lib.tiny(config_lib.base_config())
    config.data.dataset, config.data.source = "digits", "bundled"
    config.stages = ("teacher", "distill")
    config.teacher.model = "wrn_10_1"
    config.distill.method = "none"
    for path, value in overrides.items():
        section, field = path.split(".")
        config[section][field] = value
    return config


# ------------------------------------------------------------------------------------- methods


def test_every_method_has_a_column_its_labels_and_an_implementation():
    # A column in Table 2, or in the table of the later logit baselines (which the paper lacks).
    tables = {2: dict(report.TABLE2_COLUMNS), report.LOGITS: dict(report.logit_columns())}
    assert config_lib.METHODS == tuple(method_registry.REGISTRY)
    assert config_lib.METHODS[-1] == "dfa"  # Ours last, as in the paper's Table 2.
    for name, method in method_registry.REGISTRY.items():
        assert tables[method.table][name] == method.column and method.column
        assert all(method_registry.method_of(label) == name for label in method.labels)
        implementation = method.load()
        assert isinstance(implementation, methods.Implementation), name
        assert implementation.check(config_lib.base_config()) == [], name
    assert method_registry.labels() == config_lib.METHODS[:-1] + config_lib.AGGREGATIONS
    # The methods with a first stage of their own train alone; the rest share a step.
    alone = {n for n in config_lib.METHODS if methods.implementation(n).trains_alone}
    assert alone == {"ft", "ab"}


def test_a_taken_name_or_label_is_refused():
    for name in ("kd", "last"):
        with pytest.raises(ValueError, match="already registered"):
            method_registry.register(method_registry.Method(name, "X", "m:X"))
    with pytest.raises(ValueError, match="module:attribute"):
        method_registry.register(method_registry.Method("new", "New", "no_attribute"))


def test_a_registered_method_reaches_the_config_and_the_report(logit_l2):
    assert "logit_l2" in config_lib.METHODS and "logit_l2" in method_registry.labels()
    assert ("logit_l2", "Logit L2") in report.TABLE2_COLUMNS
    assert config_lib.base_config().baselines.logit_l2_weight == 1.0
    config_lib.validate(_tiny_config(**{"distill.method": "logit_l2"}), device_count=2)
    config_lib.validate(_tiny_config(**{"distill.compare_with": ("logit_l2",)}), device_count=2)
    bad = _tiny_config(**{"distill.method": "logit_l2", "baselines.logit_l2_weight": -1.0})
    with pytest.raises(errors.ConfigError, match=r"baselines.logit_l2_weight = -1.0: must be >= 0"):
        config_lib.validate(bad, device_count=2)
    # A workdir written before the method's field existed resumes: it held the default.
    saved = config_lib.base_config().to_dict()
    del saved["baselines"]["logit_l2_weight"]
    assert config_lib.changed_fields(saved, config_lib.base_config().to_dict()) == []


def test_a_registered_method_trains_through_build_stage(logit_l2):
    """The documented method's students start, step and learn on the real distill path."""
    config = _tiny_config(**{"distill.method": "logit_l2"})
    config.data.dataset = "cifar10"
    config.distill.optim.schedule, config.distill.optim.lr = "constant", 0.05
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    data = inputs.RunData(
        info=sources.DATASETS["cifar10"],
        train=loader.ArrayExamples(images, labels),
        test=loader.ArrayExamples(images[:8], labels[:8]),
    )
    pair = distill.pair_of(config, data)
    teacher_vars = teacher_lib.init_variables(pair.teacher, 1, mesh)
    stage = distill.build_stage(config, mesh, data, "unused", teacher_vars, [("logit_l2", 0)])
    batch = {"image": jnp.asarray(images[:8]), "label": jnp.asarray(labels[:8])}
    state, losses = stage.state, []
    for _ in range(5):
        state, metrics = stage.step_fn(state, batch, None, teacher_vars)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert float(metrics["logit_l2_loss"]) > 0.0
    # Its loss is the documented one: CE + weight * mean((z_s - z_t)^2) on the student.
    loss_fn = methods.make_loss_fn("logit_l2", pair, config)
    floats = {**batch, "image": batch["image"].astype(jnp.float32) / 255}
    loss, (_, parts) = jax.jit(loss_fn)(
        state.params, state.batch_stats, None, floats, None, teacher_vars
    )
    assert float(loss) == pytest.approx(float(parts["ce_loss"] + parts["logit_l2_loss"]))


# ------------------------------------------------------------------------------ model families


def test_model_families_resolve_names_and_keep_the_feature_contract():
    assert models.MODEL_NAMES == tuple(n for f in models.FAMILIES for n in f.presets)
    smallest = {
        models.WRN: "wrn_10_1",
        models.SHUFFLENET_V2: "shufflenet_v2_0.5",
        models.RESNET: "resnet8",
        models.VGG: "vgg8",
    }
    for family in models.FAMILIES:
        for name in family.presets + (smallest.get(family, family.presets[0]),):
            assert models.family_of(name) is family and models.is_valid_model_name(name)
            model = models.get_model(name, 10)
            assert isinstance(model, models.FeatureModel), name
            assert models.family_of(model) is family
            assert family.has_stem == (model.stem_features() is not None)
            assert len(model.raw_group_ends()) == len(model.feature_groups()) == model.num_groups
        model = models.get_model(smallest.get(family, family.presets[0]), 10)
        images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
        assert all(head in params for head in family.head)
        assert family.final_bn is None or family.final_bn in family.head
        if family.group_end_bns is not None:  # One BN per group end: Margin's margins.
            bns = family.group_end_bns(model, params, False)
            shapes = methods.Pair(model, model).t_shapes()
            assert [bn["scale"].shape[0] for bn in bns] == [s[-1] for s in shapes]
    for bad in ("resnet_50", "wrn_11_2", "shufflenet_v2_3.0"):
        assert models.family_of(bad) is None
        assert f"student.model = {bad!r} is unknown" in models.name_problem("student.model", bad)
    assert models.name_problem("student.model", "wrn_10_1") is None
    assert not isinstance(object(), models.FeatureModel)


# ---------------------------------------------------------------------------------- data sources


@pytest.mark.parametrize(
    "source, fields",
    [
        ("tfds", {"data.dataset": "cinic10", "data.test_split": "valid"}),
        ("image_folder", {"data.path": None}),
        ("npz", {"data.path": "/nowhere/at/all"}),
        ("bundled", {"data.dataset": "cifar10", "data.val_split": "valid"}),
    ],
)
def test_each_source_checks_its_own_fields_and_validate_reports_them(source, fields):
    config = _tiny_config(**{"data.source": source, "data.dataset": "cifar10"})
    if source == "tfds":  # A good config for the source first: no problems.
        assert sources.SOURCE_CLASSES[source].check(config.data) == []
    config = _tiny_config(**{"data.source": source, "data.dataset": "cifar10", **fields})
    problems = sources.SOURCE_CLASSES[source].check(config.data)
    assert problems and all(
        any(f in p for f in ("data.path", "data.dataset", "split")) for p in problems
    )
    with pytest.raises(errors.ConfigError) as raised:
        config_lib.validate(config, device_count=2)
    assert all(problem in str(raised.value) for problem in problems)
    assert sources.SOURCE_CLASSES["bundled"].check(_tiny_config().data) == []
