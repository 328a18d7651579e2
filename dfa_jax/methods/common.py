"""What every method is built from: the `Implementation` record, the pair, the forwards, the
positions of the maps a method reads, and its helpers' initialisation.

A loss is `(params, batch_stats, beta, batch, rng, aux) -> (loss, (batch_stats, metrics))` on the
shared bilevel step (beta frozen; `aux` the teacher's variables). `student_loss` builds one from a
*term*: a function of one batch's `Step` (the student's forward and cross-entropy, the teacher's
forward on demand) that returns the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dfa_jax import config_lib
from dfa_jax import features
from dfa_jax import losses
from dfa_jax import method_registry
from dfa_jax import models
from dfa_jax import parallel

LossFn = Callable[..., tuple[jax.Array, tuple[dict, dict]]]


@dataclasses.dataclass(frozen=True)
class Pair:
    """The teacher and student networks and where their layer groups end."""

    teacher: nn.Module
    student: nn.Module

    @property
    def t_groups(self):
        return self.teacher.feature_groups()

    @property
    def t_ends(self):
        return [names[-1] for names in self.teacher.feature_groups()]

    @property
    def s_ends(self):
        return [names[-1] for names in self.student.feature_groups()]

    def t_shapes(self):
        return features.group_shapes(self.teacher)

    def s_shapes(self):
        return features.group_shapes(self.student)


def no_helpers(pair: Pair, config, seed: int, mesh) -> tuple[dict, dict]:
    del pair, config, seed, mesh
    return {}, {}


def no_problems(config) -> list[str]:
    del config
    return []


@dataclasses.dataclass(frozen=True)
class Implementation:
    """What a registered method (`method_registry.Method`) runs.

    loss: (pair, config, constants) -> the w loss; `constants` is what `start` derived for it.
    helpers: (pair, config, seed, mesh) -> (params, batch_stats) of the learned helpers trained
      beside the student, each under its own top-level key.
    start: (Setup, Start) -> Start, run before the student trains: a first stage of its own, or
      values read from the teacher or the workdir. None: the student starts as initialised.
    check: config -> its problems, each naming the field and the fix (run on every config:
      its fields are in every config).
    trains_alone: its students cannot share a step (each has a first stage of its own, or a
      step `aux` other than the teacher's variables, as FT's paraphraser: students that share a
      step share its aux).
    """

    loss: Callable[[Pair, Any, Any], LossFn]
    helpers: Callable[[Pair, Any, int, Any], tuple[dict, dict]] = no_helpers
    start: Callable[[Setup, Start], Start] | None = None
    check: Callable[[Any], list[str]] = no_problems
    trains_alone: bool = False


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a student's training starts."""

    student: dict  # Its variables: {'params', 'batch_stats'}.
    helpers: tuple[dict, dict]  # The helpers' (params, batch_stats) it trains with.
    aux: Any  # The step's aux: the teacher's variables (and FT's paraphraser).
    beta: dict | None = None  # Frozen beta (DFA), per group key.
    constants: Any = None  # What the loss closes over (Margin's margins); shared by a cohort.
    # Fields its result.json gets (DFA: `aggregation`, where its alpha came from).
    record: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a method's `start` reads, and how it runs a first stage of its own."""

    label: str
    seed: int
    config: Any  # The run's config with `seed` as its seed.
    workdir: str
    directory: str  # The student's stage directory; a first stage lives under it.
    pair: Pair
    data: Any  # inputs.RunData.
    mesh: Any
    teacher_vars: dict
    eval_student: Callable[[dict], dict]  # Student variables -> test metrics.
    # (name, directory, epochs, lr, params, batch_stats, loss_fn, eval_fn=None, w_trainable=None)
    # -> the final train state of a first stage (plain SGD at a constant lr, `distill.py`).
    run_stage: Callable[..., Any]


def implementation(label: str) -> Implementation:
    """The implementation of the method that trains run `label`."""
    return method_registry.get(label).load()


def init_helpers(label: str, pair: Pair, config, seed: int, mesh) -> tuple[dict, dict]:
    """The learned helpers of `label`'s method, trained with the student: (params, batch_stats)."""
    return implementation(label).helpers(pair, config, seed, mesh)


def make_loss_fn(label: str, pair: Pair, config, constants=None) -> LossFn:
    """The w loss of run `label`; `constants` as its method's start made them (Margin's
    margins, `teacher_margins`)."""
    return implementation(label).loss(pair, config, constants)


# ------------------------------------------------------------------------------------------------
# Positions and helpers
# ------------------------------------------------------------------------------------------------


def group_key(group: int) -> str:
    """The pytree key of 1-based group `group` (beta, connectors)."""
    return f"g{group}"


STEM = "stem"
"""The pytree key of the stem position (its connector), beside the groups' `g{i}`."""


def positions(model, kind: str, with_stem: bool = False) -> list[str]:
    """Sown names of the maps a method reads: every group end, 'pre_relu' (the consumer BN's
    output) or 'raw' (before it), after the model's stem when `with_stem` and it has one."""
    if kind not in ("pre_relu", "raw"):  # A typo would read the raw maps without a word.
        raise ValueError(f"map kind {kind!r}: use 'pre_relu' or 'raw'")
    if kind == "pre_relu":
        names = [group[-1] for group in model.feature_groups()]
    else:
        names = list(model.raw_group_ends())
    stem = model.stem_features()
    if with_stem and stem is not None:
        names.insert(0, stem[0] if kind == "pre_relu" else stem[1])
    return names


def with_stem(pair: Pair, wanted: bool) -> bool:
    """Whether a method that `wanted` the stem position reads one: where both networks' families
    have a stem outside their groups (a WRN's, a CIFAR ResNet's or VGG's)."""
    return wanted and all(models.family_of(m).has_stem for m in (pair.teacher, pair.student))


def init_module(module, seed, mesh, *shapes, **kwargs):
    """A helper's (params, batch_stats), initialised replicated over `mesh`."""
    variables = parallel.init_replicated(module, seed, mesh, *shapes, **kwargs)
    return variables["params"], variables.get("batch_stats", {})


def connector_helpers(in_shapes, out_channels, seed: int, mesh, dtype) -> tuple[dict, dict]:
    """Per group, a Connector from `in_shapes[i]` to `out_channels[i]`: (params, batch_stats)."""
    params, batch_stats = {}, {}
    for i, (shape, channels) in enumerate(zip(in_shapes, out_channels)):
        p, b = init_module(models.Connector(channels, dtype=dtype), seed + i, mesh, shape)
        params[group_key(i + 1)], batch_stats[group_key(i + 1)] = p, b
    return params, batch_stats


def position_connectors(pair: Pair, config, seed: int, mesh, with_stem: bool):
    """Margin's and DFA's helpers: under 'st', a Connector (student -> teacher channels) per
    group end, and at the stem (seed + 50) when `with_stem`."""
    dtype = jnp.dtype(config.dtype)
    t_shapes, s_shapes = pair.t_shapes(), pair.s_shapes()
    st_params, st_stats = connector_helpers(s_shapes, [s[-1] for s in t_shapes], seed, mesh, dtype)
    if with_stem:
        (t_stem,) = features.shapes_of(pair.teacher, pair.teacher.stem_features()[:1])
        (s_stem,) = features.shapes_of(pair.student, pair.student.stem_features()[:1])
        connector = models.Connector(t_stem[-1], dtype=dtype)
        st_params[STEM], st_stats[STEM] = init_module(connector, seed + 50, mesh, s_stem)
    return {"st": st_params}, {"st": st_stats}


def apply_helper(module, params, batch_stats, name, x, key=None):
    """Helper `name` (under `key`) in train mode on `x`: (float32 output, its new batch_stats)."""
    p = params[name] if key is None else params[name][key]
    b = batch_stats[name] if key is None else batch_stats[name][key]
    out, mut = module.apply({"params": p, "batch_stats": b}, x, train=True, mutable=["batch_stats"])
    return out.astype(jnp.float32), mut["batch_stats"]


def teacher_variables(aux) -> dict:
    """The teacher's own variables out of a step's `aux` (which may also carry FT's paraphraser)."""
    return {"params": aux["params"], "batch_stats": aux["batch_stats"]}


# ------------------------------------------------------------------------------------------------
# The step's forwards
# ------------------------------------------------------------------------------------------------


def group_end_maps(mutated, names) -> list[jax.Array]:
    """The sown maps `names` out of a forward's mutated collections, in float32."""
    return [m.astype(jnp.float32) for m in features.read(mutated, names)]


class Step:
    """One batch through the student in train mode, and through the teacher when asked.

    `logits` [B, K] float32, `ce` (the label cross-entropy), `metrics` and `new_stats` (the
    batch_stats the step returns: a term that trains a helper puts that helper's there).
    """

    def __init__(self, pair, params, batch_stats, beta, batch, aux, teacher_features, teacher_bn):
        self.pair, self.params, self.batch_stats = pair, params, batch_stats
        self.beta, self.aux = beta, aux
        self.images, self.labels = batch["image"], batch["label"]
        self._teacher_features = teacher_features
        self._teacher_train = teacher_bn == "batch"
        logits, self.student_mutated = pair.student.apply(
            {"params": params["student"], "batch_stats": batch_stats["student"]},
            self.images,
            train=True,
            mutable=["batch_stats", models.FEATURES],
        )
        self.logits = logits.astype(jnp.float32)
        self.new_stats = {**batch_stats, "student": self.student_mutated["batch_stats"]}
        self.ce = optax.softmax_cross_entropy_with_integer_labels(self.logits, self.labels).mean()
        self.metrics = {
            "ce_loss": self.ce,
            "accuracy": jnp.mean(jnp.argmax(self.logits, -1) == self.labels),
        }
        self._teacher = None

    def teacher(self) -> tuple[jax.Array, dict]:
        """The teacher's (stop-gradient float32 logits, mutated collections), computed once."""
        if self._teacher is None:
            mutable = [models.FEATURES] if self._teacher_features else []
            out = self.pair.teacher.apply(
                teacher_variables(self.aux),
                self.images,
                train=self._teacher_train,
                mutable=mutable + (["batch_stats"] if self._teacher_train else []),
            )
            logits, mutated = out if isinstance(out, tuple) else (out, {})
            self._teacher = jax.lax.stop_gradient(logits.astype(jnp.float32)), mutated
        return self._teacher

    def student_maps(self, kind: str, with_stem: bool = False) -> list[jax.Array]:
        """The student's maps at `positions(student, kind, with_stem)`."""
        return group_end_maps(self.student_mutated, positions(self.pair.student, kind, with_stem))

    def teacher_maps(self, kind: str, with_stem: bool = False) -> list[jax.Array]:
        """The teacher's maps at `positions(teacher, kind, with_stem)`, under stop_gradient."""
        _, mutated = self.teacher()
        if models.FEATURES not in mutated:
            raise ValueError(
                "teacher_maps: this loss's teacher forward sows no maps; build it with"
                " common.student_loss(..., teacher_features=True)"
            )
        names = positions(self.pair.teacher, kind, with_stem)
        return [jax.lax.stop_gradient(m) for m in group_end_maps(mutated, names)]


def student_loss(
    pair: Pair,
    config,
    term: Callable[[Step], jax.Array],
    *,
    teacher_features: bool = True,
    teacher_bn: str | None = None,
) -> LossFn:
    """The w loss whose value is `term(step)` on each batch's `Step`.

    `teacher_features`: the teacher's forward sows its maps (terms that read them);
    `teacher_bn`: 'eval' or 'batch' statistics in the teacher's BatchNorm (None:
    `distill.teacher_bn`, as RepDistiller keeps its teacher in eval mode).
    """
    teacher_bn = config.distill.teacher_bn if teacher_bn is None else teacher_bn

    def loss_fn(params, batch_stats, beta, batch, rng, aux):
        del rng
        step = Step(pair, params, batch_stats, beta, batch, aux, teacher_features, teacher_bn)
        loss = term(step)
        return loss, (step.new_stats, step.metrics)

    return loss_fn


def connected_maps(pair: Pair, with_stem: bool) -> Callable[[Step], tuple[list, list]]:
    """Margin's and DFA's maps: `step -> (mapped, targets)`, per group end (after the stem when
    `with_stem`) the student's pre-ReLU map through its 'st' connector and the teacher's
    pre-ReLU map pooled to the student's size (`losses.adaptive_avg_pool`). Records the
    connectors' batch_stats in `step.new_stats`."""
    keys = ([STEM] if with_stem else []) + [group_key(i + 1) for i in range(len(pair.t_groups))]
    names = positions(pair.teacher, "pre_relu", with_stem)
    connectors = [
        models.Connector(s[-1], dtype=pair.student.dtype)
        for s in features.shapes_of(pair.teacher, names)
    ]

    def apply(step: Step):
        s_pre = step.student_maps("pre_relu", with_stem)
        t_pre = step.teacher_maps("pre_relu", with_stem)
        mapped, st_stats = [], {}
        for key, connector, s_map in zip(keys, connectors, s_pre):
            out, stats = apply_helper(connector, step.params, step.batch_stats, "st", s_map, key)
            mapped.append(out)
            st_stats[key] = stats
        step.new_stats["st"] = st_stats
        return mapped, [losses.adaptive_avg_pool(t, m.shape[1:3]) for t, m in zip(t_pre, mapped)]

    return apply


# ------------------------------------------------------------------------------------------------
# Config checks
# ------------------------------------------------------------------------------------------------


def resize_problems(config, method: str, groups=None) -> list[str]:
    """Where `method` runs (`distill_labels`), the groups (1-based; None: all) whose student map
    RepDistiller's ConvReg cannot resize to the teacher's (`models.resize_problem`)."""
    names = (config.teacher.model, config.student.model)
    runs = method in config_lib.distill_labels(config)
    if not runs or not all(map(models.is_valid_model_name, names)):
        return []
    t_sizes, s_sizes = (config_lib.group_sizes(n) for n in names)
    if len(t_sizes) != len(s_sizes):
        return []  # `validate` says so.
    problems = []
    for g in range(1, len(t_sizes) + 1) if groups is None else groups(len(t_sizes)):
        problem = models.resize_problem((s_sizes[g - 1],) * 2, (t_sizes[g - 1],) * 2)
        if problem is not None:
            problems.append(
                f"distill.method = {method!r} with teacher.model = {names[0]!r} and"
                f" student.model = {names[1]!r}: at group {g}, {problem}; pick a student whose"
                " group ends at the teacher's size, half of it or larger."
            )
    return problems


def non_negative(config, *fields: str) -> list[str]:
    """Problems of `baselines.<field>` < 0 (weights, margins)."""
    base = config.baselines
    return [f"baselines.{f} = {base[f]}: must be >= 0." for f in fields if base[f] < 0]


def positive_epochs(config, field: str) -> list[str]:
    value = config.baselines[field]
    if value <= 0:
        return [f"baselines.{field} = {value}: must be a positive number of epochs."]
    return []


def positive_lr(config, field: str) -> list[str]:
    value = config.baselines[field]
    if not value > 0:
        return [
            (
                f"baselines.{field} = {value}: must be a positive learning rate"
                " (RepDistiller: ft_pretrain_lr 0.01, ab_init_lr 0.05)."
            )
        ]
    return []
