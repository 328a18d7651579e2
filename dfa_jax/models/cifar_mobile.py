"""RepDistiller's CIFAR MobileNetV2 (mobile_half), ShuffleV1, ShuffleV2 and ResNet50, in Flax.

The architectures of CRD's benchmark (HobbitLong/RepDistiller `models/mobilenetv2.py`,
`ShuffleNetv1.py`, `ShuffleNetv2.py`, `resnetv2.py`), identical in megvii-research/mdistiller
`mdistiller/models/cifar/`. The two differ only in what `forward` returns (RepDistiller:
`forward(x, is_feat, preact)` -> features list and logits; mdistiller: logits and a dict with
'feats' and 'preact_feats'); the layers, shapes and state_dict keys are the same, so either's
checkpoints load here.

Groups are where their `forward(is_feat=True)` features are taken (feat[1:-1]); their f0, the
stem conv-BN-ReLU output, is the stem outside the groups. Each block's pre-ReLU output is sown as
'g{i}_b{j}' (block j of group i); a group's raw end 'g{i}_out' is what their `is_feat=True,
preact=False` returns. Per family, with P a block's pre-ReLU map and its raw output `post(P)`:
  * MobileNetV2: an inverted residual ends linear (no ReLU): P is the block output, raw = P;
  * ShuffleV1, ResNet50: P = their `preact` (residual sum, or concatenation with the pooled
    shortcut); raw = relu(P);
  * ShuffleV2: P = the branches' concatenation before the channel shuffle (their `preact` of a
    BasicBlock: [x1, bn3]); raw = shuffle(relu(P)).
The forward stops at and resumes from the pre-ReLU boundary of a group (resuming applies `post`).
Module names are their state_dict module paths with '.' written '_' (`blocks_2_0/conv_3`,
`layer1_0/shortcut_1`), so a state_dict maps onto them 1:1 (`dfa_jax.interop_mobile`).
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dfa_jax.models import layers
from dfa_jax.models.naming import GroupNames
from dfa_jax.models.shufflenet_v2 import channel_shuffle


def _pool_linear(x, num_classes: int, name: str, kernel_init=None):
    """Global average pooling and the classifier, in float32: [B, H, W, C] -> [B, K].

    Started as their nn.Linear: PyTorch's default weight and bias (ShuffleV1, ShuffleV2 and
    ResNet50 leave it there), or `kernel_init` with a zero bias (MobileNetV2's N(0, 0.01)).
    """
    x = layers.global_avg_pool(x.astype(jnp.float32))
    if kernel_init is None:
        init = {"bias_init": layers.torch_bias_init(x.shape[-1])}
    else:
        init = {"kernel_init": kernel_init}
    return layers.Dense(num_classes, dtype=jnp.float32, name=name, **init)(x)


# RepDistiller's ShuffleV1 and ShuffleV2 never initialise their (bias-free) convs: PyTorch's
# default kernels, U(+-1/sqrt(fan_in)), not the He-normal fan_out of the other families.
_ShuffleConv1x1 = functools.partial(layers.Conv1x1, kernel_init=layers.torch_conv_init)
_ShuffleConv3x3 = functools.partial(layers.Conv3x3, kernel_init=layers.torch_conv_init)


class _Contract(GroupNames):
    """The contract's names (`GroupNames`, from `maps_per_group`) and the forward these share."""

    def _run(self, x, train, start_group, stop_group, stem, blocks, post, head):
        """The shared forward: stem, groups start_group+1..stop_group, head.

        `stem(x)` -> the stem's pre-ReLU map; `blocks(g)` -> group g's blocks, each
        `block(x, train)` -> its pre-ReLU map P; `post(P)` -> the next block's input;
        `head(x)` -> logits from the last block's raw output.
        """
        last = layers.check_group_range(start_group, stop_group, self.num_groups)
        x = x.astype(self.dtype)
        if start_group == 0:
            pre = stem(x)
            layers.sow_feature(self, "stem", pre)
            x = nn.relu(pre)
            layers.sow_feature(self, "stem_out", x)
        else:
            x = post(x)  # An injected boundary is a pre-ReLU map.
        for group in range(start_group + 1, last + 1):
            for index, block in enumerate(blocks(group), start=1):
                pre = block(x, train)
                layers.sow_feature(self, f"g{group}_b{index}", pre)
                x = post(pre)
            if not self.raw_is_pre:
                layers.sow_feature(self, f"g{group}_out", x)
        if stop_group is not None:
            return pre
        return head(x)


# ------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """pw conv-BN-ReLU, dw3x3 conv-BN-ReLU, pw-linear conv-BN (+ input when shapes agree).

    Names `conv_{0,1,3,4,6,7}` are the indices of their `conv` Sequential.
    """

    in_features: int
    features: int
    stride: int
    expand: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """[B, H, W, in_features] -> [B, H/stride, W/stride, features] (no ReLU at the end)."""
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
        hidden = self.in_features * self.expand
        out = layers.Conv1x1(hidden, dtype=self.dtype, name="conv_0")(x)
        out = nn.relu(norm(name="conv_1")(out))
        out = layers.Conv3x3(
            hidden,
            strides=self.stride,
            feature_group_count=hidden,
            dtype=self.dtype,
            name="conv_3",
        )(out)
        out = nn.relu(norm(name="conv_4")(out))
        out = norm(name="conv_7")(
            layers.Conv1x1(self.features, dtype=self.dtype, name="conv_6")(out)
        )
        if self.stride == 1 and self.in_features == self.features:
            return x + out
        return out


MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2))
MOBILENET_V2_SETTING += ((6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
"""Their inverted residual stages (t, c, n, s) for T = 6."""

MOBILENET_V2_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))
"""Stages per group: their features f1..f4 follow stages 1, 2, 4 and 6."""


class MobileNetV2(_Contract, nn.Module):
    """mobile_half: MobileNetV2 with T = 6, width 0.5; stem 3x3 s2 (16^2), 1x1 conv to 1280.

    Group ends: g1 [B, 16, 16, 12], g2 [B, 8, 8, 16], g3 [B, 4, 4, 48], g4 [B, 2, 2, 160].
    """

    num_classes: int
    width_mult: float = 0.5
    dtype: Any = jnp.float32
    raw_is_pre = True

    @property
    def maps_per_group(self) -> tuple[int, ...]:
        return tuple(
            sum(MOBILENET_V2_SETTING[s][2] for s in stages) for stages in MOBILENET_V2_GROUPS
        )

    @nn.nowrap
    def _stage_blocks(self, group: int) -> list[nn.Module]:
        blocks = []
        in_features = int(32 * self.width_mult)
        for stage, (t, c, n, s) in enumerate(MOBILENET_V2_SETTING):
            features = int(c * self.width_mult)
            for j in range(n):
                if stage in MOBILENET_V2_GROUPS[group - 1]:
                    blocks.append(
                        InvertedResidual(
                            in_features,
                            features,
                            s if j == 0 else 1,
                            t,
                            dtype=self.dtype,
                            name=f"blocks_{stage}_{j}",
                        )
                    )
                in_features = features
        return blocks

    @nn.compact
    def __call__(self, x, train: bool = False, start_group: int = 0, stop_group: int | None = None):
        """Images [B, 32, 32, 3] or the group-`start_group` boundary -> float32 logits
        [B, num_classes], or the group-`stop_group` boundary."""
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)

        def stem(x):
            width = int(32 * self.width_mult)
            x = layers.Conv3x3(width, strides=2, dtype=self.dtype, name="conv1_0")(x)
            return norm(name="conv1_1")(x)

        def head(x):
            # Their last channel: 1280 unless width_mult > 1.
            last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
            x = layers.Conv1x1(last, dtype=self.dtype, name="conv2_0")(x)
            x = nn.relu(norm(name="conv2_1")(x))
            return _pool_linear(
                x, self.num_classes, "classifier_0", kernel_init=nn.initializers.normal(0.01)
            )

        return self._run(
            x, train, start_group, stop_group, stem, self._stage_blocks, lambda p: p, head
        )


# --------------------------------------------------------------------------------- ShuffleV1


def avg_pool_3x3_s2(x):
    """Their AvgPool2d(3, stride=2, padding=1), zeros counted: [B, H, W, C] -> [B, H/2, W/2, C]."""
    return nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1-BN-ReLU, shuffle, dw3x3-BN-ReLU, grouped 1x1-BN; + input (stride 1) or
    concatenated with the 3x3 average-pooled input (stride 2). Returns the pre-ReLU sum/concat."""

    in_features: int
    features: int  # Of the residual branch: the block's output minus the concatenated input.
    stride: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
        mid = self.features // 4
        # As theirs: the first 1x1 conv after the 24-channel stem is not grouped.
        g = 1 if self.in_features == 24 else self.groups
        out = _ShuffleConv1x1(mid, feature_group_count=g, dtype=self.dtype, name="conv1")(x)
        out = channel_shuffle(nn.relu(norm(name="bn1")(out)), g)
        out = _ShuffleConv3x3(
            mid, strides=self.stride, feature_group_count=mid, dtype=self.dtype, name="conv2"
        )(out)
        out = nn.relu(norm(name="bn2")(out))
        out = _ShuffleConv1x1(
            self.features, feature_group_count=self.groups, dtype=self.dtype, name="conv3"
        )(out)
        out = norm(name="bn3")(out)
        if self.stride == 2:
            return jnp.concatenate([out, avg_pool_3x3_s2(x)], axis=-1)
        return out + x


class ShuffleV1(_Contract, nn.Module):
    """ShuffleNet (g = 3) for CIFAR: stem 1x1 conv to 24 at 32^2, layers of 4/8/4 blocks.

    Group ends: g1 [B, 16, 16, 240], g2 [B, 8, 8, 480], g3 [B, 4, 4, 960].
    """

    num_classes: int
    out_planes: tuple[int, ...] = (240, 480, 960)
    layer_blocks: tuple[int, ...] = (4, 8, 4)
    groups: int = 3
    dtype: Any = jnp.float32

    @property
    def maps_per_group(self) -> tuple[int, ...]:
        return self.layer_blocks

    @nn.nowrap
    def _blocks(self, group: int) -> list[nn.Module]:
        in_features = (24,) + tuple(self.out_planes)
        blocks = []
        for j in range(self.layer_blocks[group - 1]):
            fan_in = in_features[group - 1] if j == 0 else in_features[group]
            blocks.append(
                ShuffleV1Block(
                    fan_in,
                    in_features[group] - (fan_in if j == 0 else 0),
                    2 if j == 0 else 1,
                    self.groups,
                    dtype=self.dtype,
                    name=f"layer{group}_{j}",
                )
            )
        return blocks

    @nn.compact
    def __call__(self, x, train: bool = False, start_group: int = 0, stop_group: int | None = None):
        """Images [B, 32, 32, 3] or the group-`start_group` boundary -> float32 logits
        [B, num_classes], or the group-`stop_group` boundary."""

        def stem(x):
            x = _ShuffleConv1x1(24, dtype=self.dtype, name="conv1")(x)
            return layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x)

        def head(x):
            return _pool_linear(x, self.num_classes, "linear")

        return self._run(x, train, start_group, stop_group, stem, self._blocks, nn.relu, head)


# --------------------------------------------------------------------------------- ShuffleV2


class ShuffleV2DownBlock(nn.Module):
    """Stride 2: left dw3x3-BN, 1x1-BN; right 1x1-BN-ReLU, dw3x3-BN, 1x1-BN; returns the
    pre-ReLU concatenation [left, right] (the shuffle follows, in `post`)."""

    in_features: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
        conv1x1 = functools.partial(_ShuffleConv1x1, dtype=self.dtype)
        mid = self.features // 2
        left = _ShuffleConv3x3(
            self.in_features,
            strides=2,
            feature_group_count=self.in_features,
            dtype=self.dtype,
            name="conv1",
        )(x)
        left = norm(name="bn2")(conv1x1(mid, name="conv2")(norm(name="bn1")(left)))
        right = nn.relu(norm(name="bn3")(conv1x1(mid, name="conv3")(x)))
        right = _ShuffleConv3x3(
            mid, strides=2, feature_group_count=mid, dtype=self.dtype, name="conv4"
        )(right)
        right = norm(name="bn5")(conv1x1(mid, name="conv5")(norm(name="bn4")(right)))
        return jnp.concatenate([left, right], axis=-1)


class ShuffleV2BasicBlock(nn.Module):
    """Split in halves x1 | x2; x2 -> 1x1-BN-ReLU, dw3x3-BN, 1x1-BN; returns [x1, bn3] (their
    `preact`; x1 is already non-negative, so relu of it is their [x1, relu(bn3)])."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
        half = int(self.features * 0.5)  # Their SplitBlock(0.5).
        x1, x2 = x[..., :half], x[..., half:]
        width = self.features - half
        out = nn.relu(norm(name="bn1")(_ShuffleConv1x1(width, dtype=self.dtype, name="conv1")(x2)))
        out = _ShuffleConv3x3(width, feature_group_count=width, dtype=self.dtype, name="conv2")(out)
        out = norm(name="bn2")(out)
        out = norm(name="bn3")(_ShuffleConv1x1(width, dtype=self.dtype, name="conv3")(out))
        return jnp.concatenate([x1, out], axis=-1)


class ShuffleV2(_Contract, nn.Module):
    """ShuffleNetV2 1x for CIFAR (theirs, not the DFA paper's `shufflenet_v2_*`): stem 1x1 conv
    to 24 at 32^2, layers of a down block and 3/7/3 basic blocks, 1x1 conv to 1024.

    Group ends: g1 [B, 16, 16, 116], g2 [B, 8, 8, 232], g3 [B, 4, 4, 464].
    """

    num_classes: int
    out_channels: tuple[int, ...] = (116, 232, 464, 1024)
    layer_blocks: tuple[int, ...] = (3, 7, 3)
    dtype: Any = jnp.float32

    @property
    def maps_per_group(self) -> tuple[int, ...]:
        return tuple(n + 1 for n in self.layer_blocks)

    @nn.nowrap
    def _blocks(self, group: int) -> list[nn.Module]:
        in_features = (24,) + tuple(self.out_channels[:3])
        features = in_features[group]
        down = ShuffleV2DownBlock(
            in_features[group - 1], features, dtype=self.dtype, name=f"layer{group}_0"
        )
        return [down] + [
            ShuffleV2BasicBlock(features, dtype=self.dtype, name=f"layer{group}_{j}")
            for j in range(1, self.layer_blocks[group - 1] + 1)
        ]

    @nn.compact
    def __call__(self, x, train: bool = False, start_group: int = 0, stop_group: int | None = None):
        """Images [B, 32, 32, 3] or the group-`start_group` boundary -> float32 logits
        [B, num_classes], or the group-`stop_group` boundary."""
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)

        def stem(x):
            return norm(name="bn1")(_ShuffleConv1x1(24, dtype=self.dtype, name="conv1")(x))

        def head(x):
            x = _ShuffleConv1x1(self.out_channels[3], dtype=self.dtype, name="conv2")(x)
            return _pool_linear(nn.relu(norm(name="bn2")(x)), self.num_classes, "linear")

        def post(pre):
            # Their blocks shuffle the ReLU'd concatenation; the two commute.
            return channel_shuffle(nn.relu(pre), 2)

        return self._run(x, train, start_group, stop_group, stem, self._blocks, post, head)


# ---------------------------------------------------------------------------------- ResNet50


class Bottleneck(nn.Module):
    """1x1-BN-ReLU, 3x3(stride)-BN-ReLU, 1x1 (x4)-BN, + shortcut (1x1 conv-BN where the shape
    changes); returns the pre-ReLU sum (their `preact`)."""

    in_features: int
    planes: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
        out = nn.relu(
            norm(name="bn1")(layers.Conv1x1(self.planes, dtype=self.dtype, name="conv1")(x))
        )
        out = layers.Conv3x3(self.planes, strides=self.stride, dtype=self.dtype, name="conv2")(out)
        out = nn.relu(norm(name="bn2")(out))
        out = layers.Conv1x1(4 * self.planes, dtype=self.dtype, name="conv3")(out)
        out = norm(name="bn3")(out)
        if self.stride != 1 or self.in_features != 4 * self.planes:
            short = layers.Conv1x1(
                4 * self.planes, strides=self.stride, dtype=self.dtype, name="shortcut_0"
            )(x)
            x = norm(name="shortcut_1")(short)
        return out + x


class ResNet50(_Contract, nn.Module):
    """Their CIFAR ResNet50 (resnetv2.py): stem 3x3 conv to 64 at 32^2, 3/4/6/3 bottlenecks.

    Group ends: g1 [B, 32, 32, 256], g2 [B, 16, 16, 512], g3 [B, 8, 8, 1024], g4 [B, 4, 4, 2048].
    """

    num_classes: int
    layer_blocks: tuple[int, ...] = (3, 4, 6, 3)
    dtype: Any = jnp.float32

    @property
    def maps_per_group(self) -> tuple[int, ...]:
        return self.layer_blocks

    @nn.nowrap
    def _blocks(self, group: int) -> list[nn.Module]:
        planes = 64 * 2 ** (group - 1)
        in_features = 64 if group == 1 else 2 * planes  # The previous group's 4 * planes / 2.
        return [
            Bottleneck(
                in_features if j == 0 else 4 * planes,
                planes,
                (1 if group == 1 else 2) if j == 0 else 1,
                dtype=self.dtype,
                name=f"layer{group}_{j}",
            )
            for j in range(self.layer_blocks[group - 1])
        ]

    @nn.compact
    def __call__(self, x, train: bool = False, start_group: int = 0, stop_group: int | None = None):
        """Images [B, 32, 32, 3] or the group-`start_group` boundary -> float32 logits
        [B, num_classes], or the group-`stop_group` boundary."""

        def stem(x):
            x = layers.Conv3x3(64, dtype=self.dtype, name="conv1")(x)
            return layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x)

        def head(x):
            return _pool_linear(x, self.num_classes, "linear")

        return self._run(x, train, start_group, stop_group, stem, self._blocks, nn.relu, head)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "MobileNetV2": MobileNetV2,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
    "ResNet50": ResNet50,
}
"""Model name -> its Linen class (each name is its own family)."""


def _last_blocks(model) -> list[str]:
    """Per group, the module name of its last block."""
    if isinstance(model, MobileNetV2):
        return [f"blocks_{s[-1]}_{MOBILENET_V2_SETTING[s[-1]][2] - 1}" for s in MOBILENET_V2_GROUPS]
    return [f"layer{g}_{n - 1}" for g, n in enumerate(model.layer_blocks, start=1)]


def mobilenet_v2_group_end_bns(model, params: dict, with_stem: bool) -> list[dict]:
    """Their `get_bn_before_relu()`: each group's last pw-linear BN (`conv_7`), after the stem's
    `conv1_1` when `with_stem`. Where the block adds its input, the BN is the residual branch's
    (the group end is that sum), as in RepDistiller."""
    bns = [params[block]["conv_7"] for block in _last_blocks(model)]
    return ([params["conv1_1"]] if with_stem else []) + bns


def resnet50_group_end_bns(model, params: dict, with_stem: bool) -> list[dict]:
    """Their `get_bn_before_relu()`: each group's last `bn3` (before the shortcut is added, as in
    RepDistiller), after the stem's `bn1` when `with_stem`."""
    bns = [params[block]["bn3"] for block in _last_blocks(model)]
    return ([params["bn1"]] if with_stem else []) + bns


GROUP_END_BNS = {"MobileNetV2": mobilenet_v2_group_end_bns, "ResNet50": resnet50_group_end_bns}
"""Their `get_bn_before_relu()`; the ShuffleNets have none (theirs raises NotImplementedError)."""

HEADS = {
    "MobileNetV2": ("conv2_0", "conv2_1", "classifier_0"),
    "ShuffleV1": ("linear",),
    "ShuffleV2": ("conv2", "bn2", "linear"),
    "ResNet50": ("linear",),
}
"""Top-level parameters after the feature body (left out of their `get_feat_modules()`)."""
