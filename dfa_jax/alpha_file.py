"""The 'file' aggregation's alpha.json (DFA-T: an alpha searched in another run), read and checked
against a teacher's feature groups. Below the stages: the config's checks read it before
anything trains, and the distillation reads it to freeze its alpha."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from absl import logging

from dfa_jax import errors
from dfa_jax import files
from dfa_jax import models

AlphaFileError = errors.AlphaFileError

NAME = "alpha.json"  # A search's alpha, in its workdir.


def load(path: str, teacher_model) -> list[np.ndarray]:
    """Per group, alpha [N_i] from an alpha.json, checked against the teacher's feature groups.

    Raises `AlphaFileError` naming the file and what is wrong: unreadable or not JSON, keys
    missing, another group layout, or an alpha that is not non-negative weights summing to 1.
    A file whose `teacher` names another architecture with this teacher's layout (another width,
    say) loads with a warning naming both: reusing an alpha across teachers may be the intent.
    """
    fix = "use the alpha.json a search with this teacher architecture wrote (WORKDIR/alpha.json)"
    try:
        text = files.read_text(path)
    except OSError as e:
        raise AlphaFileError(f"alpha file {path} cannot be read ({e}); {fix}.") from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise AlphaFileError(f"alpha file {path} is not valid JSON ({e}); {fix}.") from None
    if not isinstance(record, dict) or not isinstance(record.get("groups"), list):
        raise AlphaFileError(
            f"alpha file {path} has no 'groups' list (expected {{'teacher': ..., 'groups':"
            " [{'layers': [...], 'alpha': [...]}, ...]}); " + fix + "."
        )
    for i, group in enumerate(record["groups"]):
        for key in ("layers", "alpha"):
            if not isinstance(group, dict) or not isinstance(group.get(key), list):
                raise AlphaFileError(
                    f"alpha file {path}: group {i + 1} has no {key!r} list; {fix}."
                )
    groups = teacher_model.feature_groups()
    found = [tuple(g["layers"]) for g in record["groups"]]
    if len(found) != len(groups):
        raise AlphaFileError(
            f"{path} (searched with teacher {record.get('teacher')!r}) has {len(found)} groups"
            f" but this run's teacher ({_describe(teacher_model)}) has {len(groups)}; use an"
            " alpha.json searched with this teacher architecture."
        )
    for i, (want, got) in enumerate(zip(groups, found)):
        if tuple(want) != got:
            raise AlphaFileError(
                f"{path} (searched with teacher {record.get('teacher')!r}): group {i + 1}"
                f" aggregates layers {list(got)} but this run's teacher"
                f" ({_describe(teacher_model)}) has {list(want)} in group {i + 1}; use an"
                " alpha.json searched with this teacher."
            )
    alphas = []
    for i, group in enumerate(record["groups"]):
        alpha = group["alpha"]
        where = f"alpha file {path}: group {i + 1}'s alpha {alpha}"
        if len(alpha) != len(group["layers"]) or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in alpha
        ):
            raise AlphaFileError(
                f"{where} must hold one number per layer ({len(group['layers'])}); {fix}."
            )
        alpha = np.asarray(alpha, np.float64)
        if not np.all(np.isfinite(alpha)) or alpha.min() < 0 or abs(alpha.sum() - 1) > 1e-3:
            raise AlphaFileError(
                f"{where} (sum {alpha.sum():.4g}) must be non-negative weights summing to 1 (a"
                f" softmax of the group's beta); {fix}."
            )
        alphas.append(alpha.astype(np.float32))
    searched_with = record.get("teacher")
    if isinstance(searched_with, str) and not _is_architecture(teacher_model, searched_with):
        logging.warning(
            "alpha file %s was searched with teacher %r, but this run's teacher is %s: its"
            " alpha is used as it is (fine if meant, e.g. DFA-T with another teacher).",
            path,
            searched_with,
            _describe(teacher_model),
        )
    return alphas


def _is_architecture(model, name: str) -> bool:
    """Whether model `name` would be built as `model` (class and architecture fields alike)."""
    family = models.family_of(name)
    return (
        family is not None
        and models.family_of(model) is family
        and all(getattr(model, k, None) == v for k, v in family.parse(name).items())
    )


def _describe(model) -> str:
    """A model's name where a preset matches it, else its class and architecture fields."""
    family = models.family_of(model)
    for name in family.presets if family is not None else ():
        if _is_architecture(model, name):
            return repr(name)
    fields = ", ".join(
        f"{f.name}={getattr(model, f.name)!r}"
        for f in dataclasses.fields(model)
        if f.name not in ("num_classes", "dtype", "parent", "name")
    )
    return f"{type(model).__name__}({fields})"
