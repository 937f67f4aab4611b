"""Properties of the diffusion core that hold for any schedule: marginals, DDIM invertibility,
one compile per jitted loop, scan == Python loop of single steps, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_l2

from gdiff import diffusion as gdd

SHAPE = (2, 4, 6, 3)  # H != W on purpose


def _diffusion(steps=20, schedule="cosine", mean="EPSILON", var="FIXED_LARGE", loss="MSE", **kw):
    return gdd.GaussianDiffusion(
        betas=gdd.get_named_beta_schedule(schedule, steps),
        model_mean_type=mean,
        model_var_type=var,
        loss_type=loss,
        **kw,
    )


def _toy_model(channels_out: int, counter: list | None = None):
    """A small deterministic 'network' that depends on x and on ts."""
    w = jnp.linspace(-0.5, 0.5, SHAPE[-1] * channels_out).reshape(SHAPE[-1], channels_out)

    def model_fn(x, ts):
        if counter is not None:
            counter.append(1)  # runs once per trace, not per call of the compiled function
        scale = 1.0 + 0.001 * ts.astype(jnp.float32).reshape(-1, 1, 1, 1)
        return jnp.tanh(jnp.einsum("bhwc,cd->bhwd", x, w) * scale)

    return model_fn


def test_q_sample_marginals():
    d = _diffusion(steps=100, schedule="linear")
    n = 20000
    x_start = jnp.full((n, 1, 1, 2), 0.7)
    noise = jax.random.normal(jax.random.key(0), x_start.shape)
    for t_val in (0, 37, 99):
        t = jnp.full((n,), t_val)
        x_t = np.asarray(d.q_sample(x_start, t, noise))
        want_mean = np.sqrt(d.alphas_cumprod[t_val]) * 0.7
        want_var = 1.0 - d.alphas_cumprod[t_val]
        # 5 standard errors of the sample mean / variance.
        assert abs(x_t.mean() - want_mean) < 5 * np.sqrt(want_var / (2 * n))
        assert abs(x_t.var() / want_var - 1.0) < 5 * np.sqrt(2.0 / (2 * n))
        mean, var, log_var = d.q_mean_variance(x_start[:4], t[:4])
        np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
        np.testing.assert_allclose(var, want_var, rtol=1e-6)
        np.testing.assert_allclose(np.exp(log_var), want_var, rtol=1e-5)


def test_ddim_reverse_then_ddim_recovers_x0():
    """x_0 ~ N(0, s^2 I) has the exact eps-predictor eps(x_t) = sqrt(1-a) / (a s^2 + 1 - a) x_t
    (a = alphas_cumprod[t]), so DDIM is a discretised ODE: encoding then decoding returns x_0 up
    to a discretisation error that shrinks with the chain's step size."""
    s = 0.5
    errors = []
    for steps in (250, 1000):
        d = _diffusion(steps=steps, var="FIXED_SMALL")
        abar = jnp.asarray(d.alphas_cumprod.astype(np.float32))

        def model_fn(x, ts, abar=abar):
            a = abar[ts].reshape(-1, 1, 1, 1)
            return jnp.sqrt(1 - a) / (a * s * s + 1 - a) * x

        x0 = s * jax.random.normal(jax.random.key(1), SHAPE)
        x_T = jax.jit(lambda x, d=d, m=model_fn: d.ddim_reverse_sample_loop(m, x, False))(x0)
        # The encoding really moved: x_T is nearly independent of x_0 in scale and direction.
        assert rel_l2(x_T, x0) > 0.9
        assert 0.8 < float(jnp.std(x_T)) < 1.2
        back = jax.jit(
            lambda n, d=d, m=model_fn: d.ddim_sample_loop(
                m, SHAPE, jax.random.key(0), clip_denoised=False, noise=n
            )
        )(x_T)
        errors.append(rel_l2(back, x0))
    assert errors[1] < 1e-2, errors
    assert errors[1] < errors[0] / 2, errors  # first-order convergence in the step size


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_jitted_loop_compiles_once_and_matches_single_steps(loop):
    d = _diffusion(steps=8, var="LEARNED_RANGE")
    counter: list = []
    model_fn = _toy_model(2 * SHAPE[-1], counter)
    cond_counter: list = []

    def cond_fn(x, ts):
        cond_counter.append(1)
        return -0.1 * x

    kw = {"eta": 0.3} if loop == "ddim_sample_loop" else {}
    run = jax.jit(
        lambda rng, n, sn: getattr(d, loop)(
            model_fn, SHAPE, rng, cond_fn=cond_fn, noise=n, step_noise=sn, **kw
        )
    )
    x_T = jax.random.normal(jax.random.key(3), SHAPE)
    step_noise = jax.random.normal(jax.random.key(4), (d.num_timesteps, *SHAPE))
    out1 = run(jax.random.key(0), x_T, step_noise)
    out2 = run(jax.random.key(1), x_T * 0.5, step_noise)
    assert len(counter) == 1 and len(cond_counter) == 1
    assert rel_l2(out1, out2) > 1e-3

    # The same chain as a Python loop of single steps, replaying the same noise.
    step = getattr(d, "ddim_sample" if loop == "ddim_sample_loop" else "p_sample")
    x = x_T
    for k, i in enumerate(range(d.num_timesteps - 1, -1, -1)):
        t = jnp.full((SHAPE[0],), i)
        x = step(model_fn, x, t, step_noise[k], cond_fn=cond_fn, **kw)["sample"]
    assert rel_l2(out1, x) < 1e-5


def test_rng_draws_are_replayable_and_trajectories_have_shapes():
    d = _diffusion(steps=6, var="FIXED_SMALL")
    model_fn = _toy_model(SHAPE[-1])

    @jax.jit
    def run(key_a, key_c):
        a = d.p_sample_loop(model_fn, SHAPE, key_a, return_trajectory=True)
        b = d.p_sample_loop(model_fn, SHAPE, key_a)
        c = d.p_sample_loop(model_fn, SHAPE, key_c)
        r = d.ddim_sample_loop(model_fn, SHAPE, key_a, return_trajectory=True)
        enc = d.ddim_reverse_sample_loop(model_fn, r["sample"], return_trajectory=True)
        return a, b, c, r, enc

    a, b, c, r, enc = run(jax.random.key(7), jax.random.key(8))
    np.testing.assert_array_equal(a["sample"], b)
    assert rel_l2(c, b) > 1e-2
    assert a["trajectory"].shape == (6, *SHAPE) == a["pred_xstart_trajectory"].shape
    np.testing.assert_array_equal(a["trajectory"][-1], a["sample"])
    assert r["trajectory"].shape == (6, *SHAPE) == r["pred_xstart_trajectory"].shape
    # Clipped x_0 predictions.
    assert float(jnp.abs(r["pred_xstart_trajectory"]).max()) <= 1.0
    assert enc["trajectory"].shape == (6, *SHAPE)
    np.testing.assert_array_equal(enc["trajectory"][-1], enc["sample"])


def test_spaced_loop_runs_on_the_respaced_chain():
    base = gdd.get_named_beta_schedule("linear", 100)
    d = gdd.SpacedDiffusion(
        gdd.space_timesteps(100, "ddim10"),
        betas=base,
        model_mean_type="EPSILON",
        model_var_type="FIXED_LARGE",
        loss_type="MSE",
        rescale_timesteps=True,
    )
    seen = []

    def model_fn(x, ts):
        seen.append(ts)
        return 0.1 * x

    out = d.ddim_sample_loop(model_fn, SHAPE, jax.random.key(0), return_trajectory=True)
    assert out["trajectory"].shape == (10, *SHAPE)
    # Outside a trace, the model sees the original timesteps rescaled to 0..1000.
    d.p_mean_variance(model_fn, out["sample"], jnp.array([9, 0]))
    np.testing.assert_allclose(seen[-1], [900.0, 0.0])


def test_hybrid_loss_stops_the_vb_gradient_at_the_mean():
    x_start = jnp.clip(jax.random.normal(jax.random.key(0), SHAPE), -1, 1)
    noise = jax.random.normal(jax.random.key(1), SHAPE)
    t = jnp.array([0, 13])
    out0 = jax.random.normal(jax.random.key(2), (*SHAPE[:-1], 2 * SHAPE[-1]))
    diffs = {
        loss: _diffusion(steps=20, var="LEARNED_RANGE", loss=loss)
        for loss in ("MSE", "RESCALED_MSE", "KL", "RESCALED_KL")
    }

    @jax.jit
    def run(o):
        def losses(loss, o):
            return diffs[loss].training_losses(lambda *_: o, x_start, t, noise)

        grads = {
            name: jax.grad(lambda o, name=name: losses("RESCALED_MSE", o)[name].sum())(o)
            for name in ("vb", "mse", "loss")
        }
        return grads, {loss: losses(loss, o) for loss in diffs}

    grads, out = run(out0)
    c = SHAPE[-1]
    np.testing.assert_array_equal(grads["vb"][..., :c], 0.0)  # vb never moves the mean prediction
    assert float(jnp.abs(grads["vb"][..., c:]).max()) > 0  # ... but trains the variance
    np.testing.assert_allclose(grads["loss"][..., :c], grads["mse"][..., :c], rtol=1e-6)
    assert set(out["RESCALED_MSE"]) == set(out["MSE"]) == {"loss", "mse", "vb"}
    assert set(out["KL"]) == set(out["RESCALED_KL"]) == {"loss"}
    # RESCALED_MSE scales vb by T / 1000; RESCALED_KL multiplies by T.
    np.testing.assert_allclose(out["RESCALED_MSE"]["vb"], out["MSE"]["vb"] * 20 / 1000, rtol=1e-6)
    np.testing.assert_allclose(out["RESCALED_KL"]["loss"], out["KL"]["loss"] * 20, rtol=1e-6)
    np.testing.assert_allclose(out["KL"]["loss"], out["MSE"]["vb"], rtol=1e-6)


def test_calc_bpd_loop_totals():
    d = _diffusion(steps=10, var="LEARNED_RANGE")
    model_fn = _toy_model(2 * SHAPE[-1])
    x_start = (
        jnp.round(jnp.clip(jax.random.normal(jax.random.key(0), SHAPE), -1, 1) * 127.5) / 127.5
    )
    noise = jax.random.normal(jax.random.key(2), (10, *SHAPE))
    zeros = jnp.zeros(SHAPE[0], jnp.int32)

    @jax.jit
    def run(x):
        out = d.calc_bpd_loop(model_fn, x, jax.random.key(1))
        replay = d.calc_bpd_loop(model_fn, x, None, noise=noise)
        x_t = d.q_sample(x, zeros, noise[-1])
        return out, replay, d._vb_terms_bpd(model_fn, x, x_t, zeros)["output"]

    out, replay, nll = run(x_start)
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (SHAPE[0], 10)
    np.testing.assert_allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], rtol=1e-6)
    assert np.all(np.asarray(out["vb"]) >= 0) and np.all(np.asarray(out["prior_bpd"]) >= 0)
    # Column 0 is t = T-1, as the reference stacks it; the last column is the decoder NLL at t=0.
    np.testing.assert_allclose(replay["vb"][:, -1], nll, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    d = _diffusion(steps=10, var="LEARNED")
    x = jnp.zeros(SHAPE)
    t = jnp.zeros(SHAPE[0], jnp.int32)
    with pytest.raises(ValueError, match=r"model_fn returned shape .*2\*C = 6 channels"):
        d.p_mean_variance(_toy_model(SHAPE[-1]), x, t)
    with pytest.raises(ValueError, match="model_fn returned shape"):
        d.training_losses(_toy_model(SHAPE[-1]), x, t, x)
    with pytest.raises(ValueError, match="t must have shape"):
        d.q_sample(x, jnp.zeros(5, jnp.int32), x)
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x, t, jnp.zeros((2, 4, 6, 1)))
    with pytest.raises(ValueError, match="step_noise has shape"):
        d.p_sample_loop(_toy_model(6), SHAPE, jax.random.key(0), step_noise=jnp.zeros((3, *SHAPE)))
    with pytest.raises(ValueError, match=r"noise \(x_T\) has shape"):
        d.ddim_sample_loop(_toy_model(6), SHAPE, jax.random.key(0), noise=jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="eta must be 0"):
        d.ddim_reverse_sample(_toy_model(6), x, t, eta=0.5)
    with pytest.raises(ValueError, match="not a ModelVarType"):
        _diffusion(var="LEARNT")
    with pytest.raises(ValueError, match="betas must lie in"):
        _diffusion(steps=10, schedule="linear")
    with pytest.raises(ValueError, match="unknown beta schedule"):
        gdd.create_gaussian_diffusion(noise_schedule="sigmoid")
    with pytest.raises(ValueError, match="cannot divide"):
        gdd.create_gaussian_diffusion(steps=100, timestep_respacing="250")
