"""On-device augmentation and normalisation, pure JAX, called inside the jitted train/eval steps.

The host ships uint8 batches (4x less transfer than float32) and the step augments and
normalises them. The CIFAR recipe (§4.1) is `random_crop_flip` (pad 4, reflect, random 32x32
crop, horizontal flip) then `normalize`; CINIC-10's is `random_resized_crop_flip`
(torchvision's RandomResizedCrop(32) + flip) then `normalize` (`data.augment` picks).
"""

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


def random_resized_crop_flip(
    images: jax.Array,
    rng: jax.Array,
    flip: bool,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> jax.Array:
    """RandomResizedCrop to the input size, then a random horizontal flip (CINIC-10's recipe).

    Per example: an area fraction s ~ U(scale) and an aspect ratio r with log r ~ U(log ratio)
    give a box of h = sqrt(s*H*W/r), w = sqrt(s*H*W*r) pixels (clipped to the image, where
    torchvision would redraw up to ten times), placed uniformly, and resampled bilinearly to H x W.

    Args:
        images: [B, H, W, C] uint8 or float (0..255).
        rng: PRNG key; the output is a deterministic function of (images, rng).
        flip: whether to apply random horizontal flips (static).
        scale: range of the box's area as a fraction of the image's.
        ratio: range of the box's width / height.

    Returns:
        [B, H, W, C] float32 in 0..255 (resampling makes fractional values).
    """
    batch, height, width, channels = images.shape
    area_rng, ratio_rng, y_rng, x_rng, flip_rng = jax.random.split(rng, 5)
    area = jax.random.uniform(area_rng, (batch,), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(
        ratio_rng, (batch,), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1])
    )
    aspect = jnp.exp(log_ratio)
    box_h = jnp.clip(jnp.sqrt(area * height * width / aspect), 1.0, height)
    box_w = jnp.clip(jnp.sqrt(area * height * width * aspect), 1.0, width)
    y0 = jax.random.uniform(y_rng, (batch,)) * (height - box_h)
    x0 = jax.random.uniform(x_rng, (batch,)) * (width - box_w)

    def resize(image, h, w, y, x):
        scale_hw = jnp.stack([height / h, width / w])
        return jax.image.scale_and_translate(
            image,
            (height, width, channels),
            spatial_dims=(0, 1),
            scale=scale_hw,
            translation=-jnp.stack([y, x]) * scale_hw,
            method="linear",
            antialias=False,
        )

    images = jax.vmap(resize)(images.astype(jnp.float32), box_h, box_w, y0, x0)
    if flip:
        flipped = jax.random.bernoulli(flip_rng, 0.5, (batch,))
        images = jnp.where(flipped[:, None, None, None], images[:, :, ::-1, :], images)
    return images


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
