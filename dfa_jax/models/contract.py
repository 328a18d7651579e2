"""What a model must provide to be distilled and searched here, checked without a compile.

`problems(model)` lists, in words a user can act on, every part of the feature contract
(`models.FeatureModel`, see the package docstring) a Linen module lacks: a missing method, a
`__call__` without `start_group`/`stop_group`, a named map that is never sown (or sown twice),
groups whose maps differ in shape, a forward that does not stop at or resume from a group
boundary. Everything runs under `jax.eval_shape`: abstract shapes, no FLOPs, no compile; so a
forward that stops at a map of the right shape but the wrong place is not caught here.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from dfa_jax.models.layers import FEATURES

# The contract's methods, with what each returns (for the messages).
_METHODS = {
    "feature_groups": "per group, the sown names of its candidate maps (the last: its boundary)",
    "extra_feature_names": "the sown names outside every group (may be empty)",
    "stem_features": "(pre-ReLU, raw) sown names of a stem outside the groups, or None",
    "raw_group_ends": "per group, the sown name of its raw output (before a consuming BN)",
}


def _sown(model, image_size: int) -> tuple[dict, tuple, bool]:
    """{name: (times sown, shape)} of a train-mode forward, the logits' shape, and whether
    `init` sowed maps too (its variables then carry them into every `apply`)."""
    x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)

    at_init = []  # Python values out of the trace.

    def forward(x):
        variables = model.init(jax.random.key(0), x)
        at_init.append(FEATURES in variables)
        logits, mutated = model.apply(
            {k: v for k, v in variables.items() if k != FEATURES},
            x,
            train=True,
            mutable=["batch_stats", FEATURES],
        )
        return logits, mutated.get(FEATURES, {})

    logits, sown = jax.eval_shape(forward, x)
    shapes = {name: (len(entry), tuple(entry[0].shape)) for name, entry in sown.items()}
    return shapes, logits.shape, at_init[0]


def _forward_problems(model, boundary_shapes: list, image_size: int, logits_shape) -> list[str]:
    """Whether `stop_group=g` returns group g's boundary and `start_group=g` resumes from it."""
    problems = []
    x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    for g, shape in enumerate(boundary_shapes, start=1):
        try:
            stopped = jax.eval_shape(
                lambda v, x, g=g: model.apply(v, x, stop_group=g), variables, x
            )
        except Exception as e:  # noqa: BLE001 (the user's model: report whatever it raised)
            problems.append(f"__call__(x, stop_group={g}) raised {type(e).__name__}: {e}")
            continue
        if tuple(stopped.shape) != shape:
            problems.append(
                f"__call__(x, stop_group={g}) returns shape {tuple(stopped.shape)}, not group"
                f" {g}'s boundary map {shape}: return the group's last map (pre-ReLU) there."
            )
            continue
        if g == len(boundary_shapes):
            continue  # Nothing to resume after the last group but the head.
        try:
            resumed = jax.eval_shape(
                lambda v, b, g=g: model.apply(v, b, start_group=g), variables, stopped
            )
        except Exception as e:  # noqa: BLE001
            problems.append(
                f"__call__(boundary, start_group={g}) raised {type(e).__name__}: {e}; it must"
                f" resume the forward from group {g}'s boundary map."
            )
            continue
        if tuple(resumed.shape) != tuple(logits_shape):
            problems.append(
                f"__call__(boundary, start_group={g}) returns shape {tuple(resumed.shape)}, not"
                f" the logits' {tuple(logits_shape)}."
            )
    return problems


def problems(model, image_size: int = 32) -> list[str]:
    """Every part of the feature contract `model` (a Linen module) lacks; [] if it keeps it."""
    kind = type(model).__name__
    missing = [name for name in _METHODS if not callable(getattr(model, name, None))]
    found = [f"{kind} has no {name}(): it must return {_METHODS[name]}." for name in missing]
    if not isinstance(getattr(type(model), "num_groups", None), property) and not isinstance(
        getattr(model, "num_groups", None), int
    ):
        found.append(f"{kind} has no num_groups (an int property: how many groups it has).")
    try:
        params = inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):
        params = {}
    for arg in ("train", "start_group", "stop_group"):
        if arg not in params:
            found.append(
                f"{kind}.__call__ takes no {arg!r}: the contract's forward is __call__(x,"
                " train=False, start_group=0, stop_group=None)."
            )
    if found:
        return found  # The checks below need the whole interface.

    groups = [tuple(names) for names in model.feature_groups()]
    raw = tuple(model.raw_group_ends())
    stem = model.stem_features()
    if model.num_groups != len(groups):
        found.append(
            f"{kind}.num_groups = {model.num_groups} but feature_groups() has {len(groups)}."
        )
    if len(raw) != len(groups):
        found.append(
            f"{kind}.raw_group_ends() names {len(raw)} maps for {len(groups)} groups: one per group."
        )
    if any(not names for names in groups):
        found.append(f"{kind}.feature_groups() has an empty group: each needs at least one map.")
    try:
        sown, logits_shape, at_init = _sown(model, image_size)
    except Exception as e:  # noqa: BLE001 (the user's model: report whatever it raised)
        return found + [
            f"{kind}'s forward on a [2, {image_size}, {image_size}, 3] batch raised {e}"
        ]
    if at_init:
        found.append(
            f"{kind} sows its maps during init too, so `init`'s variables carry them into every"
            " apply: sow with models.sow_feature(self, name, x), which skips init."
        )
    if len(logits_shape) != 2 or logits_shape[0] != 2:
        found.append(f"{kind}'s forward returns shape {tuple(logits_shape)}: logits [B, classes].")
    named = [n for names in groups for n in names] + list(raw) + list(model.extra_feature_names())
    named += list(stem or ())
    for name in dict.fromkeys(named):
        if name not in sown:
            found.append(
                f"{kind} names the map {name!r} but never sows it: models.sow_feature(self,"
                f" {name!r}, x) where it is computed (sown: {sorted(sown)})."
            )
        elif sown[name][0] != 1:
            found.append(f"{kind} sows {name!r} {sown[name][0]} times per forward; sow it once.")
    for g, names in enumerate(groups, start=1):
        shapes = {sown[n][1] for n in names if n in sown}
        if len(shapes) > 1:
            found.append(
                f"{kind}'s group {g} maps {names} have shapes {sorted(shapes)}: a group's maps"
                " share one shape (the search weighs them into one target)."
            )
    if found:
        return found
    boundaries = [sown[names[-1]][1] for names in groups]
    return _forward_problems(model, boundaries, image_size, logits_shape)
