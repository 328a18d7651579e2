"""The one reader of the models' sown pre-ReLU features.

Models `sow` every block's pre-ReLU output into the `models.FEATURES` collection under flat names
(`g{i}_b{j}`, see `Model.feature_groups()`). Everything else in the package gets features through
this module, so the bookkeeping (one entry per name, clamping, group layout) lives in one place.
"""

from __future__ import annotations

import functools

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from dfa_jax import models


def read(mutated: Mapping, names: Sequence[str]) -> list[jax.Array]:
    """Returns the sown maps `names` from the variables `apply(..., mutable=[FEATURES])` returned.

    Raises a KeyError naming the missing feature, and a ValueError if a name was sown more than once
    (which happens if a collection is fed back into `apply`, growing it and recompiling each step).
    """
    collection = mutated[models.FEATURES]
    out = []
    for name in names:
        if name not in collection:
            raise KeyError(f"feature {name!r} was not sown; sown: {sorted(collection)}")
        entry = collection[name]
        if len(entry) != 1:
            raise ValueError(
                f"feature {name!r} was sown {len(entry)} times; expected once per apply"
            )
        out.append(entry[0])
    return out


def clamp(x: jax.Array, clamp_min: float | None) -> jax.Array:
    """`max(x, clamp_min)`: the paper keeps pre-ReLU values no smaller than -1 (§3.4)."""
    return x if clamp_min is None else jnp.maximum(x, clamp_min)


def shapes_of(model, names: Sequence[str], image_size: int = 32) -> list[tuple[int, ...]]:
    """The shapes [1, H, W, C] of the sown maps `names` (no compile, no FLOPs)."""
    sown = _sown_shapes(model, image_size)
    # `read`'s checks (a name not sown, or sown more than once), on the shapes.
    read({models.FEATURES: {name: (None,) * len(entry) for name, entry in sown.items()}}, names)
    return [sown[name][0] for name in names]


# Every stage and validate() ask for the same models' shapes many times, for different names;
# each trace runs the whole model in Python (seconds for a deep network on a small CPU), so one
# trace per model records every map. Models are frozen dataclasses: hashable, equal by fields.
@functools.lru_cache(maxsize=64)
def _sown_shapes(model, image_size: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{sown name: the shape of each time it was sown} of one forward at batch 1."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)

    def forward(x):
        variables = model.init(jax.random.key(0), x)
        _, mutated = model.apply(variables, x, mutable=[models.FEATURES])
        return mutated[models.FEATURES]

    sown = jax.eval_shape(forward, x)
    return {name: tuple(tuple(s.shape) for s in entry) for name, entry in sown.items()}


def group_shapes(model, image_size: int = 32) -> list[tuple[int, ...]]:
    """Per group, the shape [1, H, W, C] shared by all its candidate maps."""
    return shapes_of(model, [names[-1] for names in model.feature_groups()], image_size)
