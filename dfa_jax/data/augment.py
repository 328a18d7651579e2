"""On-device augmentation and normalisation, pure JAX, called inside the jitted train/eval steps.

The host ships uint8 batches (4x less transfer than float32) and the step augments and
normalises them. The CIFAR recipe (DESIGN §4) is `random_crop_flip` (pad 4, reflect, random 32x32
crop, horizontal flip) then `normalize`. CINIC-10's recipe uses RandomResizedCrop(32) + flip
instead of the padded crop; that transform belongs in this module, next to `random_crop_flip`,
with the same (images, rng, ...) -> images signature so the step can pick either by config.
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
