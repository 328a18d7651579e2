"""Evaluation counts every test example exactly once on 1, 2 and 3 devices (odd-sized test set,
last batch padded and masked): its accuracy and loss equal a direct full-batch computation."""

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import SUBPROCESS_XLA_FLAGS
from dfa_jax import evaluation
from dfa_jax import inputs
from dfa_jax import parallel
from dfa_jax.data import DATASETS
from dfa_jax.data import ArrayExamples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in its own process: the test session has 2 CPU devices, this needs 3.
SCRIPT = r"""
from dfa_jax import parallel
parallel.configure_cpu_devices(3)  # With the collectives' wait for a loaded host, as a run's.
import jax
import ml_collections
import numpy as np
import optax
from dfa_jax import evaluation, inputs, parallel, teacher
from dfa_jax.data import DATASETS, ArrayExamples, augment

info = DATASETS["digits"]
rng = np.random.default_rng(0)
n = 23  # Odd, not a multiple of the batch of 6: the fourth batch holds 5 real rows.
images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
labels = rng.integers(0, 10, size=n).astype(np.int32)
model = teacher.build_model("wrn_10_1", 10, "float32")
variables = teacher.init_variables(model, 0, parallel.make_mesh(jax.devices()[:1]))
# Jitted: op by op, the model's every layer would be compiled on its own.
logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    variables, augment.normalize(images, tuple(info.mean), tuple(info.std))
)
want_acc = float(np.mean(np.argmax(logits, -1) == labels))
want_loss = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
data = inputs.RunData(info=info, train=None, test=ArrayExamples(images, labels))
# A batch of 7 is no multiple of 2 or 3 devices: it is rounded up, and still exact.
for count, batch_size in ((1, 6), (2, 6), (3, 6), (2, 7), (3, 7)):
    config = ml_collections.ConfigDict({"data": {"eval_batch_size": batch_size, "prefetch": 2}})
    mesh = parallel.make_mesh(jax.devices()[:count])
    on_mesh = jax.device_put(variables, parallel.replicated(mesh))
    got = evaluation.make_model_eval_fn(model, config, data, mesh)(on_mesh)
    assert abs(got["accuracy"] - want_acc) < 1e-6, (count, got, want_acc)
    assert abs(got["loss"] - want_loss) < 1e-4 * max(1.0, want_loss), (count, got, want_loss)
    print(count, batch_size, got)
print("ok", want_acc)
"""


def test_evaluation_counts_each_example_once_on_1_2_3_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=SUBPROCESS_XLA_FLAGS)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("ok")


@dataclasses.dataclass(frozen=True)
class _AlwaysClassZero:
    """Logits [B, 10] that predict class 0 for every image (the padding rows' label)."""

    def __call__(self, variables, images):
        del variables
        return jnp.zeros((images.shape[0], 10)).at[:, 0].set(1.0)


def test_padding_rows_are_never_counted_correct():
    """The last batch's padding (zero images, label 0) is masked out of the accuracy, not only
    out of the loss: a model that always says class 0 scores 0 on examples of other classes
    whatever the padding (5 examples in batches of 4 on 2 devices: 3 padded rows)."""
    images = np.zeros((5, 32, 32, 3), np.uint8)
    labels = np.array([1, 2, 3, 4, 5], np.int32)
    data = inputs.RunData(info=DATASETS["digits"], train=None, test=ArrayExamples(images, labels))
    config = ml_collections.ConfigDict({"data": {"eval_batch_size": 4, "prefetch": 2}})
    got = evaluation.make_eval_fn(_AlwaysClassZero(), config, data, parallel.make_mesh())({})
    assert got["accuracy"] == 0.0, got
    # And a correct answer on a real row still counts: one of five.
    data = inputs.RunData(
        info=DATASETS["digits"], train=None, test=ArrayExamples(images, np.array([0, 2, 3, 4, 5]))
    )
    got = evaluation.make_eval_fn(_AlwaysClassZero(), config, data, parallel.make_mesh())({})
    assert got["accuracy"] == pytest.approx(0.2), got


def test_accuracy_is_the_exact_fraction_of_examples_right():
    """6 right of 37 is 6/37 to the last digit of a float64, not float32's 0.16216215 (a
    reported accuracy compared across runs or with the peers' must not move in its 8th digit)."""
    images = np.zeros((37, 32, 32, 3), np.uint8)
    labels = np.array([0] * 6 + [1] * 31, np.int32)
    data = inputs.RunData(info=DATASETS["digits"], train=None, test=ArrayExamples(images, labels))
    config = ml_collections.ConfigDict({"data": {"eval_batch_size": 8, "prefetch": 2}})
    got = evaluation.make_eval_fn(_AlwaysClassZero(), config, data, parallel.make_mesh())({})
    assert got["accuracy"] == 6 / 37, got


def test_an_evaluation_batch_smaller_than_the_device_count_still_counts_every_example():
    """--config.data.eval_batch_size=1 on 2 devices is rounded up to one row per device, not
    down to none: the 5 examples are each counted once (1 of them right)."""
    images = np.zeros((5, 32, 32, 3), np.uint8)
    labels = np.array([0, 2, 3, 4, 5], np.int32)
    data = inputs.RunData(info=DATASETS["digits"], train=None, test=ArrayExamples(images, labels))
    config = ml_collections.ConfigDict({"data": {"eval_batch_size": 1, "prefetch": 2}})
    mesh = parallel.make_mesh()
    assert mesh.size == 2
    got = evaluation.make_eval_fn(_AlwaysClassZero(), config, data, mesh)({})
    assert got["accuracy"] == pytest.approx(1 / 5), got


@dataclasses.dataclass(frozen=True)
class _Bfloat16Logits:
    """Logits [B, 10] in bfloat16, as an own model with a bfloat16 head returns them."""

    def __call__(self, variables, images):
        del variables
        rows = jnp.arange(images.shape[0], dtype=jnp.float32)[:, None]
        return (3.0 * jnp.sin(1.3 * rows + jnp.arange(10.0))).astype(jnp.bfloat16)


def test_bfloat16_logits_are_scored_in_float32():
    """The cross-entropy of bfloat16 logits is computed and summed in float32: in bfloat16 a
    batch's summed loss keeps 3 digits."""
    n = 64
    images = np.zeros((n, 32, 32, 3), np.uint8)
    labels = (np.arange(n) * 7 % 10).astype(np.int32)
    data = inputs.RunData(info=DATASETS["digits"], train=None, test=ArrayExamples(images, labels))
    config = ml_collections.ConfigDict({"data": {"eval_batch_size": n, "prefetch": 2}})
    got = evaluation.make_eval_fn(_Bfloat16Logits(), config, data, parallel.make_mesh())({})
    logits = np.asarray(_Bfloat16Logits()(None, np.zeros((n, 1, 1, 3))), np.float64)
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    want = float(-log_softmax[np.arange(n), labels].mean())
    assert got["loss"] == pytest.approx(want, rel=1e-5), (got, want)
