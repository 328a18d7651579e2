"""dfa_jax: Differentiable Feature Aggregation search for knowledge distillation in JAX/Flax."""

__version__ = "0.1.0"
