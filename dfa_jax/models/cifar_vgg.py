"""RepDistiller's CIFAR VGGs with BatchNorm: vgg8, vgg11, vgg13, vgg16, vgg19 (their `vgg*_bn`).

Five conv blocks of conv3x3(+bias)-BN-ReLU layers (widths `CONFIGS`), max-pooling 2x2 after blocks
0-2, global average pooling and one linear `classifier` (512 -> classes). Block 0 is the stem
(`f0` of their `forward(is_feat=True)`); blocks 1-4 are groups 1-4, each group's maps the pre-ReLU
BN outputs of its layers ('g{i}_b{j}'), its last one the boundary (their `f{i}_pre`; the BN their
`get_bn_before_relu` returns), 'g{i}_out' its ReLU (their `f{i}`). The stem is sown as 'stem'
(block 0's last BN output) and 'stem_out' (its ReLU). Same architecture in RepDistiller
(`models/vgg.py`) and mdistiller (`mdistiller/models/cifar/vgg.py`).

For 32x32 inputs only: their `pool3` (before block 4) runs for 64x64 inputs alone.

Parameter names: `block{b}_conv{k}` / `block{b}_bn{k}` for layer k of block b, `classifier`;
their state_dict's `block{b}.{3k}` / `block{b}.{3k+1}` (a Sequential of conv, BN, ReLU triples).
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dfa_jax.models import layers
from dfa_jax.models.naming import GroupNames

CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}
"""Model name -> per block (0 = stem), the widths of its conv layers (their cfg S/A/B/D/E)."""

# Their conv init: N(0, 2 / (k * k * out)), bias 0; the classifier N(0, 0.01), bias 0.
Conv3x3 = functools.partial(layers.Conv3x3, use_bias=True)
classifier_init = nn.initializers.normal(0.01)


class CifarVGG(GroupNames, nn.Module):
    """Stem block 0, groups 1-4 (blocks 1-4), ReLU-pool-linear head.

    Maps: stem [B, 32, 32, 64]; group i [B, 32/2^i, 32/2^i, C] for i <= 3, group 4 [B, 4, 4, 512].
    """

    config: tuple[tuple[int, ...], ...]
    num_classes: int
    dtype: Any = jnp.float32

    @property
    def maps_per_group(self) -> tuple[int, ...]:
        """One map per conv layer of blocks 1-4 (block 0 is the stem)."""
        return tuple(len(widths) for widths in self.config[1:])

    @nn.nowrap
    def _layers(self, block: int, x, train: bool, sow: bool):
        """Block `block`'s conv-BN layers (ReLU between them) on x -> the last BN output."""
        pre = None
        for k, width in enumerate(self.config[block]):
            if k:
                x = nn.relu(pre)
            x = Conv3x3(width, dtype=self.dtype, name=f"block{block}_conv{k}")(x)
            pre = layers.BatchNorm(dtype=self.dtype, name=f"block{block}_bn{k}")(
                x, use_running_average=not train
            )
            if sow:
                layers.sow_feature(self, f"g{block}_b{k + 1}", pre)
        return pre

    @nn.compact
    def __call__(self, x, train: bool = False, start_group: int = 0, stop_group: int | None = None):
        """The contract's forward (`models.FeatureModel.__call__`): groups start_group+1..
        stop_group of images [B, 32, 32, 3] or of group `start_group`'s boundary -> float32
        logits [B, num_classes], or group `stop_group`'s boundary."""
        last = layers.check_group_range(start_group, stop_group, self.num_groups)
        x = x.astype(self.dtype)
        if start_group == 0:
            pre = self._layers(0, x, train, sow=False)
            layers.sow_feature(self, "stem", pre)
        else:
            pre = x  # An injected boundary: pre-ReLU, as the sown one.
        x = nn.relu(pre)
        if start_group == 0:
            layers.sow_feature(self, "stem_out", x)

        for group in range(start_group + 1, last + 1):
            if group < self.num_groups:  # pool0..pool2; pool3 acts on 64x64 inputs only.
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            pre = self._layers(group, x, train, sow=True)
            x = nn.relu(pre)
            layers.sow_feature(self, f"g{group}_out", x)
        if stop_group is not None:
            return pre

        pooled = layers.global_avg_pool(x.astype(jnp.float32))
        return layers.Dense(
            self.num_classes, dtype=jnp.float32, kernel_init=classifier_init, name="classifier"
        )(pooled)


def fields(name: str) -> dict | None:
    """{config} of a RepDistiller VGG name ('vgg13'), else None."""
    return {"config": CONFIGS[name]} if name in CONFIGS else None


def group_end_bns(model: CifarVGG, params: dict, with_stem: bool) -> list[dict]:
    """RepDistiller's `get_bn_before_relu`: each group's last BN, after block 0's when
    `with_stem`."""
    first = 0 if with_stem else 1
    return [
        params[f"block{b}_bn{len(model.config[b]) - 1}"] for b in range(first, model.num_groups + 1)
    ]
