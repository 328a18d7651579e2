"""Model registry: CIFAR Wide ResNets and ShuffleNetV2, with pre-ReLU features sown by name.

Every model is a Linen module with
  `__call__(x, train=False, start_group=0, stop_group=None)` -> float32 logits, or a group
    boundary tensor when stop_group is set; start_group resumes from an injected boundary;
  `feature_groups()` -> per group, the names of its candidate maps (last = the boundary);
  `extra_feature_names()` -> sown names outside every group;
  `stem_features()` -> (pre-ReLU, raw) sown names of a stem outside every group, or None;
  `raw_group_ends()` -> per group, the sown name of its raw output (before any BN that consumes
    it; what RepDistiller's networks return as features for AT, FitNets, SP and FT);
  `num_groups` (property).
Features are sown into the flat top-level collection FEATURES: `mutated[FEATURES][name]` is a
1-tuple holding the map, in the module's compute dtype.
"""

import re

import flax.linen as nn
import jax.numpy as jnp

from dfa_jax.models.connectors import Connector
from dfa_jax.models.layers import FEATURES
from dfa_jax.models.shufflenet_v2 import WIDTHS as SHUFFLENET_V2_WIDTHS
from dfa_jax.models.shufflenet_v2 import ShuffleNetV2
from dfa_jax.models.wide_resnet import WideResNet

__all__ = [
    "Connector",
    "FEATURES",
    "MODEL_NAMES",
    "ShuffleNetV2",
    "WideResNet",
    "get_model",
    "is_valid_model_name",
]

MODEL_NAMES = (
    "wrn_16_2",
    "wrn_16_4",
    "wrn_28_2",
    "wrn_28_4",
    "shufflenet_v2_0.5",
    "shufflenet_v2_1.0",
    "shufflenet_v2_2.0",
)
"""The paper's presets; any wrn_{depth}_{width} with (depth-4) % 6 == 0, depth >= 10 also works."""

_WRN_RE = re.compile(r"wrn_(\d+)_(\d+)")
_SHUFFLENET_PREFIX = "shufflenet_v2_"


def _wrn_depth_width(name: str) -> tuple[int, int] | None:
    """(depth, width) for a valid 'wrn_{depth}_{width}' name, else None."""
    match = _WRN_RE.fullmatch(name)
    if match is None:
        return None
    depth, width = int(match[1]), int(match[2])
    if depth < 10 or (depth - 4) % 6 or width < 1:
        return None
    return depth, width


def is_valid_model_name(name: str) -> bool:
    """Whether `get_model(name, ...)` would build a model."""
    if name.startswith(_SHUFFLENET_PREFIX):
        return name.removeprefix(_SHUFFLENET_PREFIX) in SHUFFLENET_V2_WIDTHS
    return _wrn_depth_width(name) is not None


def get_model(name: str, num_classes: int, dtype=jnp.float32) -> nn.Module:
    """Builds a model by name.

    Args:
      name: one of MODEL_NAMES, or 'wrn_{depth}_{width}' with (depth-4) % 6 == 0, depth >= 10.
      num_classes: classifier outputs.
      dtype: compute dtype (parameters stay float32; logits are returned as float32).

    Raises:
      ValueError: unknown name; the message lists the valid ones.
    """
    if not is_valid_model_name(name):
        raise ValueError(
            f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}, or any "
            "'wrn_{depth}_{width}' with (depth - 4) % 6 == 0 and depth >= 10 (e.g. wrn_10_1)"
        )
    depth_width = _wrn_depth_width(name)
    if depth_width is not None:
        depth, width = depth_width
        return WideResNet(depth=depth, width=width, num_classes=num_classes, dtype=dtype)
    widths = SHUFFLENET_V2_WIDTHS[name.removeprefix(_SHUFFLENET_PREFIX)]
    return ShuffleNetV2(widths=widths, num_classes=num_classes, dtype=dtype)
