"""classifier_cond_fn: the scaled gradient of log p(y | x_t), checked against a closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdiff import diffusion as gdd

B, H, W, C, K = 3, 4, 5, 2, 4


def _linear_classifier():
    """logits = flatten(x) @ A + ts * b: the gradient of log_softmax is known in closed form."""
    a = jax.random.normal(jax.random.key(0), (H * W * C, K))
    b = jnp.linspace(-1.0, 1.0, K)

    def apply(x, ts):
        return x.reshape(x.shape[0], -1) @ a + ts.astype(jnp.float32)[:, None] * b

    return apply, a


def _closed_form(x, ts, y, apply, a):
    # d/dx log_softmax(l)[y] = A[:, y] - A @ softmax(l)
    p = jax.nn.softmax(apply(x, ts), axis=-1)
    g = a[:, y].T - p @ a.T
    return g.reshape(x.shape)


def test_gradient_matches_closed_form_with_scalar_and_per_example_scale():
    apply, a = _linear_classifier()
    x = jax.random.normal(jax.random.key(1), (B, H, W, C))
    ts = jnp.array([0.0, 10.0, 500.0])
    y = jnp.array([1, 3, 0])
    want = np.asarray(_closed_form(x, ts, y, apply, a))

    got = jax.jit(gdd.classifier_cond_fn(apply, y, 2.5))(x, ts)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, 2.5 * want, rtol=1e-5, atol=1e-6)

    scales = jnp.array([0.0, 1.0, 4.0])
    got = gdd.classifier_cond_fn(apply, y, scales)(x, ts)
    np.testing.assert_allclose(got, np.asarray(scales)[:, None, None, None] * want, atol=1e-5)


def test_bfloat16_logits_use_a_float32_softmax():
    apply, a = _linear_classifier()
    x = jax.random.normal(jax.random.key(2), (B, H, W, C))
    ts = jnp.zeros(B)
    y = jnp.array([0, 1, 2])
    got = gdd.classifier_cond_fn(lambda x, t: apply(x, t).astype(jnp.bfloat16), y, 1.0)(x, ts)
    assert got.dtype == jnp.float32
    want = np.asarray(_closed_form(x, ts, y, apply, a))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def test_guided_sampling_moves_towards_the_label():
    """A guided DDIM chain ends with a higher classifier probability for y than an unguided one."""
    apply, _ = _linear_classifier()
    d = gdd.create_gaussian_diffusion(steps=100, noise_schedule="cosine", timestep_respacing="10")
    y = jnp.array([2, 2, 2])

    def model_fn(x, ts):
        return 0.5 * x

    @jax.jit
    def run(scale):
        cond = gdd.classifier_cond_fn(apply, y, scale)
        x = d.ddim_sample_loop(model_fn, (B, H, W, C), jax.random.key(3), cond_fn=cond)
        return jax.nn.log_softmax(apply(x, jnp.zeros(B)), axis=-1)[:, 2]

    assert float(run(jnp.full((B,), 5.0)).mean()) > float(run(jnp.zeros(B)).mean()) + 0.5


def test_bad_scale_or_labels():
    apply, _ = _linear_classifier()
    x = jnp.zeros((B, H, W, C))
    with pytest.raises(ValueError, match="scale has shape"):
        gdd.classifier_cond_fn(apply, jnp.zeros(B, jnp.int32), jnp.ones(2))(x, jnp.zeros(B))
    with pytest.raises(ValueError, match="labels y have shape"):
        gdd.classifier_cond_fn(apply, jnp.zeros(2, jnp.int32), 1.0)(x, jnp.zeros(B))
