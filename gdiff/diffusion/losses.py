"""Likelihood helpers of the variational bound (the reference's `losses.py` and `nn.mean_flat`).

All functions broadcast like numpy and work on any layout (NHWC here); results are in nats.
"""

import jax.numpy as jnp
import numpy as np


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Any argument may be a Python scalar (e.g. the standard-normal prior, mean2 = logvar2 = 0).
    """
    mean1, logvar1, mean2, logvar2 = (jnp.asarray(a) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def _tanh(u: jnp.ndarray) -> jnp.ndarray:
    """tanh, accurate to about half an ulp where it saturates.

    XLA's CPU tanh rounds to exactly +-1 from |u| ~ 8 on (the true float32 value is 1 - 6e-8 up
    to |u| ~ 9), and the decoder likelihood takes differences of two such values: a bin far in a
    tail would get probability 0 (then the 1e-12 floor) where the reference gets ~1e-7. Away from 0
    we therefore use 1 - 2e / (1 + e), e = exp(-2|u|): a small, accurately computed correction
    followed by one rounding.
    """
    au = jnp.abs(u)
    e = jnp.exp(-2.0 * au)
    tail = 1.0 - 2.0 * e / (1.0 + e)
    return jnp.sign(u) * jnp.where(au > 0.55, tail, jnp.tanh(au))


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
    """The tanh approximation of the standard normal CDF that the reference uses."""
    return 0.5 * (1.0 + _tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> jnp.ndarray:
    """Log-probability (nats) of 8-bit pixels `x` (rescaled to [-1, 1]) under a Gaussian
    discretised into 2/255-wide bins; the two outermost bins extend to +-infinity.

    Args:
      x, means, log_scales: arrays of one shape (log_scales is the log standard deviation).
    Returns:
      log-probabilities with x's shape.
    """
    x, means, log_scales = jnp.asarray(x), jnp.asarray(means), jnp.asarray(log_scales)
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            "discretized_gaussian_log_likelihood needs x, means and log_scales of one shape, got "
            f"{x.shape}, {means.shape}, {log_scales.shape}"
        )
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    # The 1e-12 floors keep log() finite for bins far out in a tail.
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    # +-0.999 rather than +-1: the edge pixel values after quantisation are exactly +-1.
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
