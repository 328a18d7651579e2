"""Connectors: the conv + BN transforms that match channel counts (and, for RepDistiller's
regressors, spatial sizes) between teacher and student.

The ST connector (student transform F_s) maps a student map to the teacher's channels; the TS
connector (teacher transform F_t, search only) maps a teacher aggregation to the student's
channels so it can be injected into the student (Fig. 3 of the paper). As in overhaul-distillation,
a connector is a bias-free 1x1 convolution (He-normal, fan_out) followed by BatchNorm.

Given `out_hw`, a connector also resizes by RepDistiller's and mdistiller's `ConvReg` rule (the
FitNets regressor and AB's connectors between networks whose maps differ in size): a 3x3 stride-2
conv when the input is twice `out_hw`, a 4x4 stride-2 transposed conv when it is half, else a
valid conv of kernel 1 + in - out. Their convs carry a bias; here it is left out, as the BN's
batch mean cancels it in training, the connectors' only use.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dfa_jax.models.layers import BatchNorm, Conv, Conv1x1, he_normal_fan_out, torch_conv_init


def resize_problem(in_hw, out_hw) -> str | None:
    """Why `ConvReg`'s rule cannot take an [H, W] map to `out_hw`, or None when it can."""
    (ih, iw), (oh, ow) = tuple(in_hw), tuple(out_hw)
    if (ih, iw) == (2 * oh, 2 * ow) or (2 * ih, 2 * iw) == (oh, ow):
        return None
    if ih >= oh and iw >= ow:
        return None
    return (
        f"a {ih}x{iw} map cannot become {oh}x{ow}: RepDistiller's ConvReg halves, doubles or"
        " shrinks a map, never enlarges it by another factor"
    )


class Connector(nn.Module):
    """[B, H, W, C_in] -> [B, *out_hw, features]: a conv (1x1 when no resize), then BatchNorm.

    `initialiser`: the conv kernel's 'he' (He-normal fan_out, overhaul's connector: DFA's, Margin's,
    the search's) or 'torch' (PyTorch's default, which RepDistiller's `ConvReg` keeps: FitNets',
    AB's).
    """

    features: int
    out_hw: tuple[int, int] | None = None  # None: keep the input's H x W.
    dtype: jnp.dtype = jnp.float32
    initialiser: str = "he"

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_hw = tuple(x.shape[1:3])
        out_hw = in_hw if self.out_hw is None else tuple(self.out_hw)
        problem = resize_problem(in_hw, out_hw)
        if problem is not None:
            raise ValueError(f"Connector: {problem}.")
        if self.initialiser not in ("he", "torch"):
            raise ValueError(
                f"Connector: initialiser must be 'he' or 'torch', got {self.initialiser!r}"
            )
        # A transposed kernel [H, W, out, in] counts PyTorch's fan_in on axis -2, as a conv's.
        kernel_init = he_normal_fan_out if self.initialiser == "he" else torch_conv_init
        if in_hw == out_hw:
            conv = Conv1x1(self.features, kernel_init=kernel_init, dtype=self.dtype, name="conv")
        elif in_hw == (2 * out_hw[0], 2 * out_hw[1]):
            conv = Conv(
                self.features,
                (3, 3),
                strides=2,
                padding=1,
                kernel_init=kernel_init,
                dtype=self.dtype,
                name="conv",
            )
        elif (2 * in_hw[0], 2 * in_hw[1]) == out_hw:
            # PyTorch's ConvTranspose2d(k=4, s=2, p=1): the input dilated by 2, padded by
            # k - 1 - p = 2, correlated with the spatially flipped kernel.
            conv = nn.ConvTranspose(
                self.features,
                (4, 4),
                strides=(2, 2),
                padding=((2, 2), (2, 2)),
                transpose_kernel=True,
                use_bias=False,
                kernel_init=kernel_init,
                dtype=self.dtype,
                name="conv",
            )
        else:
            kernel = (1 + in_hw[0] - out_hw[0], 1 + in_hw[1] - out_hw[1])
            conv = Conv(
                self.features,
                kernel,
                padding=0,
                kernel_init=kernel_init,
                dtype=self.dtype,
                name="conv",
            )
        x = conv(x)
        return BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x)
