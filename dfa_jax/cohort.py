"""Students that share the teacher: K students, of one method or several, trained by one jitted
step.

A method's students are stacked: their `bilevel.TrainState`s along a new leading axis —
parameters, BN statistics, optimizer states and the frozen beta — while the step counter stays
one shared scalar. Its step is the method's own bilevel step applied to every student:

- 'vmap': `jax.vmap` over the student axis with the batch, the teacher's variables and the step
  counter (hence the augmentation's randomness) unmapped. What does not depend on a student —
  the augmentation, the teacher's forward — is computed once for all of them; each student's
  convolutions become one grouped convolution over the K students.
- 'loop': the students one after the other inside the one program, each a call of the one
  traced student step. The teacher's forward is written K times with the same operands; XLA
  inlines the calls and its common-subexpression elimination computes the forward once.

Either way the students see the same batches and the same augmentation, and differ in what they
were initialised with (seed, frozen alpha). `benchmarks/throughput.py` (`cohort_*` cases)
measures both against K separate steps.

Students of several methods form a `Mixed` state, one stacked state per method, whose step
(`make_mixed_step`) runs each method's step on the same batch and the same teacher's variables
inside one program: the augmentation and the teacher's forward, the same ops on the same
operands in every method's step, are computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp

from dfa_jax import bilevel

MODES = ("vmap", "loop")

# Where a stacked TrainState has its student axis: everywhere but the shared step counter.
# The TrainState fields that hold one entry per student (all but the shared `step`).
_STUDENT_FIELDS = ("params", "batch_stats", "opt_state", "beta", "beta_opt_state")
STATE_AXES = bilevel.TrainState(step=None, **{field: 0 for field in _STUDENT_FIELDS})


def stack(states: Sequence[bilevel.TrainState]) -> bilevel.TrainState:
    """One TrainState whose leaves (but `step`) gain a leading student axis [K, ...]."""
    if not states:
        raise ValueError("a cohort needs at least one student")
    return states[0].replace(
        **{
            field: jax.tree.map(
                lambda *leaves: jnp.stack(leaves), *[getattr(s, field) for s in states]
            )
            for field in _STUDENT_FIELDS
        }
    )


def student(state: bilevel.TrainState, k: int) -> bilevel.TrainState:
    """Student `k` of a stacked TrainState, as a one-student TrainState."""
    return state.replace(
        **{field: jax.tree.map(lambda x: x[k], getattr(state, field)) for field in _STUDENT_FIELDS}
    )


@jax.jit
def student_variables(state: bilevel.TrainState, k) -> dict:
    """Student `k`'s model variables {'params', 'batch_stats'} out of a stacked TrainState,
    each leaf without its leading [K] axis: one compiled program for every k (slicing each leaf
    eagerly would dispatch one op per leaf per student)."""
    mine = student(state, k)  # XLA drops the slices of the fields not returned.
    return {"params": mine.params["student"], "batch_stats": mine.batch_stats["student"]}


def size(state: bilevel.TrainState) -> int:
    """The number of students K of a stacked TrainState."""
    return int(jax.tree.leaves(state.params)[0].shape[0])


def make_cohort_step(step: Callable, num_students: int, mode: str = "vmap") -> Callable:
    """`step(state, batch, val_batch, aux) -> (state, metrics)` for one student, made the step of
    a stacked state of `num_students` students; every metric gains the student axis [K]."""
    if mode not in MODES:
        raise ValueError(f"cohort mode must be one of {MODES}, got {mode!r}")
    if mode == "vmap":
        return jax.vmap(step, in_axes=(STATE_AXES, None, None, None), out_axes=(STATE_AXES, 0))

    # A nested jit: the K calls share one trace of the student's step (each trace of a model
    # costs seconds on a CPU) and one callee, which XLA inlines before its CSE.
    one_student = jax.jit(step)

    def looped(state, batch, val_batch, aux):
        outputs = [
            one_student(student(state, k), batch, val_batch, aux) for k in range(num_students)
        ]
        new_state = stack([s for s, _ in outputs])
        metrics = jax.tree.map(lambda *m: jnp.stack(m), *[m for _, m in outputs])
        return new_state, metrics

    return looped


@flax.struct.dataclass
class Mixed:
    """A cohort of several methods: per method, its students' stacked TrainState (`stack`)."""

    groups: tuple[bilevel.TrainState, ...]

    @property
    def params(self) -> tuple:
        """Each method's stacked parameters."""
        return tuple(g.params for g in self.groups)


def make_mixed_step(steps: Sequence[Callable]) -> Callable:
    """`steps[g](state, batch, val_batch, aux) -> (state, metrics)`, each the step of method g's
    stacked students (`make_cohort_step`), made the step of a `Mixed` state; its metrics are
    each method's (every metric [K_g]), in a tuple."""

    def mixed(state, batch, val_batch, aux):
        # The methods' step counters are equal but separate arguments: one of them for all, so
        # the augmentation and the teacher's forward have the same operands in every method's
        # step and XLA computes them once.
        shared = state.groups[0].step
        outputs = [
            step(group.replace(step=shared), batch, val_batch, aux)
            for step, group in zip(steps, state.groups)
        ]
        return Mixed(tuple(s for s, _ in outputs)), tuple(m for _, m in outputs)

    return mixed


def scalars(metrics: tuple[dict, ...], group: int, k: int) -> dict:
    """Student k of method `group`'s scalars out of a `make_mixed_step`'s (fetched) metrics."""
    return {key: v[k] for key, v in metrics[group].items()}
