"""RepDistiller's / mdistiller's MobileNetV2, ShuffleV1, ShuffleV2, ResNet50 <-> dfa_jax.

Their state_dict keys are module paths (`blocks.2.0.conv.3.weight`, `layer1.0.shortcut.1.bias`);
`dfa_jax.models.cifar_mobile` names each module by that path with '.' written '_', so a key maps
to a Flax leaf by rewriting the module path and the leaf (conv/linear `weight` -> `kernel`, BN
`weight`/`bias` -> `scale`/`bias` in params, `running_mean`/`running_var` -> `mean`/`var` in
batch_stats). Conv kernels OIHW <-> HWIO (grouped and depthwise alike: [O, I/groups, H, W] <->
[H, W, I/groups, O]), linear weights (out, in) <-> (in, out). Checkpoints may be bare or nested
('model' as both repositories save them), as `interop_core.unwrap_state_dict` reads them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from dfa_jax import interop_core as core
from dfa_jax.interop_core import InteropError, _Entry

NAMES = ("MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50")


def _torch_module(flax_module: tuple[str, ...]) -> str:
    """('blocks_2_0', 'conv_3') -> 'blocks.2.0.conv.3' (their module names have no '_')."""
    return ".".join(part.replace("_", ".") for part in flax_module)


@functools.lru_cache(maxsize=16)
def _layout(name: str, num_classes: int) -> tuple[_Entry, ...]:
    """Every tensor of model `name` in PyTorch's state_dict order (module creation order)."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    if name not in NAMES:
        raise InteropError(f"model {name!r} has no converter here; use one of {NAMES}")
    if num_classes < 1:
        raise InteropError(f"no {name} with {num_classes} classes")
    model = models.get_model(name, num_classes)
    order: list[tuple[str, ...]] = []

    def init(key, x):
        variables = model.init(key, x, train=False)
        # The traced dicts keep Flax's creation order (the result's are sorted): PyTorch's too.
        order.extend(_modules(variables["params"]))
        return variables

    abstract = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    params, stats = abstract["params"], abstract.get("batch_stats", {})
    entries = []
    for module in order:
        p = _get(params, module)
        torch_module = _torch_module(module)
        if "kernel" in p:
            shape = tuple(p["kernel"].shape)
            kind = "conv" if len(shape) == 4 else "dense"
            entries.append(
                _Entry(f"{torch_module}.weight", ("params", *module, "kernel"), kind, shape)
            )
            if "bias" in p:
                entries.append(
                    _Entry(
                        f"{torch_module}.bias",
                        ("params", *module, "bias"),
                        "vector",
                        tuple(p["bias"].shape),
                    )
                )
        else:
            s = _get(stats, module)
            for torch_leaf, collection, leaf, tree in (
                ("weight", "params", "scale", p),
                ("bias", "params", "bias", p),
                ("running_mean", "batch_stats", "mean", s),
                ("running_var", "batch_stats", "var", s),
            ):
                path = (collection, *module, leaf)
                entries.append(
                    _Entry(f"{torch_module}.{torch_leaf}", path, "vector", tuple(tree[leaf].shape))
                )
    # Every leaf mapped exactly once, or the rules above are out of date with the model.
    mapped = sorted(e.flax_path for e in entries)
    leaves = sorted(
        tuple(k.key for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path({"params": params, "batch_stats": stats})
    )
    if mapped != leaves:
        raise RuntimeError(f"interop_mobile's layout of {name} does not cover its variables")
    return tuple(entries)


def _modules(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the innermost modules (dicts of arrays) of a params tree, in its dict order."""
    if not any(isinstance(v, Mapping) for v in tree.values()):
        return [prefix]
    return [m for k, v in tree.items() if isinstance(v, Mapping) for m in _modules(v, (*prefix, k))]


def _get(tree: Mapping, path: tuple[str, ...]) -> Mapping:
    for part in path:
        tree = tree[part]
    return tree


def _what(name: str, num_classes: int, layout: str) -> str:
    return f"{name} with {num_classes} classes ({layout} layout)"


def convert_from_torch(state_dict: Any, name: str, num_classes: int, hint="") -> dict:
    """Their state_dict (bare or nested, optionally 'module.'-prefixed) -> `{'params',
    'batch_stats'}` of `models.get_model(name, num_classes)`, as float32 numpy arrays.

    `hint` (a str, or shapes -> str) ends a mismatch's message: what the weights look like
    (`interop.architecture_hint`, which knows every family).

    Raises:
      InteropError: a missing, unexpected or wrongly shaped key (the first one is named).
    """
    entries = _layout(name, num_classes)
    what = _what(name, num_classes, "PyTorch")
    return core.entries_from_torch(entries, state_dict, what, hint)


def convert_to_torch(variables: Mapping, name: str, num_classes: int) -> dict:
    """`{'params', 'batch_stats'}` -> their state_dict, keys in their module order, with each
    BatchNorm's `num_batches_tracked` (0) so that `load_state_dict(strict=True)` accepts it.
    Values are torch tensors when torch imports, else numpy arrays.

    Raises:
      InteropError: a missing, unexpected or wrongly shaped leaf (the first one is named).
    """
    entries = _layout(name, num_classes)
    return core.entries_to_torch(entries, variables, _what(name, num_classes, "Flax"), "")


def guesses(shapes: Mapping[str, tuple]) -> list[tuple[str, int]]:
    """(name, num_classes) of each of these models whose head (the modules after the feature
    body, classifier last) PyTorch shapes (key -> shape) hold: candidates, not yet checked
    against the whole layout."""
    from dfa_jax.models import cifar_mobile  # pylint: disable=g-import-not-at-top

    found = []
    for name in NAMES:
        heads = [_torch_module((head,)) for head in cifar_mobile.HEADS[name]]
        classifier = shapes.get(f"{heads[-1]}.weight")
        if all(f"{h}.weight" in shapes for h in heads) and classifier and len(classifier) == 2:
            found.append((name, int(classifier[0])))
    return found


CONVERTERS = {name: (convert_from_torch, convert_to_torch) for name in NAMES}
"""Family name -> (from_torch, to_torch), each `(tree, name, num_classes)`."""
