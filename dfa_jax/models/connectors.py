"""Connectors: the 1x1 conv + BN transforms that match channel counts between teacher and student.

The ST connector (student transform F_s) maps a student map to the teacher's channels; the TS
connector (teacher transform F_t, search only) maps a teacher aggregation to the student's
channels so it can be injected into the student (Fig. 3 of the paper). As in overhaul-distillation,
a connector is a bias-free 1x1 convolution (He-normal, fan_out) followed by BatchNorm.
"""

import flax.linen as nn
import jax.numpy as jnp

from dfa_jax.models.layers import BatchNorm, Conv1x1


class Connector(nn.Module):
    """[B, H, W, C_in] -> [B, H, W, features]: 1x1 conv, then BatchNorm."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv1x1(self.features, dtype=self.dtype, name="conv")(x)
        return BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x)
