"""Model families: CIFAR Wide ResNets, ShuffleNetV2 and RepDistiller's CIFAR networks, with
pre-ReLU features sown by name.

Every model keeps the feature contract `FeatureModel`:
  `__call__(x, train=False, start_group=0, stop_group=None)` -> float32 logits, or a group
    boundary tensor when stop_group is set; start_group resumes from an injected boundary;
  `feature_groups()` -> per group, the names of its candidate maps (last = the boundary);
  `extra_feature_names()` -> sown names outside every group;
  `stem_features()` -> (pre-ReLU, raw) sown names of a stem outside every group, or None;
  `raw_group_ends()` -> per group, the sown name of its raw output (before any BN that consumes
    it; what RepDistiller's networks return as features for AT, FitNets, SP and FT);
  `num_groups` (property).
Features are sown into the flat top-level collection FEATURES: `mutated[FEATURES][name]` is a
1-tuple holding the map, in the module's compute dtype. The built-in models name their maps alike
and take the naming methods from how many maps each group has (`GroupNames`).

A `Family` reads its model names, builds its models and says what its maps allow beyond the
contract (a stem outside the groups; one BatchNorm producing each group end; which parameters
sit after the feature body). `FAMILIES` lists them; `family_of` finds a model's or a name's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax.numpy as jnp

from dfa_jax.models import cifar_mobile, cifar_resnet, cifar_vgg
from dfa_jax.models.cifar_resnet import CifarResNet
from dfa_jax.models.cifar_vgg import CifarVGG
from dfa_jax.models.connectors import Connector, resize_problem
from dfa_jax.models.layers import FEATURES, sow_feature
from dfa_jax.models.naming import GroupNames
from dfa_jax.models.shufflenet_v2 import WIDTHS as SHUFFLENET_V2_WIDTHS
from dfa_jax.models.shufflenet_v2 import ShuffleNetV2
from dfa_jax.models.wide_resnet import WideResNet

__all__ = [
    "FAMILIES",
    "FEATURES",
    "MODEL_NAMES",
    "CifarResNet",
    "CifarVGG",
    "Connector",
    "Family",
    "FeatureModel",
    "GroupNames",
    "ShuffleNetV2",
    "WideResNet",
    "family_of",
    "get_model",
    "is_valid_model_name",
    "name_problem",
    "register_family",
    "resize_problem",
    "sow_feature",
]


@runtime_checkable
class FeatureModel(Protocol):
    """The feature contract of every model (see the module docstring)."""

    @property
    def num_groups(self) -> int: ...

    def feature_groups(self) -> tuple[tuple[str, ...], ...]: ...

    def extra_feature_names(self) -> tuple[str, ...]: ...

    def stem_features(self) -> tuple[str, str] | None: ...

    def raw_group_ends(self) -> tuple[str, ...]: ...

    def __call__(self, x, train: bool = False, start_group: int = 0, stop_group: int | None = None):
        """Runs groups start_group+1..stop_group.

        Args:
          x: images [B, H, W, 3] when start_group == 0, else the group-`start_group` boundary
            tensor (the pre-ReLU map sown as its last feature).
          train: use and update batch statistics.
          start_group: 0, or the group whose boundary `x` is.
          stop_group: None for logits, or the group whose boundary to return.

        Returns:
          float32 logits [B, num_classes], or the group-`stop_group` boundary tensor.
        """


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its names, its models, and what its maps allow beyond the contract."""

    name: str  # For messages: 'WRN'.
    module: type  # Its Linen class.
    parse: Callable[[str], dict | None]  # A model name -> the module's fields, or None.
    presets: tuple[str, ...]  # Its names among MODEL_NAMES (the paper's).
    pattern: str | None  # The names it reads beyond its presets, for messages.
    has_stem: bool  # A stem outside its groups (`stem_features()` is not None).
    # (model, params, with_stem) -> per group end (after the stem when `with_stem`), the params
    # of the BatchNorm that produces it (for RepDistiller's MobileNetV2 and ResNet50, the one
    # their `get_bn_before_relu()` names: a residual branch's last); None where none does.
    group_end_bns: Callable[[Any, dict, bool], list[dict]] | None
    # Top-level parameters after the feature body (RepDistiller's `get_feat_modules` leaves
    # them out), and which of them, if any, is the BatchNorm producing the last group end.
    head: tuple[str, ...]
    final_bn: str | None

    def build(self, name: str, num_classes: int, dtype=jnp.float32) -> nn.Module:
        return self.module(**self.parse(name), num_classes=num_classes, dtype=dtype)


_WRN_RE = re.compile(r"wrn_(\d+)_(\d+)")


def _wrn_fields(name: str) -> dict | None:
    """{depth, width} for a valid 'wrn_{depth}_{width}' name, else None."""
    match = _WRN_RE.fullmatch(name)
    if match is None:
        return None
    depth, width = int(match[1]), int(match[2])
    if depth < 10 or (depth - 4) % 6 or width < 1:
        return None
    return {"depth": depth, "width": width}


def _wrn_group_end_bns(model, params: dict, with_stem: bool) -> list[dict]:
    """The consumer BNs: the next group's first bn1 (block1_layer0's for the stem), then bn1."""
    first = 0 if with_stem else 1
    bns = [params[f"block{i + 1}_layer0"]["bn1"] for i in range(first, model.num_groups)]
    return bns + [params["bn1"]]


_SHUFFLENET_PREFIX = "shufflenet_v2_"


def _shufflenet_fields(name: str) -> dict | None:
    width = name.removeprefix(_SHUFFLENET_PREFIX) if name.startswith(_SHUFFLENET_PREFIX) else None
    return {"widths": SHUFFLENET_V2_WIDTHS[width]} if width in SHUFFLENET_V2_WIDTHS else None


WRN = Family(
    name="WRN",
    module=WideResNet,
    parse=_wrn_fields,
    presets=("wrn_16_2", "wrn_16_4", "wrn_28_2", "wrn_28_4"),
    pattern="wrn_{depth}_{width} with depth = 6n+4",
    has_stem=True,
    group_end_bns=_wrn_group_end_bns,
    head=("fc", "bn1"),
    final_bn="bn1",
)
SHUFFLENET_V2 = Family(
    name="ShuffleNetV2",
    module=ShuffleNetV2,
    parse=_shufflenet_fields,
    presets=tuple(_SHUFFLENET_PREFIX + width for width in SHUFFLENET_V2_WIDTHS),
    pattern=None,
    has_stem=False,  # Its stem is its group 1.
    group_end_bns=None,  # A unit ends in a concatenation and a channel shuffle.
    head=("fc",),
    final_bn=None,
)
# RepDistiller's CIFAR-100 benchmark networks (CRD, ICLR 2020), with their names.
RESNET = Family(
    name="ResNet",
    module=CifarResNet,
    parse=cifar_resnet.fields,
    presets=tuple(cifar_resnet.PRESETS),
    pattern=None,
    has_stem=True,
    group_end_bns=cifar_resnet.group_end_bns,
    head=("fc",),
    final_bn=None,
)
VGG = Family(
    name="VGG",
    module=CifarVGG,
    parse=cifar_vgg.fields,
    presets=tuple(cifar_vgg.CONFIGS),
    pattern=None,
    has_stem=True,
    group_end_bns=cifar_vgg.group_end_bns,
    head=("classifier",),
    final_bn=None,
)


def _only(name: str) -> Callable[[str], dict | None]:
    return lambda n: {} if n == name else None


# RepDistiller's / mdistiller's MobileNetV2 (mobile_half), ShuffleV1, ShuffleV2, ResNet50: one
# model per family, its stem (conv-BN-ReLU) outside the groups.
CIFAR_MOBILE = {
    name: Family(
        name=name,
        module=module,
        parse=_only(name),
        presets=(name,),
        pattern=None,
        has_stem=True,
        group_end_bns=cifar_mobile.GROUP_END_BNS.get(name),
        head=cifar_mobile.HEADS[name],
        final_bn=None,
    )
    for name, module in cifar_mobile.BUILDERS.items()
}
FAMILIES = (WRN, SHUFFLENET_V2, RESNET, VGG, *CIFAR_MOBILE.values())
BUILTIN_FAMILIES = FAMILIES  # Tested here; a registered family is checked by `validate`.

MODEL_NAMES = tuple(name for family in FAMILIES for name in family.presets)
"""The presets; any wrn_{depth}_{width} with (depth-4) % 6 == 0, depth >= 10 also works."""


def register_family(family: Family) -> Family:
    """Adds a model family of your own (docs/design.md, "Bringing your own model"): its names
    become valid `teacher.model` / `student.model` values, its presets join MODEL_NAMES, and
    `config_lib.validate` checks its models against the feature contract (`contract.problems`).
    """
    global FAMILIES, MODEL_NAMES
    taken = [n for n in family.presets if family_of(n) is not None]
    if any(f.name == family.name for f in FAMILIES) or taken:
        raise ValueError(f"model family {family.name!r}: {taken or family.name} already registered")
    FAMILIES = FAMILIES + (family,)
    MODEL_NAMES = MODEL_NAMES + family.presets
    return family


def family_of(model_or_name) -> Family | None:
    """The family of a model (a Linen module) or of a model name; None if it has none.

    A module belongs to the family of its nearest class in the hierarchy: a registered family
    whose module subclasses a built-in one's is that family, not the built-in.
    """
    if isinstance(model_or_name, str):
        return next((f for f in FAMILIES if f.parse(model_or_name) is not None), None)
    for cls in type(model_or_name).__mro__:
        family = next((f for f in FAMILIES if f.module is cls), None)
        if family is not None:
            return family
    return None


def is_valid_model_name(name: str) -> bool:
    """Whether `get_model(name, ...)` would build a model."""
    return family_of(name) is not None


def name_problem(field: str, name: str) -> str | None:
    """The config problem of model name `name` in `field` ('teacher.model'), or None."""
    if is_valid_model_name(name):
        return None
    patterns = " or ".join(f.pattern for f in FAMILIES if f.pattern)
    return f"{field} = {name!r} is unknown; use one of {MODEL_NAMES} or {patterns}."


def get_model(name: str, num_classes: int, dtype=jnp.float32) -> nn.Module:
    """Builds a model by name.

    Args:
      name: one of MODEL_NAMES, or 'wrn_{depth}_{width}' with (depth-4) % 6 == 0, depth >= 10.
      num_classes: classifier outputs.
      dtype: compute dtype (parameters stay float32; logits are returned as float32).

    Raises:
      ValueError: unknown name; the message lists the valid ones.
    """
    family = family_of(name)
    if family is None:
        raise ValueError(
            f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}, or any "
            "'wrn_{depth}_{width}' with (depth - 4) % 6 == 0 and depth >= 10 (e.g. wrn_10_1)"
        )
    return family.build(name, num_classes, dtype)
