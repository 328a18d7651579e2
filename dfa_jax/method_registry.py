"""The distillation methods a run can train: one `Method` line each, in Table 2's column order.

A line names the method (`distill.method`, its students' `distill/<name>` stages), its header in
the report, where its implementation lives (`"module:attribute"` of a `methods.Implementation`:
helpers, loss, first stage, config checks) and the `baselines` fields it brings. The line is all
the config, the pipeline and the report need to know: `config_lib.METHODS`, the labels
`distill.compare_with` accepts, the report's Table 2 columns and the checks `validate` runs all
come from here. Implementations are imported on first use, so this module (and with it
`config_lib` and `report`) imports no JAX. docs/design.md, "Adding a method", works an example.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Method:
    """One distillation method, as the config, the pipeline and the report see it."""

    name: str  # `distill.method`; its students train in `distill/<name>`.
    column: str  # Its header in the report's tables.
    implementation: str  # "module:attribute" of its `methods.Implementation`.
    # Its own `config.baselines` fields with their defaults (base_config adds them).
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # label -> header of the runs it trains under other labels than its name (DFA's aggregations,
    # its own name among them); empty: the name alone.
    variants: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def labels(self) -> tuple[str, ...]:
        """The run labels (`distill/<label>`) of its students."""
        return tuple(self.variants) or (self.name,)

    def load(self):
        """Its `methods.Implementation` (imports the module that holds it)."""
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds `method` after the registered ones; its name, labels and fields must be new."""
    taken = {label for m in REGISTRY.values() for label in m.labels}
    fields = {field for m in REGISTRY.values() for field in m.fields}
    clashes = [n for n in {method.name, *method.labels} if n in taken or n in REGISTRY]
    clashes += [f for f in method.fields if f in fields]
    if clashes:
        raise ValueError(f"method {method.name!r}: {sorted(clashes)} already registered")
    if ":" not in method.implementation:
        raise ValueError(
            f"method {method.name!r}: implementation {method.implementation!r} must read"
            " 'module:attribute'"
        )
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Removes the method `name` (tests that register one of their own)."""
    del REGISTRY[name]


def names() -> tuple[str, ...]:
    """Every method's name, in registry order (Table 2's columns)."""
    return tuple(REGISTRY)


def labels() -> tuple[str, ...]:
    """Every run label a student can have, in registry order."""
    return tuple(label for method in REGISTRY.values() for label in method.labels)


def method_of(label: str) -> str:
    """The method a run label trains (DFA for an aggregation label); an unknown label itself."""
    for method in REGISTRY.values():
        if label in method.labels:
            return method.name
    return label


def get(label: str) -> Method:
    """The method that trains run `label`; ValueError for a label no method trains."""
    name = method_of(label)
    if name not in REGISTRY:
        raise ValueError(f"no method trains {label!r}; registered: {labels()}")
    return REGISTRY[name]


def header(label: str) -> str:
    """The report's header of run `label`."""
    method = get(label)
    return method.variants.get(label, method.column)


def fields() -> dict[str, Any]:
    """Every method's own `baselines` fields with their defaults."""
    return {field: value for m in REGISTRY.values() for field, value in m.fields.items()}


for _method in (
    Method("none", "Student", "dfa_jax.methods.logits:NONE"),
    Method("kd", "KD", "dfa_jax.methods.logits:KD"),
    Method("fitnets", "FitNets", "dfa_jax.methods.feature_maps:FITNETS"),
    Method("at", "AT", "dfa_jax.methods.feature_maps:AT"),
    Method("jacobian", "Jacobian", "dfa_jax.methods.logits:JACOBIAN"),
    Method("ft", "FT", "dfa_jax.methods.feature_maps:FT"),
    Method("ab", "AB", "dfa_jax.methods.boundaries:AB"),
    Method("sp", "SP", "dfa_jax.methods.feature_maps:SP"),
    Method("margin", "Margin", "dfa_jax.methods.boundaries:MARGIN"),
    Method(
        "dfa",
        "DFA",
        "dfa_jax.methods.dfa:DFA",
        # Table 5's aggregations (`distill.aggregation`); 'file' is another run's alpha (DFA-T).
        variants={
            "dfa": "DFA",
            "last": "Last",
            "average": "Average",
            "random": "Random",
            "file": "DFA-T",
        },
    ),
):
    register(_method)
