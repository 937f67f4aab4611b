"""Timestep samplers: uniform weights, loss-aware warm-up and reweighting, and an in-order update
that matches the reference's Python loop even with repeated timesteps in one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdiff import diffusion as gdd


def _diffusion(steps):
    return gdd.create_gaussian_diffusion(steps=steps, noise_schedule="cosine")


def _reference_update(history, counts, ts, losses, hist_len):
    """The reference's LossSecondMomentResampler.update_with_all_losses, loop and all."""
    history, counts = history.copy(), counts.copy()
    for t, loss in zip(ts, losses, strict=True):
        if counts[t] == hist_len:
            history[t, :-1] = history[t, 1:]
            history[t, -1] = loss
        else:
            history[t, counts[t]] = loss
            counts[t] += 1
    return history, counts


def test_uniform_sampler():
    s = gdd.create_named_schedule_sampler("uniform", _diffusion(10))
    state = s.init_state()
    t, w = jax.jit(s.sample, static_argnums=2)(state, jax.random.key(0), 4096)
    assert t.dtype == jnp.int32 and w.dtype == jnp.float32 and t.shape == (4096,)
    np.testing.assert_array_equal(w, 1.0)
    counts = np.bincount(np.asarray(t), minlength=10)
    assert counts.min() > 300 and t.min() >= 0 and t.max() <= 9
    assert s.update(state, t, w) == state


def test_update_with_duplicates_matches_the_reference_loop():
    steps, hist_len = 6, 4
    s = gdd.LossSecondMomentResampler(_diffusion(steps), history_per_term=hist_len)
    state = s.init_state()
    rng = np.random.default_rng(0)
    history = np.zeros((steps, hist_len), np.float32)
    counts = np.zeros(steps, np.int64)
    update = jax.jit(s.update)
    # Batches with many repeats of one timestep (more than the window) and partial histories.
    batches = [
        np.array([2, 2, 2, 0, 2, 2, 2, 5, 2]),
        np.array([0, 0, 1]),
        rng.integers(0, steps, 9),
        np.array([3, 3, 3, 3, 3, 3, 3, 3, 3]),
        rng.integers(0, steps, 9),
    ]
    for ts in batches:
        losses = rng.normal(size=ts.shape).astype(np.float32)
        state = update(state, jnp.asarray(ts), jnp.asarray(losses))
        history, counts = _reference_update(history, counts, ts, losses, hist_len)
        np.testing.assert_array_equal(state["counts"], counts)
        np.testing.assert_array_equal(state["history"], history)


def test_loss_aware_warm_up_then_favours_high_loss_timesteps():
    steps = 8
    s = gdd.create_named_schedule_sampler("loss-second-moment", _diffusion(steps))
    assert isinstance(s, gdd.LossSecondMomentResampler)
    state = s.init_state()
    sample = jax.jit(s.sample, static_argnums=2)
    update = jax.jit(s.update)
    # Losses grow with t: timestep 7 has 8x the loss of timestep 0.
    all_ts = jnp.tile(jnp.arange(steps), 3)
    losses = (1.0 + all_ts).astype(jnp.float32)
    for _ in range(3):
        _, w = sample(state, jax.random.key(0), 16)
        np.testing.assert_array_equal(w, 1.0)  # still warming up: uniform
        state = update(state, all_ts, losses)
    # 3 passes x 3 copies = 9 < 10 entries per timestep: not yet warm.
    np.testing.assert_array_equal(state["counts"], 9)
    np.testing.assert_array_equal(s.weights(state), 1.0)
    state = update(state, jnp.arange(steps), (1.0 + jnp.arange(steps)).astype(jnp.float32))
    np.testing.assert_array_equal(state["counts"], 10)

    w_all = np.asarray(s.weights(state))
    expected = (1.0 + np.arange(steps)) / np.sum(1.0 + np.arange(steps))
    expected = expected * (1 - 0.001) + 0.001 / steps
    np.testing.assert_allclose(w_all, expected, rtol=1e-5)
    t, w = sample(state, jax.random.key(1), 20000)
    freq = np.bincount(np.asarray(t), minlength=steps) / 20000
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert freq[-1] > 4 * freq[0]
    # Importance weights undo the non-uniform sampling: w = 1 / (T p_t).
    np.testing.assert_allclose(np.asarray(w), 1.0 / (steps * expected[np.asarray(t)]), rtol=1e-5)


def test_unknown_sampler_and_bad_update():
    with pytest.raises(ValueError, match="unknown schedule sampler: 'beta'"):
        gdd.create_named_schedule_sampler("beta", _diffusion(10))
    s = gdd.LossSecondMomentResampler(_diffusion(10))
    with pytest.raises(ValueError, match="one length"):
        s.update(s.init_state(), jnp.zeros(3, jnp.int32), jnp.zeros(4))
