"""RepDistiller's CIFAR ResNets (He et al.'s post-activation BasicBlock networks, 6n+2 layers).

resnet8/14/20/32/44/56/110 have widths 16 (stem), 16/32/64 (three groups at 32^2/16^2/8^2);
resnet8x4 and resnet32x4 have 32 (stem), 64/128/256. The architecture is the same in
RepDistiller (`models/resnet.py`) and mdistiller (`mdistiller/models/cifar/resnet.py`); mdistiller's
forward returns the features as a dict and leaves out the pooled vector, which no method here reads.

A block computes relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); its pre-ReLU output (the sum,
RepDistiller's `preact`) is sown as 'g{i}_b{j}', and each group's last one is the group boundary.
'g{i}_out' is relu of that boundary, the `f{i}` of their `forward(is_feat=True)`; the stem
(conv1-bn1-relu, their `f0`) is sown as 'stem' (bn1's output) and 'stem_out' (after the ReLU). The
shortcut is a 1x1 conv + BN (`downsample`) where the stride or the width changes.

Parameter names mirror their state_dict: `conv1`, `bn1`, `layer{g}_{j}/{conv1, bn1, conv2, bn2,
downsample_conv, downsample_bn}` (`layer{g}.{j}.downsample.{0,1}` there), `fc`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dfa_jax.models import layers
from dfa_jax.models.naming import GroupNames

SMALL_WIDTHS = (16, 16, 32, 64)
X4_WIDTHS = (32, 64, 128, 256)
PRESETS = {
    "resnet8": (8, SMALL_WIDTHS),
    "resnet14": (14, SMALL_WIDTHS),
    "resnet20": (20, SMALL_WIDTHS),
    "resnet32": (32, SMALL_WIDTHS),
    "resnet44": (44, SMALL_WIDTHS),
    "resnet56": (56, SMALL_WIDTHS),
    "resnet110": (110, SMALL_WIDTHS),
    "resnet8x4": (8, X4_WIDTHS),
    "resnet32x4": (32, X4_WIDTHS),
}
"""Model name -> (depth, widths of the stem and the three groups), RepDistiller's names."""


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut; returns the sum before the block's ReLU."""

    in_features: int
    features: int
    stride: int
    dtype: Any = jnp.float32

    @property
    def has_downsample(self) -> bool:
        return self.stride != 1 or self.in_features != self.features

    @nn.compact
    def __call__(self, x, train: bool):
        """x: the block input (after the previous ReLU) [B, H, W, in_features] ->
        pre-ReLU output [B, H/stride, W/stride, features]."""
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
        out = layers.Conv3x3(self.features, strides=self.stride, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(norm(name="bn1")(out))
        out = layers.Conv3x3(self.features, dtype=self.dtype, name="conv2")(out)
        out = norm(name="bn2")(out)
        if self.has_downsample:
            x = layers.Conv1x1(
                self.features, strides=self.stride, dtype=self.dtype, name="downsample_conv"
            )(x)
            x = norm(name="downsample_bn")(x)
        return out + x


class CifarResNet(GroupNames, nn.Module):
    """Stem conv-BN-ReLU, three groups of (depth-2)/6 BasicBlocks, ReLU-pool-FC head.

    Group i maps are [B, 32/2^(i-1), 32/2^(i-1), widths[i]]; the stem's [B, 32, 32, widths[0]].
    """

    depth: int
    widths: tuple[int, int, int, int]
    num_classes: int
    dtype: Any = jnp.float32

    @property
    def blocks_per_group(self) -> int:
        return (self.depth - 2) // 6

    @property
    def maps_per_group(self) -> tuple[int, ...]:
        return (self.blocks_per_group,) * 3

    @nn.compact
    def __call__(self, x, train: bool = False, start_group: int = 0, stop_group: int | None = None):
        """The contract's forward (`models.FeatureModel.__call__`): groups start_group+1..
        stop_group of images [B, 32, 32, 3] or of group `start_group`'s boundary -> float32
        logits [B, num_classes], or group `stop_group`'s boundary."""
        last = layers.check_group_range(start_group, stop_group, self.num_groups)
        x = x.astype(self.dtype)
        if start_group == 0:
            x = layers.Conv3x3(self.widths[0], dtype=self.dtype, name="conv1")(x)
            pre = layers.BatchNorm(dtype=self.dtype, name="bn1")(x, use_running_average=not train)
            layers.sow_feature(self, "stem", pre)
            x = nn.relu(pre)
            layers.sow_feature(self, "stem_out", x)
        else:
            pre = x  # An injected boundary: pre-ReLU, as the sown one.
            x = nn.relu(pre)

        for group in range(start_group + 1, last + 1):
            for index in range(self.blocks_per_group):
                pre = BasicBlock(
                    in_features=self.widths[group - 1] if index == 0 else self.widths[group],
                    features=self.widths[group],
                    stride=2 if group > 1 and index == 0 else 1,
                    dtype=self.dtype,
                    name=f"layer{group}_{index}",
                )(x, train)
                layers.sow_feature(self, f"g{group}_b{index + 1}", pre)
                x = nn.relu(pre)
            layers.sow_feature(self, f"g{group}_out", x)
        if stop_group is not None:
            return pre

        return layers.classifier_head(pre, self.num_classes, torch_bias=True)


def fields(name: str) -> dict | None:
    """{depth, widths} of a RepDistiller ResNet name ('resnet56'), else None."""
    if name not in PRESETS:
        return None
    depth, widths = PRESETS[name]
    return {"depth": depth, "widths": widths}


def group_end_bns(model: CifarResNet, params: dict, with_stem: bool) -> list[dict]:
    """RepDistiller's `get_bn_before_relu`: each group's last block's bn2 (the residual is added
    after it), after the stem's bn1 when `with_stem`."""
    last = model.blocks_per_group - 1
    bns = [params[f"layer{g}_{last}"]["bn2"] for g in range(1, model.num_groups + 1)]
    return ([params["bn1"]] if with_stem else []) + bns
