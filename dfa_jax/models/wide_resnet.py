"""Pre-activation Wide ResNet WRN-d-k for 32x32 images (Zagoruyko & Komodakis, no dropout).

Every block output is sown pre-ReLU, i.e. as the output of the BatchNorm that consumes it: the
next block's `bn1`, or the final `bn1` for the last block. Each group's last block output is also
sown raw (the residual stream before that BatchNorm, `g{i}_out`): the map RepDistiller's WRN hands
AT, FitNets, SP and FT (`forward(is_feat=True, preact=False)`). The forward can stop at, or resume
from, a group boundary (the pre-ReLU map at the end of a group). Parameter names mirror
WideResNet-pytorch (`conv1`, `block{g}_layer{j}/{bn1,conv1,bn2,conv2,conv_shortcut}`, `bn1`,
`fc`) so a PyTorch state_dict maps onto them 1:1.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dfa_jax.models import layers
from dfa_jax.models.naming import GroupNames


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: [bn1 -> relu] -> conv3x3 -> bn2 -> relu -> conv3x3, + shortcut.

    `bn1` is split off as `preactivate` so the caller can sow its output (the previous block's
    pre-ReLU feature) or replace it by an injected boundary tensor.
    """

    in_features: int
    features: int
    stride: int
    dtype: Any = jnp.float32

    @property
    def has_projection(self) -> bool:
        return self.in_features != self.features or self.stride != 1

    def setup(self):
        self.bn1 = layers.BatchNorm(dtype=self.dtype)
        self.conv1 = layers.Conv3x3(self.features, strides=self.stride, dtype=self.dtype)
        self.bn2 = layers.BatchNorm(dtype=self.dtype)
        self.conv2 = layers.Conv3x3(self.features, dtype=self.dtype)
        if self.has_projection:
            self.conv_shortcut = layers.Conv1x1(
                self.features, strides=self.stride, dtype=self.dtype
            )

    def preactivate(self, x, train: bool):
        """bn1(x): [B, H, W, in_features] -> same shape, the pre-ReLU view of the input."""
        return self.bn1(x, use_running_average=not train)

    def __call__(self, x, pre, train: bool):
        """Continues from the pre-activated input.

        Args:
          x: raw block input [B, H, W, in_features]; only read by an identity shortcut, so it
            may be None when the block projects (an injected boundary has no raw input).
          pre: `preactivate(x)` or an injected boundary tensor, [B, H, W, in_features].
          train: batch statistics (True) or running averages (False) in BatchNorm.

        Returns:
          [B, H/stride, W/stride, features], the raw (not normalised) block output.
        """
        act = nn.relu(pre)
        out = self.conv1(act)
        out = nn.relu(self.bn2(out, use_running_average=not train))
        out = self.conv2(out)
        if self.has_projection:
            # As in WideResNet-pytorch: the projection reads the activated input.
            return out + self.conv_shortcut(act)
        assert x is not None, "an identity shortcut needs the raw block input"
        return out + x


class WideResNet(GroupNames, nn.Module):
    """WRN-depth-width: stem conv, 3 groups of (depth-4)/6 blocks at 32^2/16^2/8^2, BN-ReLU-pool-FC.

    Sown features (collection FEATURES, top level): 'stem' (the stem output after g1_b1's bn1,
    [B, 32, 32, 16]) and 'stem_out' (the raw stem output), 'g{i}_b{j}' for block j of group i, [B, 32/2^(i-1), 32/2^(i-1),
    16*width*2^(i-1)], and 'g{i}_out', group i's raw output (its last block's, before any BN).
    """

    depth: int
    width: int
    num_classes: int
    dtype: Any = jnp.float32

    @property
    def blocks_per_group(self) -> int:
        return (self.depth - 4) // 6

    @property
    def maps_per_group(self) -> tuple[int, ...]:
        return (self.blocks_per_group,) * 3

    @property
    def group_widths(self) -> tuple[int, ...]:
        return tuple(16 * self.width * 2**g for g in range(self.num_groups))

    def _block(self, group: int, index: int) -> WideBasicBlock:
        """Block `index` (0-based) of `group` (1-based)."""
        in_features = (16,) + self.group_widths
        return WideBasicBlock(
            in_features=in_features[group - 1] if index == 0 else self.group_widths[group - 1],
            features=self.group_widths[group - 1],
            stride=(1 if group == 1 else 2) if index == 0 else 1,
            dtype=self.dtype,
            name=f"block{group}_layer{index}",
        )

    @nn.compact
    def __call__(self, x, train: bool = False, start_group: int = 0, stop_group: int | None = None):
        """The contract's forward (`models.FeatureModel.__call__`): groups start_group+1..
        stop_group of images [B, 32, 32, 3] or of group `start_group`'s boundary -> float32
        logits [B, num_classes], or group `stop_group`'s boundary."""
        last = layers.check_group_range(start_group, stop_group, self.num_groups)
        x = x.astype(self.dtype)
        if start_group == 0:
            x = layers.Conv3x3(16, dtype=self.dtype, name="conv1")(x)
            layers.sow_feature(self, "stem_out", x)
            pre, prev_name = None, "stem"
        else:
            # An injected boundary is already pre-activated; the next block projects it.
            x, pre, prev_name = None, x, None

        for group in range(start_group + 1, last + 1):
            for index in range(self.blocks_per_group):
                block = self._block(group, index)
                if pre is None:
                    pre = block.preactivate(x, train)
                    layers.sow_feature(self, prev_name, pre)
                x = block(x, pre, train)
                pre, prev_name = None, f"g{group}_b{index + 1}"
            layers.sow_feature(self, f"g{group}_out", x)

        # The last block's pre-ReLU feature is the output of the BN that consumes it.
        if pre is None:  # else start_group == G: the injected tensor goes straight to the head
            if last < self.num_groups:
                pre = self._block(last + 1, 0).preactivate(x, train)
            else:
                pre = layers.BatchNorm(dtype=self.dtype, name="bn1")(
                    x, use_running_average=not train
                )
            layers.sow_feature(self, prev_name, pre)
        if stop_group is not None:
            return pre

        return layers.classifier_head(pre, self.num_classes)


WRN_16_2 = functools.partial(WideResNet, depth=16, width=2)
WRN_16_4 = functools.partial(WideResNet, depth=16, width=4)
WRN_28_2 = functools.partial(WideResNet, depth=28, width=2)
WRN_28_4 = functools.partial(WideResNet, depth=28, width=4)
