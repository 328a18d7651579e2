"""Test set-up: two simulated CPU devices, quiet TensorFlow, no GPU for tf.data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

# Must run before any JAX backend is initialised: every test sees a 2-device CPU mesh.
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_platforms", "cpu")
