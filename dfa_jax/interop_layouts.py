"""PyTorch state_dict layouts of RepDistiller's (and mdistiller's) CIFAR ResNets and VGGs.

ResNet (`models.CifarResNet`): `conv1`, `bn1`, `layer{g}.{j}.{conv1,bn1,conv2,bn2}`,
`layer{g}.{j}.downsample.{0,1}` (conv, BN), `fc` <-> `conv1`, `bn1`, `layer{g}_{j}/{...,
downsample_conv, downsample_bn}`, `fc`. VGG (`models.CifarVGG`): `block{b}.{3k}` (conv with bias),
`block{b}.{3k+1}` (BN), `classifier` <-> `block{b}_conv{k}`, `block{b}_bn{k}`, `classifier`.
`interop.from_torch` / `interop.to_torch` convert with these tables (this module stays below
`interop`: it lists tensors and imports no converter).
"""

from __future__ import annotations

import functools
import re

_BN_LEAVES = (
    ("weight", ("params", "scale")),
    ("bias", ("params", "bias")),
    ("running_mean", ("batch_stats", "mean")),
    ("running_var", ("batch_stats", "var")),
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
    else:
        raise TypeError(f"no PyTorch layout for {type(model).__name__}")
    return modules


@functools.lru_cache(maxsize=32)
def layout(name: str, num_classes: int) -> tuple[tuple, ...]:
    """Every tensor of model `name` in PyTorch's state_dict order, as (PyTorch key, Flax path
    (collection first), kind: 'conv' / 'dense' / 'vector', Flax shape): what the Flax model has."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    model = models.get_model(name, num_classes)
    abstract = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 3), jnp.float32),
    )
    leaves = {
        tuple(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            {"params": abstract["params"], "batch_stats": abstract["batch_stats"]}
        )
    }
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
        if pairs[0][1] not in leaves:  # A block without a downsample.
            continue
        for (torch_leaf, path), leaf_kind in zip(pairs, kinds):
            entries.append((f"{torch_module}.{torch_leaf}", path, leaf_kind, leaves[path]))
    # Every Flax leaf mapped exactly once: guards the table against a change of the model.
    mapped = [e[1] for e in entries]
    if sorted(mapped) != sorted(leaves):
        raise RuntimeError(
            f"the PyTorch layout of {name} is out of date with its Flax model: unmapped"
            f" {sorted(set(leaves) - set(mapped))}, unknown {sorted(set(mapped) - set(leaves))}"
        )
    return tuple(entries)


def infer_name(shapes: dict) -> tuple[str, int] | None:
    """(model name, num_classes) that PyTorch state_dict shapes (key -> shape) look like among
    these families' presets, or None."""
    from dfa_jax.models import cifar_resnet, cifar_vgg  # pylint: disable=g-import-not-at-top

    try:
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
    except (IndexError, TypeError, ValueError):
        return None
    return None
