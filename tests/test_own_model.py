"""A model of the user's own (docs/design.md, "Bringing your own model"): the documented
example, read from that page, keeps the feature contract, is accepted by `validate` and trains a
student; a model that breaks the contract is refused by `validate`, naming what it lacks."""

import dataclasses
import os
import re
import sys
import types

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import config_lib
from dfa_jax import distill
from dfa_jax import errors
from dfa_jax import inputs
from dfa_jax import models
from dfa_jax import parallel
from dfa_jax import teacher as teacher_lib
from dfa_jax.data import loader
from dfa_jax.data import sources
from dfa_jax.models import contract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _documented_module() -> str:
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        section = f.read().split("## Bringing your own model", 1)[1].split("\n## ", 1)[0]
    (source,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return source


@pytest.fixture
def my_models(monkeypatch):
    """The documented module, imported as `my_models` (registering its family) for one test."""
    monkeypatch.setattr(models, "FAMILIES", models.FAMILIES)  # Restored after the test.
    monkeypatch.setattr(models, "MODEL_NAMES", models.MODEL_NAMES)
    module = types.ModuleType("my_models")
    exec(compile(_documented_module(), "docs/design.md", "exec"), module.__dict__)  # noqa: S102
    monkeypatch.setitem(sys.modules, "my_models", module)
    return module


def _config(teacher="small_cnn_3", student="small_cnn_1"):
    config = config_lib.tiny(config_lib.base_config())
    config.data.dataset, config.data.source = "digits", "bundled"
    config.stages = ("teacher", "distill")
    config.teacher.model, config.student.model = teacher, student
    config.distill.aggregation = "average"
    return config


def test_the_documented_model_keeps_the_contract_and_validates(my_models):
    assert models.family_of("small_cnn_3").module is my_models.SmallCNN
    assert "small_cnn_3" in models.MODEL_NAMES
    teacher = models.get_model("small_cnn_3", 10)
    assert isinstance(teacher, models.FeatureModel)
    assert contract.problems(teacher) == [] and contract.problems(my_models.SmallCNN(1)) == []
    config_lib.validate(_config(), device_count=2)
    # Another family's student: the group sizes agree (32, 16, 8), so the pair is accepted.
    config_lib.validate(_config(teacher="wrn_16_1"), device_count=2)
    with pytest.raises(ValueError, match="already registered"):
        models.register_family(models.family_of("small_cnn_1"))


def test_the_documented_model_stops_and_resumes_at_its_boundaries(my_models):
    """What the contract's shape check cannot see, checked by value as the page advises: a
    forward stopped at group g returns the boundary map the full forward sowed, and one resumed
    from it gives the full forward's logits."""
    import jax

    model = my_models.SmallCNN(2)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), images)
    logits, sown = model.apply(variables, images, mutable=[models.FEATURES])
    for g, names in enumerate(model.feature_groups(), start=1):
        boundary = model.apply(variables, images, stop_group=g)
        np.testing.assert_allclose(boundary, sown[models.FEATURES][names[-1]][0], atol=1e-6)
        resumed = model.apply(variables, boundary, start_group=g)
        np.testing.assert_allclose(resumed, logits, atol=1e-5)


def test_a_model_that_breaks_the_contract_is_refused_naming_what_it_lacks(my_models):
    class NeverSowsItsRawEnds(my_models.SmallCNN):
        def raw_group_ends(self):
            return ("g1_out", "g2_end", "g3_out")

    class StopsAtTheWrongMap(my_models.SmallCNN):
        def feature_groups(self):  # Group 2 names a map of group 1 as its boundary.
            return (("g1_b1", "g1_b2"), ("g1_b2",), ("g3_b1", "g3_b2"))

    class NoGroups(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

    (problem,) = contract.problems(NeverSowsItsRawEnds(2))
    assert "names the map 'g2_end' but never sows it" in problem
    # The fix it names passes the next check (`self.sow` would sow at init too).
    assert "models.sow_feature(self, 'g2_end', x)" in problem
    (problem,) = contract.problems(StopsAtTheWrongMap(2))
    assert "__call__(x, stop_group=2) returns shape (2, 16, 16, 32), not group 2's" in problem
    assert any("num_groups" in p for p in contract.problems(NoGroups()))
    assert any("'start_group'" in p for p in contract.problems(NoGroups()))

    models.register_family(
        models.Family(
            name="Broken",
            module=NeverSowsItsRawEnds,
            parse=lambda name: {"blocks": 2} if name == "broken_cnn" else None,
            presets=("broken_cnn",),
            pattern=None,
            has_stem=False,
            group_end_bns=None,
            head=("head",),
            final_bn=None,
        )
    )
    with pytest.raises(errors.ConfigError) as raised:
        config_lib.validate(_config(student="broken_cnn"), device_count=2)
    assert "student.model = 'broken_cnn': NeverSowsItsRawEnds names the map 'g2_end'" in str(
        raised.value
    )

    # A family that declares a stem its models do not have: refused at once, not in the
    # distillation after the teacher and the search.
    models.register_family(
        dataclasses.replace(
            models.family_of("small_cnn_1"),
            name="StemlessWithStem",
            module=type("StemlessWithStem", (my_models.SmallCNN,), {}),
            parse=lambda name: {"blocks": 1} if name == "stemless_cnn" else None,
            presets=("stemless_cnn",),
            pattern=None,
            has_stem=True,
        )
    )
    # A module of a subclass belongs to its own family, not to its base class's.
    stemless = models.family_of("stemless_cnn").module(blocks=1)
    assert models.family_of(stemless).name == "StemlessWithStem"
    assert models.family_of(my_models.SmallCNN(blocks=1)).name != "StemlessWithStem"
    with pytest.raises(errors.ConfigError, match=r"has_stem=True, but .*stem_features\(\) returns"):
        config_lib.validate(_config(student="stemless_cnn"), device_count=2)


def test_a_student_of_the_documented_model_distills_from_its_teacher(my_models):
    """DFA's Average aggregation over the teacher's three maps per group and AT on the raw group
    ends: both students step on the real distill path and their losses fall."""
    config = _config()
    config.data.dataset = "cifar10"
    config.distill.compare_with = ("at",)
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
    assert [len(names) for names in pair.t_groups] == [3, 3, 3]
    teacher_vars = teacher_lib.init_variables(pair.teacher, 1, mesh)
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    for label in ("average", "at"):
        stage = distill.build_stage(config, mesh, data, "unused", teacher_vars, [(label, 0)])
        state, losses = stage.state, []
        for _ in range(6):
            state, metrics = stage.step_fn(state, batch, None, teacher_vars)
            losses.append(float(metrics["loss"]))
        assert np.isfinite(losses).all() and losses[-1] < losses[0], (label, losses)


def test_a_model_on_group_names_keeps_the_contract_with_the_built_in_names(my_models):
    """`models.GroupNames` (docs/design.md): the documented model with its five naming members
    replaced by `maps_per_group` names the same maps and keeps the contract; `has_stem` and
    `raw_is_pre` change what it names beside the groups."""

    class OnGroupNames(models.GroupNames, nn.Module):
        blocks: int = 2
        num_classes: int = 10
        dtype: jnp.dtype = jnp.float32
        has_stem = False

        @property
        def maps_per_group(self):
            return (self.blocks,) * 3

        __call__ = my_models.SmallCNN.__call__

    for blocks in (1, 3):
        written_out, derived = my_models.SmallCNN(blocks), OnGroupNames(blocks)
        for method in ("feature_groups", "raw_group_ends", "stem_features", "extra_feature_names"):
            assert getattr(derived, method)() == getattr(written_out, method)(), method
        assert derived.num_groups == written_out.num_groups == 3
        assert isinstance(derived, models.FeatureModel)
        assert contract.problems(derived) == []
    assert OnGroupNames(2).feature_groups()[1] == ("g2_b1", "g2_b2")

    class WithStem(OnGroupNames):
        has_stem = True

    class RawIsPre(OnGroupNames):
        raw_is_pre = True

    assert WithStem(2).stem_features() == ("stem", "stem_out")
    assert WithStem(2).extra_feature_names() == ("stem", "stem_out", "g1_out", "g2_out", "g3_out")
    assert RawIsPre(2).raw_group_ends() == ("g1_b2", "g2_b2", "g3_b2")
    assert RawIsPre(2).extra_feature_names() == ()
    # The contract check catches a naming that the forward does not keep: this forward sows no
    # stem.
    assert any("'stem'" in p for p in contract.problems(WithStem(2)))


def test_a_loss_asking_for_an_unknown_map_kind_is_told_so():
    """`step.student_maps('pre-relu')` (a typo) read the raw maps without a word."""
    from dfa_jax.methods import common

    model = models.get_model("wrn_10_1", 10)
    assert common.positions(model, "pre_relu") == [g[-1] for g in model.feature_groups()]
    with pytest.raises(ValueError, match="map kind 'pre-relu': use 'pre_relu' or 'raw'"):
        common.positions(model, "pre-relu")


class _TwoConvs(models.GroupNames, nn.Module):
    """Two groups of one conv each (32x32, then 16x16), each broken in one way when asked."""

    sow_twice: bool = False
    sow_at_init: bool = False
    mixed_group: bool = False
    resume_without_logits: bool = False
    maps_per_group = (1, 1)
    has_stem = False
    raw_is_pre = True

    def feature_groups(self):
        if self.mixed_group:  # Group 1 also names group 2's 16x16 map.
            return (("g1_b1", "g2_b1"), ("g2_b1",))
        return super().feature_groups()

    def _sow(self, name, x):
        if self.sow_at_init:
            self.sow(models.FEATURES, name, x)
        else:
            models.sow_feature(self, name, x)

    @nn.compact
    def __call__(self, x, train=False, start_group=0, stop_group=None):
        if start_group == 0:
            x = nn.Conv(4, (3, 3), name="conv1")(x)
            self._sow("g1_b1", x)
            if self.sow_twice:
                self._sow("g1_b1", x)
            if stop_group == 1:
                return x
        x = nn.Conv(4, (3, 3), strides=2, name="conv2")(nn.relu(x))
        self._sow("g2_b1", x)
        if stop_group == 2 or (start_group and self.resume_without_logits):
            return x
        return nn.Dense(3, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))


def test_the_contract_names_a_double_sow_a_sow_at_init_mixed_shapes_and_no_logits_on_resume():
    """Each way a model breaks the contract gets its own message: a map sown twice per forward,
    maps sown during init, a group whose maps differ in shape, and a forward resumed from a
    boundary that does not end in the logits."""
    assert contract.problems(_TwoConvs()) == []
    (problem,) = contract.problems(_TwoConvs(sow_twice=True))
    assert "sows 'g1_b1' 2 times per forward" in problem
    (problem,) = contract.problems(_TwoConvs(sow_at_init=True))
    assert "sows its maps during init too" in problem
    (problem,) = contract.problems(_TwoConvs(mixed_group=True))
    assert "group 1 maps ('g1_b1', 'g2_b1') have shapes" in problem
    assert "share one shape" in problem
    (problem,) = contract.problems(_TwoConvs(resume_without_logits=True))
    assert "start_group=1) returns shape (2, 16, 16, 4), not the logits'" in problem
