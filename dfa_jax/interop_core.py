"""What every converter between PyTorch state_dicts and dfa_jax variables shares: the error, the
tensor entry of a layout, the shape check naming the first problem, state_dict unwrapping.

`interop` (Wide ResNets, the command line, the per-family dispatch) and `interop_mobile`
(RepDistiller's MobileNetV2, ShuffleV1, ShuffleV2, ResNet50) build on it; `interop` re-exports
its names. Importing it never imports PyTorch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from dfa_jax import errors

TORCH_INSTALL = "pip install 'dfa_jax[torch]'"


# Checkpoint dicts that hold the state_dict one level down (overhaul: 'model', RepDistiller:
# 'model', common trainers: 'state_dict' / 'net'), tried in this order.
NESTED_KEYS = ("state_dict", "model", "net")


DATA_PARALLEL_PREFIX = "module."
# What wrapping a model adds to every key of its state_dict: DataParallel / DistributedDataParallel
# ('module.') and torch.compile ('_orig_mod.'), in any nesting.
WRAPPER_PREFIXES = (DATA_PARALLEL_PREFIX, "_orig_mod.")


# How many further problems a shape-mismatch message lists after the first.
_MORE_PROBLEMS_SHOWN = 3
# How many key prefixes a message about prefixes lists.
_PREFIXES_SHOWN = 5


class InteropError(errors.InputError):
    """A state_dict or variables tree that does not fit the requested model, or an unsafe
    or unreadable file (a ValueError, like every user-fixable error of dfa_jax)."""


def import_torch():
    """Returns the `torch` module, or raises ImportError saying how to install it."""
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(f"this needs PyTorch; install it with: {TORCH_INSTALL}") from e
    return torch


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor: its PyTorch key and shape, its Flax path (collection first) and shape."""

    torch_key: str
    flax_path: tuple[str, ...]
    kind: str  # 'conv' (OIHW <-> HWIO), 'dense' ((out, in) <-> (in, out)) or 'vector'.
    flax_shape: tuple[int, ...]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        s = self.flax_shape
        if self.kind == "conv":
            return (s[3], s[2], s[0], s[1])
        if self.kind == "dense":
            return (s[1], s[0])
        return s

    @property
    def flax_key(self) -> str:
        return "/".join(self.flax_path)


def abstract_leaf_shapes(model) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every variable leaf of a Flax `model` for [1, 32, 32, 3] inputs, (collection, *modules,
    leaf) -> shape. Shapes only: the Flax model is the authority on what exists, nothing runs."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    abstract = jax.eval_shape(
        lambda key, x: model.init(key, x, train=False),
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 3), jnp.float32),
    )
    return {
        tuple(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            {"params": abstract["params"], "batch_stats": abstract["batch_stats"]}
        )
    }


def check_layout_covers(mapped, leaves, what: str) -> None:
    """Every Flax leaf mapped exactly once: guards a hand-written layout table against a change
    of the model it describes (a RuntimeError, the project's fault, not the user's)."""
    if sorted(mapped) != sorted(leaves):
        raise RuntimeError(
            f"{what} is out of date with its Flax model: unmapped"
            f" {sorted(set(leaves) - set(mapped))}, unknown {sorted(set(mapped) - set(leaves))}"
        )


def _check(given: Mapping[str, tuple], expected: Mapping[str, tuple], what: str, hint: str):
    """Raises InteropError naming the first key of `given` (then the first missing key of
    `expected`) that is unexpected or wrongly shaped. Both map names to shapes, in order."""
    problems = []
    for key, shape in given.items():
        if shape is None:
            problems.append(f"key {key!r} holds no array")
        elif key not in expected:
            problems.append(f"unexpected key {key!r} of shape {shape} ({what} has no such tensor)")
        elif shape != expected[key]:
            problems.append(f"key {key!r} has shape {shape}, expected {expected[key]}")
    for key, shape in expected.items():
        if key not in given:
            problems.append(f"missing key {key!r}, expected shape {shape}")
    if problems:
        more = problems[1 : 1 + _MORE_PROBLEMS_SHOWN]
        rest = len(problems) - 1 - len(more)
        tail = f" Then: {'; '.join(more)}" if more else ""
        tail += f"; and {rest} more." if rest > 0 else ("." if more else "")
        raise InteropError(f"the weights do not fit {what}: {problems[0]}.{tail}{hint}")


def _shape(value) -> tuple | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def _to_float32(value) -> np.ndarray:
    """A torch tensor, jax or numpy array as a float32 numpy array (a copy, C-contiguous)."""
    if type(value).__module__.startswith("torch"):
        # .float() first: numpy has no bfloat16, and the values become float32 anyway.
        value = value.detach().cpu().float().numpy()
    return np.array(value, dtype=np.float32, copy=True)


def unwrap_state_dict(checkpoint: Any, prefix: str | None = None) -> dict[str, Any]:
    """The bare state_dict of a checkpoint: descends into 'state_dict' / 'model' / 'net', strips
    the prefixes wrappers add ('module.', '_orig_mod.'), drops BatchNorm's 'num_batches_tracked'
    counters.

    `prefix` selects the tensors under it (e.g. 'student.' of a distiller's whole state_dict,
    mdistiller's 'module.student.'), with the prefix removed; it is matched against the keys as
    saved and, failing that, against the keys with their wrapper prefixes stripped. The trailing
    dot may be left out.
    """
    state = checkpoint
    for _ in range(len(NESTED_KEYS) + 1):
        if not isinstance(state, Mapping):
            raise InteropError(
                f"expected a state_dict (a dict of tensors), found a {type(state).__name__}"
            )
        nested = next((k for k in NESTED_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = state[nested]
    if prefix:
        # PyTorch's module paths are dotted: 'student' means the module 'student.'.
        state = _select_prefix(state, prefix if prefix.endswith(".") else prefix + ".")
    state = _strip_wrapper_prefixes(state)
    return {k: v for k, v in state.items() if not str(k).endswith("num_batches_tracked")}


def _strip_wrapper_prefixes(state: Mapping) -> dict:
    state = dict(state)
    while state:
        shared = next(
            (p for p in WRAPPER_PREFIXES if all(str(k).startswith(p) for k in state)), None
        )
        if shared is None:
            break
        state = {k[len(shared) :]: v for k, v in state.items()}
    return state


def _select_prefix(state: Mapping, prefix: str) -> dict:
    for keys in (dict(state), _strip_wrapper_prefixes(state)):
        selected = {k[len(prefix) :]: v for k, v in keys.items() if str(k).startswith(prefix)}
        if selected:
            return selected
    heads = sorted({k.split(".", 1)[0] + "." for k in map(str, _strip_wrapper_prefixes(state))})
    shown = ", ".join(repr(h) for h in heads[:_PREFIXES_SHOWN])
    more = f" and {len(heads) - _PREFIXES_SHOWN} more" if len(heads) > _PREFIXES_SHOWN else ""
    raise InteropError(
        f"no key of the state_dict starts with the prefix {prefix!r}; its keys start with"
        f" {shown}{more}: give one of those as the prefix"
    )


def prefix_hint(keys, expected) -> str:
    """A sentence naming the prefix a state_dict's networks sit under, or ''.

    Every key of `keys` under one prefix that no key of `expected` starts with (e.g. a Lightning
    module's 'model.'): that prefix. Keys under several such prefixes: those under which the keys
    start like `expected`'s (a distiller's 'student.' and 'teacher.').
    """
    if not keys or any("." not in k for k in keys):
        return ""
    known = {k.split(".", 1)[0] for k in expected}
    under: dict[str, set] = {}
    for key in keys:
        head, rest = key.split(".", 1)
        under.setdefault(head, set()).add(rest.split(".", 1)[0])
    if under.keys() & known:
        return ""  # The keys start like the model's: the mismatch itself is the message.
    if len(under) == 1:
        (head,) = under
        return (
            f" Every key starts with {head + '.'!r}: select the tensors under it with"
            f" prefix={head + '.'!r} (the command line's --prefix {head}.)."
        )
    networks = [repr(h + ".") for h in sorted(under) if under[h] & known]
    if not networks:
        return ""
    return (
        f" The keys under {', '.join(networks)} start like the model's: select one with"
        f" prefix={networks[0]} (the command line's --prefix {networks[0][1:-1]})."
    )


def _flax_leaves(variables: Mapping) -> dict[str, Any]:
    """'params/block1_layer0/conv1/kernel' -> leaf, for the 'params' and 'batch_stats' trees."""
    import jax  # pylint: disable=g-import-not-at-top

    if not isinstance(variables, Mapping) or "params" not in variables:
        raise InteropError("expected Flax variables {'params', 'batch_stats'}")
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def entries_from_torch(entries, state_dict: Any, what: str, hint) -> dict:
    """`state_dict` -> Flax variables by the layout `entries`; `what` names the model in
    messages, `hint` (a str, or shapes -> str) says what the weights look like instead."""
    state = unwrap_state_dict(state_dict)
    shapes = {str(k): _shape(v) for k, v in state.items()}
    expected = {e.torch_key: e.torch_shape for e in entries}
    if shapes != expected:  # Only a mismatch needs the (possibly costly) hint.
        hint = prefix_hint(shapes, expected) or (hint(shapes) if callable(hint) else hint)
        _check(shapes, expected, what, hint)
    variables: dict = {"params": {}, "batch_stats": {}}
    for e in entries:
        value = _to_float32(state[e.torch_key])
        if e.kind == "conv":
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif e.kind == "dense":
            value = value.T  # (out, in) -> (in, out)
        node = variables
        for part in e.flax_path[:-1]:
            node = node.setdefault(part, {})
        node[e.flax_path[-1]] = np.ascontiguousarray(value)
    return variables


def entries_to_torch(entries, variables: Mapping, what: str, hint) -> dict:
    """Flax variables -> a state_dict by the layout `entries` (`what`, `hint`: as in
    `entries_from_torch`)."""
    leaves = _flax_leaves(variables)
    # Flax trees flatten alphabetically; checking in the model's order names the first bad
    # tensor of the network (unknown paths last).
    order = {e.flax_key: i for i, e in enumerate(entries)}
    shapes = {k: _shape(leaves[k]) for k in sorted(leaves, key=lambda k: order.get(k, len(order)))}
    expected = {e.flax_key: e.flax_shape for e in entries}
    if shapes != expected:
        _check(shapes, expected, what, hint(shapes) if callable(hint) else hint)
    try:
        torch = import_torch()
    except ImportError:
        torch = None
    state: dict[str, Any] = {}
    for e in entries:
        value = _to_float32(leaves[e.flax_key])
        if e.kind == "conv":
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif e.kind == "dense":
            value = value.T
        state[e.torch_key] = np.ascontiguousarray(value)
        if e.torch_key.endswith(".running_var"):
            counter = e.torch_key.removesuffix("running_var") + "num_batches_tracked"
            state[counter] = np.zeros((), np.int64)
    if torch is not None:
        state = {k: torch.from_numpy(v) for k, v in state.items()}
    return state
