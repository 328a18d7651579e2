"""PyTorch state_dict layouts of RepDistiller's (and mdistiller's) CIFAR ResNets and VGGs, and of
the DFA authors' ShuffleNetV2 (PkuDavidGuan/Distillation, `shufflenetV2.py`).

ResNet (`models.CifarResNet`): `conv1`, `bn1`, `layer{g}.{j}.{conv1,bn1,conv2,bn2}`,
`layer{g}.{j}.downsample.{0,1}` (conv, BN), `fc` <-> `conv1`, `bn1`, `layer{g}_{j}/{...,
downsample_conv, downsample_bn}`, `fc`. VGG (`models.CifarVGG`): `block{b}.{3k}` (conv with bias),
`block{b}.{3k+1}` (BN), `classifier` <-> `block{b}_conv{k}`, `block{b}_bn{k}`, `classifier`.
ShuffleNetV2 (`models.ShuffleNetV2`, every conv with a bias): `pre.{0,1}` (stem conv, BN),
`stage{s}.{j}.residual.{1,2,4,5,6,7}`, `stage{s}.0.shortcut.{1,2,3,4}`, `conv5.{1,2}`, `fc` <->
`conv1`, `bn1`, `stage{s}_unit{j}/residual_{conv1,bn1,dwconv,bn2,conv2,bn3}`,
`stage{s}_unit0/shortcut_{dwconv,bn1,conv,bn2}`, `conv5`, `bn5`, `fc`.
`interop.from_torch` / `interop.to_torch` convert with these tables (this module stays below
`interop`: it lists tensors and imports no converter).
"""

from __future__ import annotations

import functools
import re

from dfa_jax import interop_core as core

_BN_LEAVES = (
    ("weight", ("params", "scale")),
    ("bias", ("params", "bias")),
    ("running_mean", ("batch_stats", "mean")),
    ("running_var", ("batch_stats", "var")),
)

# The DFA authors' ShuffleUnit: (branch, ((index in its nn.Sequential, our module suffix), ...)),
# in their registration order (a stride-2 unit's `residual` before its `shortcut`). A stride-1
# unit's shortcut is a bare ReLU: no such Flax module, so `layout` skips it.
_SHUFFLE_UNIT_BRANCHES = (
    ("residual", ((1, "conv1"), (2, "bn1"), (4, "dwconv"), (5, "bn2"), (6, "conv2"), (7, "bn3"))),
    ("shortcut", ((1, "dwconv"), (2, "bn1"), (3, "conv"), (4, "bn2"))),
)


def _modules(model) -> list[tuple[str, tuple[str, ...], str]]:
    """(torch module, Flax module path, kind in 'conv' / 'bn' / 'dense') in PyTorch's order."""
    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    modules = []
    if isinstance(model, models.CifarResNet):
        modules += [("conv1", ("conv1",), "conv"), ("bn1", ("bn1",), "bn")]
        for g in range(1, model.num_groups + 1):
            for j in range(model.blocks_per_group):
                torch_block, flax_block = f"layer{g}.{j}", f"layer{g}_{j}"
                for part, kind in (("conv1", "conv"), ("bn1", "bn"), ("conv2", "conv")):
                    modules.append((f"{torch_block}.{part}", (flax_block, part), kind))
                modules.append((f"{torch_block}.bn2", (flax_block, "bn2"), "bn"))
                modules.append(
                    (f"{torch_block}.downsample.0", (flax_block, "downsample_conv"), "conv")
                )
                modules.append((f"{torch_block}.downsample.1", (flax_block, "downsample_bn"), "bn"))
        modules.append(("fc", ("fc",), "dense"))
    elif isinstance(model, models.CifarVGG):
        for b, widths in enumerate(model.config):
            for k in range(len(widths)):
                modules.append((f"block{b}.{3 * k}", (f"block{b}_conv{k}",), "conv"))
                modules.append((f"block{b}.{3 * k + 1}", (f"block{b}_bn{k}",), "bn"))
        modules.append(("classifier", ("classifier",), "dense"))
    elif isinstance(model, models.ShuffleNetV2):
        from dfa_jax.models import shufflenet_v2  # pylint: disable=g-import-not-at-top

        modules += [("pre.0", ("conv1",), "conv"), ("pre.1", ("bn1",), "bn")]
        for s, units in enumerate(shufflenet_v2.STAGE_UNITS, start=2):
            for j in range(units):
                torch_unit, flax_unit = f"stage{s}.{j}", f"stage{s}_unit{j}"
                for branch, parts in _SHUFFLE_UNIT_BRANCHES:
                    for index, part in parts:
                        kind = "bn" if part.startswith("bn") else "conv"
                        flax_module = (flax_unit, f"{branch}_{part}")
                        modules.append((f"{torch_unit}.{branch}.{index}", flax_module, kind))
        modules += [("conv5.1", ("conv5",), "conv"), ("conv5.2", ("bn5",), "bn")]
        modules.append(("fc", ("fc",), "dense"))
    else:
        raise TypeError(f"no PyTorch layout for {type(model).__name__}")
    return modules


@functools.lru_cache(maxsize=32)
def layout(name: str, num_classes: int) -> tuple[tuple, ...]:
    """Every tensor of model `name` in PyTorch's state_dict order, as (PyTorch key, Flax path
    (collection first), kind: 'conv' / 'dense' / 'vector', Flax shape): what the Flax model has."""
    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    model = models.get_model(name, num_classes)
    leaves = core.abstract_leaf_shapes(model)
    entries = []
    for torch_module, flax_module, kind in _modules(model):
        if kind == "bn":
            pairs = [(t, (c, *flax_module, f)) for t, (c, f) in _BN_LEAVES]
            kinds = ["vector"] * 4
        else:
            pairs = [("weight", ("params", *flax_module, "kernel"))]
            kinds = [kind]
            if ("params", *flax_module, "bias") in leaves:
                pairs.append(("bias", ("params", *flax_module, "bias")))
                kinds.append("vector")
        if pairs[0][1] not in leaves:  # A block without a downsample, a unit without a shortcut.
            continue
        for (torch_leaf, path), leaf_kind in zip(pairs, kinds):
            entries.append((f"{torch_module}.{torch_leaf}", path, leaf_kind, leaves[path]))
    core.check_layout_covers([e[1] for e in entries], leaves, f"the PyTorch layout of {name}")
    return tuple(entries)


def infer_name(shapes: dict) -> tuple[str, int] | None:
    """(model name, num_classes) that PyTorch state_dict shapes (key -> shape) look like among
    these families' presets, or None."""
    from dfa_jax.models import (  # pylint: disable=g-import-not-at-top
        cifar_resnet,
        cifar_vgg,
        shufflenet_v2,
    )

    try:
        if "pre.0.weight" in shapes and "fc.weight" in shapes:
            widths = (int(shapes["stage2.0.shortcut.3.weight"][0]) * 2, int(shapes["fc.weight"][1]))
            names = {(w[0], w[3]): f"shufflenet_v2_{r}" for r, w in shufflenet_v2.WIDTHS.items()}
            return (names[widths], int(shapes["fc.weight"][0])) if widths in names else None
        if "fc.weight" in shapes and "conv1.weight" in shapes:
            blocks = {int(m[1]) for k in shapes if (m := re.match(r"layer1\.(\d+)\.", k))}
            key = (6 * len(blocks) + 2, int(shapes["conv1.weight"][0]))
            names = {(d, w[0]): n for n, (d, w) in cifar_resnet.PRESETS.items()}
            return (names[key], int(shapes["fc.weight"][0])) if key in names else None
        if "classifier.weight" in shapes:
            layers = tuple(
                len({int(m[1]) for k in shapes if (m := re.match(rf"block{b}\.(\d+)\.", k))}) // 2
                for b in range(5)
            )
            names = {tuple(len(c) for c in cfg): n for n, cfg in cifar_vgg.CONFIGS.items()}
            return (names[layers], int(shapes["classifier.weight"][0])) if layers in names else None
    except (IndexError, KeyError, TypeError, ValueError):
        return None
    return None
