"""Layer presets shared by the CIFAR backbones.

Convolutions, BatchNorm and the classifier follow the PyTorch reference models (RepDistiller /
WideResNet-pytorch / the DFA authors' framework): He-normal fan_out conv kernels where those
models initialise their convs (WRN, ResNet, VGG, MobileNetV2, ResNet50), PyTorch's own default
where they leave it (the ShuffleNets: `torch_conv_init`, `torch_bias_init`), BN gamma 1 beta 0
with PyTorch's momentum 0.1 (Flax's 0.9) and epsilon 1e-5, symmetric explicit padding so strided
convs sample the same pixels as PyTorch and a state_dict can be imported 1:1.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

FEATURES = "features"
"""The one variable collection every pre-ReLU feature map is sown into, at top-level scope."""

he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d / ConvTranspose2d weight (kaiming_uniform, a = sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = a kernel [H, W, in, out]'s in x H x W. For a
# transposed conv PyTorch counts its weight [in, out, H, W]'s dim 1, the outputs: `in_axis=-1`
# for a stride-1 transposed conv written as a conv, default for a Flax `transpose_kernel` one
# (kernel [H, W, out, in]).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
torch_transposed_as_conv_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2
)


def torch_bias_init(fan_in: int):
    """PyTorch's default conv bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), `fan_in` as its weight's."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_defaults(kernel_size: int, in_features: int, feature_group_count: int = 1) -> dict:
    """`kernel_init` and `bias_init` of a k x k conv as PyTorch's nn.Conv2d starts it, for
    models whose reference never re-initialises its convs (the ShuffleNets): both
    U(+-1/sqrt(fan_in)), fan_in = in_features / groups * k * k."""
    fan_in = in_features // feature_group_count * kernel_size * kernel_size
    return {"kernel_init": torch_conv_init, "bias_init": torch_bias_init(fan_in)}


# XLA:CPU computes a convolution's weight gradient 2-3x faster in chunks of a few examples than
# over the whole batch at once (the whole batch's patches do not stay in cache): a 3x3 conv's
# weight gradient at batch 64 costs 3-4.5x its forward, in chunks of 4-8 examples ~1.2-1.5x.
CHUNK_BYTES = 1 << 20  # Target size of one chunk of the convolution's input, per device.
MAX_CHUNKS = 16  # Bounds the unrolled weight-gradient convolutions per layer (compile time).


def _weight_grad_chunks(x, w, dimension_numbers, feature_group_count) -> int:
    """How many batch chunks the weight gradient of conv(x, w) is summed over (1: not split).

    Only on CPU, and only for ungrouped spatial (k > 1) kernels with the batch first: GPUs and
    TPUs want the whole batch in one convolution. The chunks are strided (chunk j = examples j,
    j+k, ...), so each stays evenly split over the data-parallel devices.
    """
    if jax.default_backend() != "cpu" or feature_group_count != 1 or x.ndim != 4:
        return 1
    dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
    if dn.lhs_spec[0] != 0 or dn.out_spec[0] != 0:
        return 1
    if all(w.shape[d] == 1 for d in dn.rhs_spec[2:]):
        return 1
    batch, devices = x.shape[0], jax.device_count()
    local = batch // devices if batch % devices == 0 else batch
    per_example = x.size // batch * x.dtype.itemsize
    chunks = min(MAX_CHUNKS, local // max(1, CHUNK_BYTES // per_example))
    while chunks > 1 and local % chunks:
        chunks -= 1
    return max(chunks, 1)


def _conv(x, w, strides, padding, rhs_dilation, dn, precision):
    return lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=rhs_dilation, dimension_numbers=dn, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv_chunked_weight_grad(x, w, strides, padding, rhs_dilation, dn, precision, chunks):
    del chunks  # Used by the backward pass only.
    return _conv(x, w, strides, padding, rhs_dilation, dn, precision)


def _conv_fwd(x, w, strides, padding, rhs_dilation, dn, precision, chunks):
    y = _conv_chunked_weight_grad(x, w, strides, padding, rhs_dilation, dn, precision, chunks)
    return y, (x, w)


def _conv_bwd(strides, padding, rhs_dilation, dn, precision, chunks, residuals, g):
    x, w = residuals
    conv = functools.partial(
        _conv,
        strides=strides,
        padding=padding,
        rhs_dilation=rhs_dilation,
        dn=dn,
        precision=precision,
    )
    dx = jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
    xs = x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:])
    gs = g.reshape(g.shape[0] // chunks, chunks, *g.shape[1:])
    # Partial sums in float32, so a bf16 weight gradient is rounded once, as XLA's own.
    dw = sum(
        jax.vjp(lambda w, j=j: conv(xs[:, j], w), w)[1](gs[:, j])[0].astype(jnp.float32)
        for j in range(chunks)
    )
    return dx, dw.astype(w.dtype)


_conv_chunked_weight_grad.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    x,
    w,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """`lax.conv_general_dilated` whose weight gradient is summed over batch chunks on CPU.

    The forward and the input gradient are XLA's own; the weight gradient is the same
    convolution's, evaluated per chunk of examples and summed (equal up to float rounding).
    """
    chunks = 1
    plain = not isinstance(padding, str) and lhs_dilation in (None, (1, 1)) and not kwargs
    if plain:
        chunks = _weight_grad_chunks(x, w, dimension_numbers, feature_group_count)
    if chunks == 1:
        return lax.conv_general_dilated(
            x,
            w,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
    return _conv_chunked_weight_grad(
        x,
        w,
        tuple(window_strides),
        tuple(tuple(p) for p in padding),
        None if rhs_dilation is None else tuple(rhs_dilation),
        dn,
        precision,
        chunks,
    )


Conv = functools.partial(
    nn.Conv,
    use_bias=False,
    kernel_init=he_normal_fan_out,
    conv_general_dilated=conv_general_dilated,
)
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


def classifier_head(x, num_classes: int, torch_bias: bool = False):
    """ReLU, global average pooling and the `fc` layer: [B, H, W, C] -> float32 logits [B, K].

    Call from a module's compact method (the layer is named `fc` there). Float32 whatever the
    compute dtype: pooling and logits are cheap, and the losses (cross-entropy, KD's softened
    logits) read the logits' small differences. `torch_bias`: the bias starts as nn.Linear's
    default, U(+-1/sqrt(C)), for models whose reference leaves it there; else zero (WRN's).
    """
    x = global_avg_pool(nn.relu(x).astype(jnp.float32))
    bias_init = torch_bias_init(x.shape[-1]) if torch_bias else nn.initializers.zeros
    return Dense(num_classes, dtype=jnp.float32, bias_init=bias_init, name="fc")(x)


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
