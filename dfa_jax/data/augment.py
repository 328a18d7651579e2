"""On-device augmentation and normalisation, pure JAX, called inside the jitted train/eval steps.

The host ships uint8 batches (4x less transfer than float32) and the step augments and
normalises them. The CIFAR recipe (§4.1) is `random_crop_flip` (pad 4, reflect, random 32x32
crop, horizontal flip) then `normalize`; CINIC-10's is `random_resized_crop_flip`
(torchvision's RandomResizedCrop(32) + flip) then `normalize` (`data.augment` picks).
"""

import math

import jax
import jax.numpy as jnp

PAD_MODES = ("reflect", "constant")


def random_crop_flip(
    images: jax.Array, rng: jax.Array, pad: int, pad_mode: str, flip: bool
) -> jax.Array:
    """Pads, crops a random window per example, and flips half of the examples horizontally.

    `reflect` mirrors without repeating the edge pixel (NumPy's `reflect`, torchvision's
    `padding_mode='reflect'`); `constant` pads with zeros. Each example draws its own crop
    offset uniformly in [0, 2*pad] per axis and flips with probability 1/2.

    Args:
        images: [B, H, W, C] uint8 or float.
        rng: PRNG key; the output is a deterministic function of (images, rng).
        pad: pixels added on each side of H and W (static).
        pad_mode: 'reflect' or 'constant' (static).
        flip: whether to apply random horizontal flips (static).

    Returns:
        [B, H, W, C], same dtype as `images`. With pad=0 and flip=False, `images` unchanged.
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    batch, height, width, channels = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if pad > 0:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
        offsets = jax.random.randint(crop_rng, (batch, 2), 0, 2 * pad + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(
                image, (offset[0], offset[1], 0), (height, width, channels)
            )

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        flipped = jax.random.bernoulli(flip_rng, 0.5, (batch,))
        images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1, :], images)
    return images


def resized_crop_boxes(
    rng: jax.Array,
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tuple[jax.Array, ...]:
    """torchvision's `RandomResizedCrop.get_params`, per example: `attempts` boxes of area
    fraction s ~ U(scale) and width / height r with log r ~ U(log ratio), rounded to whole
    pixels; the first that fits the image is placed at a uniform whole-pixel offset; where none
    fits, the largest central box within `ratio`.

    Returns:
        (top, left, h, w), each [batch] float32 of whole pixels.
    """
    area_rng, ratio_rng, y_rng, x_rng = jax.random.split(rng, 4)
    area = (
        height
        * width
        * jax.random.uniform(area_rng, (batch, attempts), minval=scale[0], maxval=scale[1])
    )
    aspect = jnp.exp(
        jax.random.uniform(
            ratio_rng, (batch, attempts), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
        )
    )
    # Half to even, as Python's round() in torchvision.
    w, h = jnp.round(jnp.sqrt(area * aspect)), jnp.round(jnp.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits, axis=1)[:, None]
    h, w = (jnp.take_along_axis(a, first, axis=1)[:, 0] for a in (h, w))
    # torchvision's fallback when no attempt fits.
    if width / height < min(ratio):
        fall_h, fall_w = round(width / min(ratio)), width
    elif width / height > max(ratio):
        fall_h, fall_w = height, round(height * max(ratio))
    else:
        fall_h, fall_w = height, width
    found = fits.any(axis=1)
    h, w = jnp.where(found, h, fall_h), jnp.where(found, w, fall_w)
    top = jnp.floor(jax.random.uniform(y_rng, (batch,)) * (height - h + 1))
    left = jnp.floor(jax.random.uniform(x_rng, (batch,)) * (width - w + 1))
    top = jnp.where(found, top, (height - fall_h) // 2)
    left = jnp.where(found, left, (width - fall_w) // 2)
    return top, left, h, w


def random_resized_crop_flip(
    images: jax.Array,
    rng: jax.Array,
    flip: bool,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> jax.Array:
    """RandomResizedCrop to the input size, then a random horizontal flip (CINIC-10's recipe).

    Per example a box as torchvision draws it (`resized_crop_boxes`), cropped and resized to
    H x W as torchvision does a PIL image: PIL's bilinear resize (half-pixel centres, clamped
    at the crop's edges), its horizontal pass then its vertical, each rounded to whole values
    for uint8 images as PIL's 8-bit passes are (so equal to `PIL.Image.crop(box).resize(...)`
    up to PIL's fixed-point weights; float images stay unrounded). A box is never larger than
    the image, so every pass enlarges or keeps its axis.

    Args:
        images: [B, H, W, C] uint8 or float (0..255).
        rng: PRNG key; the output is a deterministic function of (images, rng).
        flip: whether to apply random horizontal flips (static).
        scale: range of the box's area as a fraction of the image's.
        ratio: range of the box's width / height.

    Returns:
        [B, H, W, C] float32 in 0..255.
    """
    batch, height, width, _ = images.shape
    box_rng, flip_rng = jax.random.split(rng)
    y0, x0, box_h, box_w = resized_crop_boxes(box_rng, batch, height, width, scale, ratio)
    whole = images.dtype == jnp.uint8

    def crop_resize(image, h, w, y, x):
        image = _pil_bilinear_pass(image, x, w, width, axis=1, whole=whole)
        return _pil_bilinear_pass(image, y, h, height, axis=0, whole=whole)

    images = jax.vmap(crop_resize)(images.astype(jnp.float32), box_h, box_w, y0, x0)
    if flip:
        flipped = jax.random.bernoulli(flip_rng, 0.5, (batch,))
        images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1, :], images)
    return images


def _pil_bilinear_pass(
    image: jax.Array, start: jax.Array, length: jax.Array, size: int, axis: int, whole: bool
) -> jax.Array:
    """One pass of PIL's bilinear resize, enlarging `length` pixels from `start` along `axis`
    of `image` ([H, W, C] float) to `size`: output i reads the crop at (i + 0.5) * length / size
    - 0.5, clamped to the crop, between its two neighbours (PIL's triangle kernel of support
    one, renormalised inside the crop). `whole`: rounded half up, as PIL's 8-bit pass."""
    centre = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (length / size) - 0.5
    centre = jnp.clip(centre, 0.0, length - 1.0)
    low = jnp.floor(centre)
    frac = centre - low
    low_index = (start + low).astype(jnp.int32)
    high_index = (start + jnp.minimum(low + 1.0, length - 1.0)).astype(jnp.int32)
    shape = [1, 1, 1]
    shape[axis] = size
    frac = frac.reshape(shape)
    out = (1.0 - frac) * jnp.take(image, low_index, axis=axis) + frac * jnp.take(
        image, high_index, axis=axis
    )
    return jnp.floor(out + 0.5) if whole else out


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """Maps uint8 pixels to standardised float32: (x / 255 - mean) / std per channel.

    Args:
        images: [B, H, W, C] uint8 (or float in 0..255).
        mean: [C] per-channel mean in [0, 1] units (e.g. `DATASETS[name].mean`).
        std: [C] per-channel std in [0, 1] units.

    Returns:
        [B, H, W, C] float32.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std
