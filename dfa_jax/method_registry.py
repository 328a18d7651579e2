"""The distillation methods a run can train: one `Method` line each, in Table 2's column order.

A line names the method (`distill.method`, its students' `distill/<name>` stages), its header in
the report, where its implementation lives (`"module:attribute"` of a `methods.Implementation`:
helpers, loss, first stage, config checks) and the `baselines` fields it brings. The line is all
the config, the pipeline and the report need to know: `config_lib.METHODS`, the labels
`distill.compare_with` accepts, the report's Table 2 columns (and the logit table's, for the
later logit baselines the paper has no column for) and the checks `validate` runs all
come from here. Implementations are imported on first use, so this module (and with it
`config_lib` and `report`) imports no JAX. docs/design.md, "Adding a method", works an example.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Unset:
    """A field's default that is no value: None, which the command line may set to a `kind`
    (`base_config` makes it an ml_collections placeholder; e.g. DKD's beta, None = the pair's)."""

    kind: type


def default_value(default: Any) -> Any:
    """The value a field's registered default stands for (None for an `Unset`)."""
    return None if isinstance(default, Unset) else default


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
    # The report's table of its column: 2 (the paper's Table 2) or 'logits' (the later logit
    # baselines, which the paper has no column for: `report.logit_table`).
    table: int | str = 2

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
    # Later logit baselines (none in the paper): their own report table, before DFA so that
    # DFA stays last. Defaults: mdistiller's CIFAR-100 configs (`mdistiller/engine/cfg.py`,
    # `configs/cifar100/dkd/*.yaml`), DIST's CIFAR-100 setting, logit-standardization-KD's
    # `tools/train.py` (dfa_jax/methods/logit_targets.py says which is which).
    Method(
        "dkd",
        "DKD",
        "dfa_jax.methods.logit_targets:DKD",
        fields={
            "dkd_ce_weight": 1.0,
            "dkd_alpha": 1.0,
            "dkd_beta": Unset(float),  # None: the pair's beta (`logit_targets.dkd_beta`).
            "dkd_temperature": 4.0,
            "dkd_warmup": 20,
        },
        table="logits",
    ),
    Method(
        "dist",
        "DIST",
        "dfa_jax.methods.logit_targets:DIST",
        fields={
            "dist_ce_weight": 1.0,
            "dist_beta": 2.0,
            "dist_gamma": 2.0,
            "dist_temperature": 4.0,
        },
        table="logits",
    ),
    Method(
        "kd_ls",
        "KD+LS",
        "dfa_jax.methods.logit_targets:KD_LS",
        fields={"ls_kd_ce_weight": 1.0, "ls_kd_weight": 9.0, "ls_kd_temperature": 2.0},
        table="logits",
    ),
    Method(
        "dkd_ls",
        "DKD+LS",
        "dfa_jax.methods.logit_targets:DKD_LS",
        fields={"ls_dkd_alpha": 9.0, "ls_dkd_beta": 81.0},
        table="logits",
    ),
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
            # Not in the paper: the search's start unsearched (the softened 'Last').
            "start": "Start",
        },
    ),
):
    register(_method)
