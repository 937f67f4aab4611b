"""gdiff/models/conv.py: lax's convolution with an explicit input gradient.

The values (output, input gradient, kernel gradient) must be lax autodiff's bit for bit, and
inside a scan the input gradient must be an ordinary HWIO convolution (the reason it exists:
XLA:CPU runs the reversed-view form autodiff produces far slower inside a while loop).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gdiff.models import conv

DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _ours(x, w, strides, padding):
    return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _loss(fn, strides, padding):
    # Uses the input twice, as a ResBlock does, so the gradient sums two paths.
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w, strides, padding)) * fn(x, w, strides, padding))


CASES = [
    ((3, 3, 8, 16), (1, 1), ((1, 1), (1, 1)), jnp.float32),
    ((1, 1, 8, 16), (1, 1), "VALID", jnp.float32),
    ((3, 3, 8, 16), (1, 1), ((1, 1), (1, 1)), jnp.bfloat16),
    ((3, 3, 8, 16), (2, 2), ((1, 1), (1, 1)), jnp.float32),  # strided: plain lax
]


@pytest.mark.parametrize(("kernel", "strides", "padding", "dtype"), CASES)
def test_values_and_gradients_are_lax_autodiffs_bit_for_bit(kernel, strides, padding, dtype):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, kernel[2])).astype(dtype)
    w = (0.2 * jax.random.normal(jax.random.key(1), kernel)).astype(dtype)
    np.testing.assert_array_equal(
        jax.jit(_ours, static_argnums=(2, 3))(x, w, strides, padding),
        jax.jit(_lax, static_argnums=(2, 3))(x, w, strides, padding),
    )
    ours = jax.jit(jax.grad(_loss(_ours, strides, padding), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(_loss(_lax, strides, padding), argnums=(0, 1)))(x, w)
    for a, b in zip(ours, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _scan_of_input_grads(fn):
    def run(w, x):
        grad = jax.grad(_loss(fn, (1, 1), ((1, 1), (1, 1))))

        def body(x, _):
            return x + 1e-2 * grad(x, w), None

        return lax.scan(body, x, None, length=3)[0]

    return jax.jit(run)


def test_inside_a_scan_the_input_gradient_is_an_ordinary_convolution():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
    w = 0.2 * jax.random.normal(jax.random.key(1), (3, 3, 8, 8))
    ours, plain = _scan_of_input_grads(_ours), _scan_of_input_grads(_lax)
    np.testing.assert_array_equal(ours(w, x), plain(w, x))
    labels = re.findall(r"dim_labels=(\S+?)[,\s]", ours.lower(w, x).compile().as_text())
    assert labels and set(labels) == {"b01f_01io->b01f"}, labels
