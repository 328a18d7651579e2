"""Test-split evaluation: every example counted exactly once, on device, one host sync per pass."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfa_jax import inputs
from dfa_jax import parallel
from dfa_jax.data import augment
from dfa_jax.data import loader


@dataclasses.dataclass(frozen=True)
class ModelLogits:
    """`(variables, images) -> logits` of `model` in eval mode. Equal for equal models, so every
    stage that evaluates the same architecture (the teacher, each distilled student) reuses one
    compiled step."""

    model: Any

    def __call__(self, variables, images):
        return self.model.apply(variables, images, train=False)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _eval_step(logits_fn, mean: tuple, std: tuple, variables, batch, totals):
    """Adds one padded batch's (correct, summed CE, real examples) to `totals`."""
    images = augment.normalize(batch["image"], mean, std)
    logits = logits_fn(variables, images).astype(jnp.float32)
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["label"]) * mask
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]) * mask
    return jax.tree.map(jnp.add, totals, (correct.sum(), loss.sum(), mask.sum()))


def make_model_eval_fn(model, config, data: inputs.RunData, mesh) -> Callable:
    """Builds `evaluate(variables) -> {'accuracy': float, 'loss': float}` of `model` (eval mode)
    on the test split: every example counted exactly once whatever the device and process count
    (the last global batch is padded and masked out)."""
    return make_eval_fn(ModelLogits(model), config, data, mesh)


def make_eval_fn(logits_fn, config, data: inputs.RunData, mesh) -> Callable:
    """`make_model_eval_fn` for any hashable `logits_fn(variables, images [B, H, W, C]) ->
    logits [B, classes]`, `variables` being what `evaluate` is given."""
    # Rounded up to a whole number of rows per device: padding already makes any size exact,
    # so a batch of 500 must not keep a run off 8 or 16 devices.
    batch_size = -(-config.data.eval_batch_size // mesh.size) * mesh.size
    rows = parallel.process_rows(mesh, batch_size)
    mean, std = tuple(data.info.mean), tuple(data.info.std)
    # Placed as the step's own totals are: an unplaced first `totals` would be another input
    # type, and `_eval_step` would compile twice per pass. (Never donated: one zero serves all.)
    zero = jax.make_array_from_callback(
        (), parallel.replicated(mesh), lambda _: np.zeros((), np.float32)
    )

    def evaluate(variables) -> dict:
        totals = (zero, zero, zero)
        batches = loader.eval_batches(data.test, batch_size, rows)
        for batch in parallel.prefetch_to_mesh(batches, mesh, config.data.prefetch):
            totals = _eval_step(logits_fn, mean, std, variables, batch, totals)
        correct, loss, count = jax.device_get(totals)
        # In float64: float32's quotient is off in the 8th digit (6/37 -> 0.16216215).
        return {"accuracy": float(correct) / float(count), "loss": float(loss) / float(count)}

    return evaluate
