"""ShuffleNetV2 for 32x32 images, the DFA authors' pre-activation CIFAR/CINIC-10 variant.

Differences from torchvision's ImageNet model, as in the authors' framework
(PkuDavidGuan/Distillation, `shufflenetV2.py`); the last two are what reproduces Table 4's
parameter counts (0.356M/1.269M/5.367M with 10 classes; torchvision's units give 1.264M/5.365M):
  * stem: conv3x3 3->24 stride 1 + BN, no ReLU, no max-pool; stages run at 16^2/8^2/4^2;
  * every unit starts with a ReLU of its whole input and its branches end in a BN, so a unit's
    branch outputs (and the stem and conv5 outputs) are pre-ReLU maps; a stride-1 unit passes
    half of its channels through, and those are its ReLU'd input (as in the authors' model), so
    half of such a unit's output channels are non-negative;
  * the stride-2 unit's residual branch keeps the input width until its last 1x1 conv
    (1x1 C_in->C_in, dw3x3, 1x1 C_in->C_out/2);
  * every conv has a bias (PyTorch's default), and every conv and the classifier start as
    PyTorch's defaults: the authors' model defines a He-normal `reset_parameters` but never calls
    it, so the networks behind Table 4 started from nn.Conv2d's and nn.Linear's own
    initialisation (U(+-1/sqrt(fan_in)) kernels and biases).

Sown features (collection FEATURES, top level): 'g1_b1' (stem), 'g{s}_b{j}' for unit j of stage
s in 2..4, 'g5_b1' (conv5). Parameter names: `conv1`/`bn1` (stem), `stage{s}_unit{j}` (0-based j),
`conv5`/`bn5`, `fc`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dfa_jax.models import layers
from dfa_jax.models.naming import GroupNames

STAGE_UNITS = (4, 8, 4)
"""Units of stages 2, 3, 4; the first of each has stride 2."""

STEM_WIDTH = 24

WIDTHS = {
    "0.5": (48, 96, 192, 1024),
    "1.0": (116, 232, 464, 1024),
    "2.0": (244, 488, 976, 2048),
}
"""Output channels of stages 2/3/4 and conv5, per width multiplier: the authors' (torchvision's)
widths. Table 3's formula (116x / 232x / 464x, conv5 1024·max(1, x)) gives other widths at 0.5
and 2.0 (58/116/232 and 232/464/928: 0.459M and 4.952M parameters); these reproduce Table 4's
0.356M and 5.367M."""


def _conv(kernel_size: int, features: int, in_features: int, feature_group_count: int = 1, **kw):
    """A biased k x k conv (k = 1 or 3) started as PyTorch's nn.Conv2d (see the module note)."""
    preset = layers.Conv1x1 if kernel_size == 1 else layers.Conv3x3
    init = layers.torch_conv_defaults(kernel_size, in_features, feature_group_count)
    return preset(features, use_bias=True, feature_group_count=feature_group_count, **init, **kw)


def channel_shuffle(x, groups: int):
    """[B, H, W, C] -> [B, H, W, C] with channel g*(C/groups)+k moved to k*groups+g (PyTorch's)."""
    *batch_dims, channels = x.shape
    x = x.reshape(*batch_dims, groups, channels // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*batch_dims, channels)


def concat_shuffle(parts):
    """g x [B, H, W, C] -> [B, H, W, g*C]: `channel_shuffle(concatenate(parts, -1), g)`.

    Written as a stack on a new minor axis (channel k*g+j is part j's channel k) rather than a
    concatenate and a transpose: XLA then fuses one interleaving copy instead of a transposing
    one, and the next unit's channel split slices that layout without another transpose.
    """
    return jnp.stack(parts, axis=-1).reshape(*parts[0].shape[:-1], -1)


class ShuffleUnit(nn.Module):
    """relu -> (left branch | right branch) -> concat -> channel shuffle; output is pre-ReLU.

    stride 1: the relu'd input is split in half; the left half passes through, the right half
    goes through conv1x1-BN-ReLU-dw3x3-BN-conv1x1-BN. stride 2: both branches see the whole
    input; left dw3x3(s2)-BN-conv1x1-BN, right conv1x1-BN-ReLU-dw3x3(s2)-BN-conv1x1-BN.
    """

    in_features: int
    features: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """[B, H, W, in_features] -> [B, H/stride, W/stride, features]."""
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
        half = self.features // 2
        x = nn.relu(x)
        if self.stride == 1:
            assert self.in_features == self.features, (self.in_features, self.features)
            left, right = jnp.split(x, 2, axis=-1)
            mid = half
        else:
            dw = _conv(
                3,
                self.in_features,
                self.in_features,
                feature_group_count=self.in_features,
                strides=self.stride,
                dtype=self.dtype,
                name="shortcut_dwconv",
            )
            left = norm(name="shortcut_bn1")(dw(x))
            conv = _conv(1, half, self.in_features, dtype=self.dtype, name="shortcut_conv")
            left = norm(name="shortcut_bn2")(conv(left))
            right = x
            mid = self.in_features

        conv = _conv(1, mid, right.shape[-1], dtype=self.dtype, name="residual_conv1")
        right = nn.relu(norm(name="residual_bn1")(conv(right)))
        right = _conv(
            3,
            mid,
            mid,
            strides=self.stride,
            feature_group_count=mid,
            dtype=self.dtype,
            name="residual_dwconv",
        )(right)
        right = norm(name="residual_bn2")(right)
        conv = _conv(1, half, mid, dtype=self.dtype, name="residual_conv2")
        right = norm(name="residual_bn3")(conv(right))
        return concat_shuffle([left, right])


class ShuffleNetV2(GroupNames, nn.Module):
    """Stem (group 1), stages 2/3/4 (groups 2-4), conv5 (group 5), ReLU-pool-FC head.

    Group i maps: g1 [B, 32, 32, 24]; g2..g4 [B, 32/2^(i-1), 32/2^(i-1), widths[i-2]];
    g5 [B, 4, 4, widths[3]].
    """

    widths: tuple[int, int, int, int]
    num_classes: int
    dtype: Any = jnp.float32

    # The stem is group 1, and no BN of its own consumes a unit's output (the next unit starts with
    # a ReLU): the raw group ends are the boundaries, and nothing is sown outside the groups.
    has_stem = False
    raw_is_pre = True

    @property
    def maps_per_group(self) -> tuple[int, ...]:
        """The stem, each stage's units, conv5: one map each."""
        return (1,) + STAGE_UNITS + (1,)

    @nn.compact
    def __call__(self, x, train: bool = False, start_group: int = 0, stop_group: int | None = None):
        """The contract's forward (`models.FeatureModel.__call__`): groups start_group+1..
        stop_group of images [B, 32, 32, 3] or of group `start_group`'s boundary -> float32
        logits [B, num_classes], or group `stop_group`'s boundary."""
        last = layers.check_group_range(start_group, stop_group, self.num_groups)
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
        x = x.astype(self.dtype)
        if start_group == 0:
            x = _conv(3, STEM_WIDTH, x.shape[-1], dtype=self.dtype, name="conv1")(x)
            x = norm(name="bn1")(x)
            layers.sow_feature(self, "g1_b1", x)

        in_widths = (STEM_WIDTH,) + self.widths
        for group in range(max(start_group + 1, 2), last + 1):
            if group < self.num_groups:
                for index in range(STAGE_UNITS[group - 2]):
                    x = ShuffleUnit(
                        in_features=in_widths[group - 2] if index == 0 else in_widths[group - 1],
                        features=in_widths[group - 1],
                        stride=2 if index == 0 else 1,
                        dtype=self.dtype,
                        name=f"stage{group}_unit{index}",
                    )(x, train)
                    layers.sow_feature(self, f"g{group}_b{index + 1}", x)
            else:
                conv5 = _conv(1, self.widths[3], x.shape[-1], dtype=self.dtype, name="conv5")
                x = conv5(nn.relu(x))
                x = norm(name="bn5")(x)
                layers.sow_feature(self, f"g{group}_b1", x)
        if stop_group is not None:
            return x

        return layers.classifier_head(x, self.num_classes, torch_bias=True)
