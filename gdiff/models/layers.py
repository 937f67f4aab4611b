"""Building blocks of the ADM networks: timestep embedding, GroupNorm, convolutions, resampling.

Everything is NHWC. Parameters are float32; `dtype` is the compute dtype of convolutions and dense
layers. Normalisation always runs in float32 (the reference's `GroupNorm32` upcasts too), because
bfloat16 statistics over large feature maps lose too many bits.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# The reference's normalization(): 32 groups, PyTorch's default epsilon.
NUM_GROUPS = 32
GROUP_NORM_EPS = 1e-5


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, always in float32.

    Args:
      timesteps: [B] ints or floats (rescaled diffusions hand the model non-integer steps).
      dim: embedding width.
      max_period: the slowest frequency's period.

    Returns:
      [B, dim] float32: cosines of the first half of the frequencies, then sines (the reference's
      order), zero-padded by one column when `dim` is odd.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def group_norm(name: str) -> nn.Module:
    """A float32 GroupNorm whose parameters sit directly under `name` (scale, bias)."""
    return nn.GroupNorm(
        num_groups=NUM_GROUPS,
        epsilon=GROUP_NORM_EPS,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name=name,
    )


def normalize(norm: nn.Module, x: jax.Array) -> jax.Array:
    """Applies a float32 norm layer and casts back, like the reference's GroupNorm32."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def conv3x3(features: int, dtype: Dtype, name: str, stride: int = 1) -> nn.Conv:
    """A 3x3 convolution padded by one pixel on every side.

    Explicit ((1, 1), (1, 1)) padding, not "SAME": for stride 2 on even sizes "SAME" pads (0, 1)
    and shifts every downsampled feature map by half a pixel relative to the reference.
    """
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def conv1x1(features: int, dtype: Dtype, name: str) -> nn.Conv:
    """A 1x1 convolution (the reference's skip connections and the adaptive pool's head)."""
    return nn.Conv(
        features, (1, 1), padding="VALID", dtype=dtype, param_dtype=jnp.float32, name=name
    )


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    """A dense layer with float32 parameters (the reference's Linear and 1x1 Conv1d)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C] by nearest-neighbour repetition."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H//2, W//2, C], 2x2 mean (odd edges dropped, as PyTorch's AvgPool2d)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class _Resample(nn.Module):
    """x2 resampling of a [B, H, W, C] map, optionally through a 3x3 conv to `channels`."""

    channels: int
    use_conv: bool
    dtype: Dtype = jnp.float32


class Upsample(_Resample):
    """Nearest x2 upsampling, optionally followed by a 3x3 conv (parameters under `conv`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest(x)
        if self.use_conv:
            x = conv3x3(self.channels, self.dtype, "conv")(x)
        return x


class Downsample(_Resample):
    """Stride-2 3x3 conv (parameters under `op`, as the reference) or 2x2 average pooling."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return conv3x3(self.channels, self.dtype, "op", stride=2)(x)
        if x.shape[-1] != self.channels:
            raise ValueError(
                f"average-pool downsampling cannot change channels ({x.shape[-1]} -> "
                f"{self.channels})"
            )
        return avg_pool2(x)


def bilinear_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """Resizes [B, h, w, C] to [B, height, width, C] like torch `interpolate(mode="bilinear")`.

    Half-pixel centres (align_corners=False) and no antialiasing: for upsampling this is exactly
    PyTorch's result (edge samples clamp to the border pixel in both); antialias=False keeps the
    match for downsampling too, where PyTorch does not filter either.
    """
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, height, width, c), method="bilinear", antialias=False)
