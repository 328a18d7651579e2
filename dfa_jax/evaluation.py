"""Test-split evaluation: every example counted exactly once, on device, one host sync per pass."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dfa_jax import inputs
from dfa_jax import parallel
from dfa_jax.data import loader


def make_eval_fn(
    logits_fn: Callable, preprocess: Callable, test_data, eval_batch_size: int, mesh, prefetch: int
) -> Callable:
    """Builds `evaluate(variables) -> {'accuracy': float, 'loss': float}`.

    Args:
      logits_fn: `(variables, images [B, H, W, 3] float32) -> logits [B, C]` in eval mode.
      preprocess: `(batch, rng) -> batch` (normalisation; no augmentation at test time).
      test_data: this host's (uint8 images, labels) of the test split.
      eval_batch_size: global batch size; the last batch is padded and masked out.
    """
    images, labels = test_data

    @jax.jit
    def eval_step(variables, batch, totals):
        batch = preprocess(batch, jax.random.key(0))
        logits = logits_fn(variables, batch["image"]).astype(jnp.float32)
        mask = batch["mask"]
        correct = (jnp.argmax(logits, -1) == batch["label"]) * mask
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]) * mask
        return jax.tree.map(jnp.add, totals, (correct.sum(), loss.sum(), mask.sum()))

    local_batch_size = parallel.local_batch_size(eval_batch_size)

    def evaluate(variables) -> dict:
        totals = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        batches = loader.eval_batches(images, labels, local_batch_size)
        for batch in parallel.prefetch_to_mesh(batches, mesh, prefetch):
            totals = eval_step(variables, batch, totals)
        correct, loss, count = jax.device_get(totals)
        return {"accuracy": float(correct / count), "loss": float(loss / count)}

    return evaluate


def make_model_eval_fn(model, config, data: inputs.RunData, mesh) -> Callable:
    """`evaluate(variables)` of `model` (eval mode) on the run's test split."""
    return make_eval_fn(
        lambda variables, images: model.apply(variables, images, train=False),
        inputs.make_preprocess(config.data, data.info, train=False),
        data.test,
        config.data.eval_batch_size,
        mesh,
        config.data.prefetch,
    )
