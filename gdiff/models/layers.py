"""Building blocks of the ADM networks: timestep embedding, GroupNorm, convolutions, resampling.

Everything is NHWC. Parameters are float32; `dtype` is the compute dtype of convolutions and dense
layers. Normalisation always runs in float32 (the reference's `GroupNorm32` upcasts too), because
bfloat16 statistics over large feature maps lose too many bits.

Initialisation is the reference's: PyTorch's default initialisers for every convolution, dense
layer and embedding, and zeros for the layers the reference wraps in `zero_module` (each caller
passes `zero_init=True` for those), so a fresh network starts where a fresh reference network does.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gdiff.models import conv

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


# PyTorch's default initialisers, which the reference keeps everywhere it does not zero a layer:
# Conv and Linear weights kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) (variance 1/(3 fan_in)),
# biases U(+-1/sqrt(fan_in)) with the weight's fan_in (input channels x kernel area).
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable:
    """PyTorch's default bias initialiser of a layer with `fan_in` inputs: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _init_kwargs(fan_in: int, zero_init: bool) -> dict:
    """kernel_init/bias_init: zeros (the reference's `zero_module`) or PyTorch's defaults."""
    if zero_init:
        return {"kernel_init": nn.initializers.zeros, "bias_init": nn.initializers.zeros}
    return {"kernel_init": TORCH_KERNEL_INIT, "bias_init": torch_bias_init(fan_in)}


Layer = Callable[[jax.Array], jax.Array]


def _conv(features: int, size: int, dtype: Dtype, name: str, *, stride: int, padding, zero_init):
    """A size x size `nn.Conv` created on first call, when its input width C (the fan-in of
    PyTorch's bias initialiser) is known; inside the calling module's compact method."""

    def apply(x: jax.Array) -> jax.Array:
        return nn.Conv(
            features,
            (size, size),
            strides=(stride, stride),
            padding=padding,
            dtype=dtype,
            param_dtype=jnp.float32,
            name=name,
            # Bitwise lax's; its input gradient stays fast inside the sampler's scan (conv.py).
            conv_general_dilated=conv.conv_general_dilated,
            **_init_kwargs(size * size * x.shape[-1], zero_init),
        )(x)

    return apply


def conv3x3(
    features: int, dtype: Dtype, name: str, stride: int = 1, *, zero_init: bool = False
) -> Layer:
    """A 3x3 convolution padded by one pixel on every side, initialised like PyTorch's Conv2d.

    Explicit ((1, 1), (1, 1)) padding, not "SAME": for stride 2 on even sizes "SAME" pads (0, 1)
    and shifts every downsampled feature map by half a pixel relative to the reference.

    Returns a function of x [B, H, W, C] that creates the `nn.Conv` (parameters under `name`) when
    called, inside the calling module's compact method: the bias initialiser needs C.
    """
    padding = ((1, 1), (1, 1))
    return _conv(features, 3, dtype, name, stride=stride, padding=padding, zero_init=zero_init)


def conv1x1(features: int, dtype: Dtype, name: str, *, zero_init: bool = False) -> Layer:
    """A 1x1 convolution (the reference's skip connections and the adaptive pool's head)."""
    return _conv(features, 1, dtype, name, stride=1, padding="VALID", zero_init=zero_init)


def dense(features: int, dtype: Dtype, name: str, *, zero_init: bool = False) -> Layer:
    """A dense layer with float32 parameters (the reference's Linear and 1x1 Conv1d), initialised
    like them (see `conv3x3` for why it returns a function of x [..., C])."""

    def apply(x: jax.Array) -> jax.Array:
        return nn.Dense(
            features,
            dtype=dtype,
            param_dtype=jnp.float32,
            name=name,
            **_init_kwargs(x.shape[-1], zero_init),
        )(x)

    return apply


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


def _area_windows(size_in: int, size_out: int) -> np.ndarray:
    """0/1 matrix [size_out, size_in]: output i covers inputs floor(i * in / out) up to
    ceil((i + 1) * in / out) - 1, PyTorch's adaptive average pooling windows."""
    i = np.arange(size_out)
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)
    j = np.arange(size_in)
    return ((j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])).astype(np.float32)


def area_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """Resizes [B, h, w, C] to [B, height, width, C] like torch `interpolate(mode="area")`.

    That is adaptive average pooling: each output pixel is the mean of its window of input pixels
    (non-overlapping blocks when the sizes divide). The reference's super_res_train.py makes its
    low-resolution inputs this way. Window sums are exact matrix products (highest precision, so
    TF32 never rounds the pixels), divided by the window size as PyTorch does.
    """
    rows = _area_windows(x.shape[1], height)
    cols = _area_windows(x.shape[2], width)
    sums = jnp.einsum(
        "oh,bhwc,pw->bopc",
        rows,
        x.astype(jnp.float32),
        cols,
        precision=jax.lax.Precision.HIGHEST,
    )
    counts = rows.sum(axis=1)[:, None, None] * cols.sum(axis=1)[None, :, None]
    return (sums / counts).astype(x.dtype)
