"""Test set-up: two simulated CPU devices, quiet TensorFlow, no GPU for tf.data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Two simulated devices on a shared CI core pair: let their collectives wait out a busy moment
# instead of aborting the process (see parallel.configure_cpu_devices).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_collective_call_terminate_timeout_seconds=3600")

import jax  # noqa: E402

# Must run before any JAX backend is initialised: every test sees a 2-device CPU mesh.
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_platforms", "cpu")
