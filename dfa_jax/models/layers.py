"""Layer presets shared by the CIFAR backbones.

Convolutions, BatchNorm and the classifier follow the PyTorch reference models (RepDistiller /
WideResNet-pytorch / the DFA authors' framework): He-normal fan_out conv kernels, BN gamma 1
beta 0 with PyTorch's momentum 0.1 (Flax's 0.9) and epsilon 1e-5, symmetric explicit padding so
strided convs sample the same pixels as PyTorch and a state_dict can be imported 1:1.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

FEATURES = "features"
"""The one variable collection every pre-ReLU feature map is sown into, at top-level scope."""

he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=he_normal_fan_out)
Conv1x1 = functools.partial(Conv, kernel_size=(1, 1), padding=0)
# padding=1 (not 'SAME'): for stride 2 'SAME' would pad (0, 1) and shift the sampling grid.
Conv3x3 = functools.partial(Conv, kernel_size=(3, 3), padding=1)
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
Dense = functools.partial(nn.Dense, kernel_init=torch_linear_init, bias_init=nn.initializers.zeros)


def sow_feature(module: nn.Module, name: str, x):
    """Sows `x` as `module`'s feature `name` (collection FEATURES), except under `init`.

    Skipping init keeps the maps out of the initial variables: fed back into `apply`, a sown
    collection would grow a 2-tuple per name (Flax's init skips 'intermediates' the same way).
    """
    if not module.is_initializing():
        module.sow(FEATURES, name, x)


def global_avg_pool(x):
    """[B, H, W, C] -> [B, C]."""
    return jnp.mean(x, axis=(1, 2))


def check_group_range(start_group, stop_group, num_groups):
    """Validates a (start_group, stop_group) pair and returns the last group to run.

    Args:
      start_group: 0 to start from images, or i in 1..G to resume from group i's boundary.
      stop_group: None to run to the logits, or i in 1..G to return group i's boundary.
      num_groups: G.

    Returns:
      The last group whose blocks run: stop_group, or G when stop_group is None.

    Raises:
      ValueError: out of range, or start_group >= stop_group.
    """
    if not 0 <= start_group <= num_groups:
        raise ValueError(f"start_group must be in 0..{num_groups}, got {start_group}")
    if stop_group is None:
        return num_groups
    if not 1 <= stop_group <= num_groups:
        raise ValueError(f"stop_group must be None or in 1..{num_groups}, got {stop_group}")
    if start_group >= stop_group:
        raise ValueError(f"start_group ({start_group}) must be < stop_group ({stop_group})")
    return stop_group
