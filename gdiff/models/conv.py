"""The convolution every network layer calls: `lax.conv_general_dilated` with an explicit input
gradient for stride-1 NHWC convolutions.

Why: classifier guidance differentiates the classifier once per sampling step, inside the
sampler's `lax.scan`. Autodiff's input gradient of a convolution is a convolution with the kernel
reversed and its feature dimensions swapped, which it expresses through the dimension numbers
(`dim_labels=..._01oi->...`). Outside a loop XLA:CPU materialises that kernel in the layout its
fast convolution wants; inside a while loop it keeps the view, and those convolutions run far
slower: on this project's 2-core CPU the guidance gradient of the scaled-down ADM classifier of
`../shared/bench/reference_sampling_cpu.json` took 383 ms per step inside a scan against 227 ms
as one jitted call (batch 4, float32; benchmarks/RESULTS.md has the commands). Writing the
gradient as a convolution with `flip(w).swapaxes(I, O)` (an ordinary HWIO kernel) gives XLA the
same program inside and outside the loop. The values are those of autodiff, bit for bit
(tests/test_models.py), and the kernel gradient is still autodiff's.

Other convolutions (strided, dilated, grouped, another layout) go straight to lax.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# NHWC inputs and outputs, HWIO kernels: lax's spec tuples for flax's 2-D convolutions.
_NHWC = (0, 3, 1, 2)
_HWIO = (3, 2, 0, 1)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` (the signature `flax.linen.Conv` calls it with), with the
    explicit input gradient of the module docstring where it applies."""
    plain = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
    )
    pads = _explicit_padding(padding, rhs.shape)
    simple = (
        lhs.ndim == 4
        and pads is not None
        and all(int(s) == 1 for s in window_strides)
        and all(int(d) == 1 for d in (lhs_dilation or (1, 1)))
        and all(int(d) == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and _is_nhwc_hwio(dimension_numbers, lhs.ndim)
    )
    if not simple:
        return plain(lhs, rhs)
    return _stride1_conv(lhs, rhs, pads, precision)


def _explicit_padding(padding: Any, kernel_shape: Sequence[int]):
    """((lo, hi), (lo, hi)) for "VALID" or explicit pairs; None otherwise ("SAME": plain lax)."""
    if isinstance(padding, str):
        return ((0, 0), (0, 0)) if padding.upper() == "VALID" else None
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return pads if len(pads) == len(kernel_shape) - 2 else None


def _is_nhwc_hwio(dimension_numbers: Any, ndim: int) -> bool:
    if dimension_numbers is None or ndim != 4:
        return False
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    return tuple(dn.lhs_spec) == _NHWC and tuple(dn.rhs_spec) == _HWIO and dn.out_spec == _NHWC


def _nhwc(x: jax.Array, w: jax.Array, pads, precision) -> jax.Array:
    return lax.conv_general_dilated(
        x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _stride1_conv(x: jax.Array, w: jax.Array, pads, precision) -> jax.Array:
    return _nhwc(x, w, pads, precision)


def _stride1_conv_fwd(x, w, pads, precision):
    return _nhwc(x, w, pads, precision), (x, w)


def _stride1_conv_bwd(pads, precision, residuals, g):
    x, w = residuals
    # The transpose of a stride-1 convolution padded (lo, hi) with a k-wide kernel: the flipped
    # kernel with input and output features exchanged, padded (k - 1 - lo, k - 1 - hi).
    back = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(w.shape[:2], pads, strict=True))
    grad_x = _nhwc(g, jnp.flip(w, (0, 1)).swapaxes(2, 3), back, precision)
    _, kernel_vjp = jax.vjp(lambda kernel: _nhwc(x, kernel, pads, precision), w)
    return grad_x.astype(x.dtype), kernel_vjp(g)[0]


_stride1_conv.defvjp(_stride1_conv_fwd, _stride1_conv_bwd)
