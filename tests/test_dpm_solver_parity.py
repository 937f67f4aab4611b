"""DPM-Solver and DPM-Solver++ against the reference (solvers.npz), and order 1 against DDIM.

The UNet of unet_small.npz and the classifier of classifier_small.npz, rebuilt from their
config_json and converted weights exactly as tests/test_guided_sampling_parity.py does, drive
`dpm_solver_sample` under `jax.jit` for every case of solvers.npz (config_json.cases): the final
sample and every intermediate state must agree with `dpm_solver_pytorch.py` to rel-L2 1e-4, the
clipped schedule and the time steps closely.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_network, fixture_path, load_fixture, nchw_to_nhwc, rel_l2

from gdiff.compat import openai
from gdiff.diffusion import dpm_solver

TOL = 1e-4


def _cases() -> list[str]:
    # Parametrise over the fixture's own cases; without the fixture folder, one case that skips.
    try:
        path = fixture_path("solvers.npz")
    except pytest.skip.Exception:
        return ["<fixtures absent>"]
    with np.load(path) as z:
        return sorted(json.loads(str(z["config_json"]))["cases"])


@functools.cache
def _setup():
    z = load_fixture("solvers.npz")
    cfg = json.loads(str(z["config_json"]))
    unet, unet_vars = fixture_network(cfg["unet_fixture"], openai.create_model)
    clf, clf_vars = fixture_network(cfg["classifier_fixture"], openai.create_classifier)
    y = jnp.asarray(z["y"], jnp.int32)

    def model_fn(x, t_input):
        return unet.apply(unet_vars, x, t_input, y=y)

    cond_fn = openai.classifier_cond_fn(
        lambda x, t_input: clf.apply(clf_vars, x, t_input), y, float(cfg["classifier_scale"])
    )
    betas = openai.get_named_beta_schedule(cfg["schedule"], int(cfg["diffusion_steps"]))
    return z, cfg, model_fn, cond_fn, betas


def test_schedule_is_clipped_like_the_reference():
    z, _, _, _, betas = _setup()
    ns = dpm_solver.NoiseScheduleVP.discrete(betas=betas)
    # The cosine schedule loses its last 4 steps to the log-SNR clip at -5.1: total_N = 996.
    assert ns.total_N == z["log_alpha_array"].shape[0]
    # The fixture stores the reference's float32 copies of these float64 arrays.
    np.testing.assert_allclose(ns.log_alpha_array, z["log_alpha_array"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(ns.t_array, z["t_array"], rtol=1e-6, atol=0)
    assert ns.marginal_lambda(1.0) >= dpm_solver.CLIPPED_LAMBDA


@pytest.mark.parametrize("case", _cases())
def test_time_steps_match_reference(case):
    z, cfg, _, _, betas = _setup()
    c = cfg["cases"][case]
    ns = dpm_solver.NoiseScheduleVP.discrete(betas=betas)
    got = dpm_solver.get_time_steps(ns, c["skip_type"], 1.0, 1.0 / ns.total_N, c["steps"])
    # The reference computes its steps in float32; ours are float64.
    np.testing.assert_allclose(got, z[f"{case}/time_steps"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", _cases())
def test_solver_matches_reference(case):
    z, cfg, model_fn, cond_fn, betas = _setup()
    c = cfg["cases"][case]
    assert c["method"] == "multistep"
    thresholds = cfg["dynamic_thresholding"]

    @jax.jit
    def run(x_T):  # noqa: N803
        # Through the public surface (CONTRACT.md section 8).
        return openai.dpm_solver_sample(
            model_fn,
            x_T,
            betas=betas,
            steps=int(c["steps"]),
            order=int(c["order"]),
            algorithm_type=c["algorithm_type"],
            skip_type=c["skip_type"],
            method=c["method"],
            lower_order_final=bool(c["lower_order_final"]),
            dynamic_thresholding=bool(c["dynamic_thresholding"]),
            dynamic_thresholding_ratio=float(thresholds["ratio"]),
            thresholding_max_val=float(thresholds["max_val"]),
            cond_fn=cond_fn if c["guided"] else None,
            return_intermediate=True,
        )

    sample, trajectory = jax.block_until_ready(run(nchw_to_nhwc(z["x_T"])))
    want_traj = np.transpose(z[f"{case}/trajectory"], (0, 1, 3, 4, 2))
    assert trajectory.shape == want_traj.shape
    errors = [rel_l2(got, want) for got, want in zip(trajectory, want_traj, strict=True)]
    sample_error = rel_l2(sample, nchw_to_nhwc(z[f"{case}/sample"]))
    print(f"{case}: sample rel-L2 {sample_error:.2e}, worst state {max(errors):.2e}")
    assert sample_error <= TOL
    assert max(errors) <= TOL, errors


# ---------------------------------------------------------------- order 1 is DDIM


def _toy_model(channels: int):
    """A cheap nonlinear noise model of x and t_input with 2C outputs (learned-sigma layout), and
    a cond_fn: enough to tell the solver's arithmetic apart from DDIM's without a UNet."""
    w = jax.random.normal(jax.random.key(1), (channels, 2 * channels)) / channels

    def model_fn(x, t_input):
        t = (t_input / 1000.0)[:, None, None, None]
        return jnp.tanh(x @ w + t) + 0.3 * t * jnp.sin(3.0 * x @ w)

    def cond_fn(x, t_input):
        return 0.5 * jnp.cos(x + (t_input / 1000.0)[:, None, None, None])

    return model_fn, cond_fn


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("guided", [False, True])
def test_order_one_is_ddim_at_the_solver_times(algorithm_type, guided):
    """DPM-Solver-1 and DPM-Solver++-1 are DDIM with eta = 0 at the solver's times (DPM-Solver
    paper, Sec. 4.1 and the reference's `dpm_solver_first_update` docstring).

    gdiff's own `GaussianDiffusion.ddim_sample` (guided with `condition_score`, which subtracts
    sqrt(1 - alpha_bar) * cond_fn, the solver's sigma_t * cond_fn) is run on a chain built so that
    its indices are the solver's times: alphas_cumprod[j] = alpha(tau_{S-j})^2 for the solver's
    times tau_0 = 1 > ... > tau_S = 1/total_N, and the model sees index j as the solver's
    t_input(tau_{S-j}). DDIM steps j = S .. 1 then go exactly where the solver's steps go, the
    last one to alpha_bar[0] = alpha(t_end)^2 rather than to 1.
    """
    steps, shape = 6, (2, 5, 4, 3)
    betas = openai.get_named_beta_schedule("cosine", 1000)
    model_fn, cond_fn = _toy_model(shape[-1])
    cond_fn = cond_fn if guided else None
    x_T = jax.random.normal(jax.random.key(0), shape)  # noqa: N806

    ns = dpm_solver.NoiseScheduleVP.discrete(betas=betas)
    taus = dpm_solver.get_time_steps(ns, "time_uniform", 1.0, 1.0 / ns.total_N, steps)
    alphas_cumprod = np.exp(2.0 * ns.marginal_log_mean_coeff(taus[::-1]))
    chain_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    diffusion = openai.GaussianDiffusion(
        betas=chain_betas,
        model_mean_type="EPSILON",
        model_var_type="FIXED_SMALL",
        loss_type="MSE",
    )
    t_input = jnp.asarray(ns.model_time(taus[::-1]), jnp.float32)

    def ddim_model(x, j):
        return model_fn(x, t_input[j])[..., : shape[-1]]

    ddim_cond = None if cond_fn is None else (lambda x, j: cond_fn(x, t_input[j]))

    @jax.jit
    def run_ddim(x):
        states = [x]
        for j in range(steps, 0, -1):
            t = jnp.full((shape[0],), j, jnp.int32)
            x = diffusion.ddim_sample(
                ddim_model, x, t, jnp.zeros(shape), clip_denoised=False, cond_fn=ddim_cond
            )["sample"]
            states.append(x)
        return jnp.stack(states)

    @jax.jit
    def run_solver(x):
        return dpm_solver.dpm_solver_sample(
            model_fn,
            x,
            betas=betas,
            steps=steps,
            order=1,
            algorithm_type=algorithm_type,
            cond_fn=cond_fn,
            return_intermediate=True,
        )

    want = run_ddim(x_T)
    sample, trajectory = run_solver(x_T)
    errors = [rel_l2(g, w) for g, w in zip(trajectory, want, strict=True)]
    print(f"order 1 {algorithm_type} guided={guided} vs DDIM: worst state {max(errors):.2e}")
    assert rel_l2(sample, want[-1]) <= 1e-5
    assert max(errors) <= 1e-5, errors


# ---------------------------------------------------------------- x_0-predicting models


@pytest.mark.parametrize(
    "algorithm_type,thresholding",
    [("dpmsolver++", False), ("dpmsolver++", True), ("dpmsolver", False)],
)
def test_x_start_model_solves_as_the_noise_model_it_implies(algorithm_type, thresholding):
    """`model_type="x_start"` (the reference's `model_wrapper`: eps = (x - alpha_t x0) / sigma_t):
    a model returning the x_0 a noise model implies, x0 = (x - sigma_t eps) / alpha_t at the
    solver's time t = t_input / 1000 + 1/N, gives that noise model's solve, guided or not."""
    betas = openai.get_named_beta_schedule("cosine", 1000)
    shape = (2, 5, 4, 3)
    noise_fn, cond_fn = _toy_model(shape[-1])
    ns = dpm_solver.NoiseScheduleVP.discrete(betas=betas)

    def x0_fn(x, t_input):
        t = t_input / 1000.0 + 1.0 / ns.total_N
        alpha = ns.marginal_alpha(t)[:, None, None, None]
        sigma = ns.marginal_std(t)[:, None, None, None]
        return (x - sigma * noise_fn(x, t_input)[..., : shape[-1]]) / alpha

    x_T = jax.random.normal(jax.random.key(2), shape)  # noqa: N806
    for guide in (None, cond_fn):
        solve = functools.partial(
            dpm_solver.dpm_solver_sample,
            betas=betas,
            steps=8,
            algorithm_type=algorithm_type,
            dynamic_thresholding=thresholding,
            cond_fn=guide,
        )
        want = jax.jit(lambda x: solve(noise_fn, x))(x_T)  # noqa: B023
        got = jax.jit(lambda x: solve(x0_fn, x, model_type="x_start"))(x_T)  # noqa: B023
        print(f"x_start {algorithm_type} guided={guide is not None}: {rel_l2(got, want):.2e}")
        assert rel_l2(got, want) <= 1e-6
    with pytest.raises(ValueError, match="model_type"):
        dpm_solver.dpm_solver_sample(x0_fn, x_T, betas=betas, steps=4, model_type="v")


# -------------------------------------------------------------- schedule and API


def test_lower_order_final_follows_the_reference_rule():
    orders = dpm_solver.multistep_orders
    assert orders(9, 3, True) == (1, 2, 3, 3, 3, 3, 3, 2, 1)
    assert orders(8, 2, True) == (1, 2, 2, 2, 2, 2, 2, 1)
    # From 10 steps on the reference keeps the full order to the end.
    assert orders(10, 2, True) == (1,) + (2,) * 9
    assert orders(9, 3, False) == (1, 2) + (3,) * 7
    assert orders(4, 1, True) == (1,) * 4


def test_linear_schedule_is_not_clipped():
    ns = dpm_solver.NoiseScheduleVP.discrete(betas=openai.get_named_beta_schedule("linear", 1000))
    assert ns.total_N == 1000
    # Device (float32) and host (float64) evaluations agree.
    t = np.array([0.001, 0.2345, 0.5, 0.999, 1.0])
    for fn in ("marginal_log_mean_coeff", "marginal_std", "marginal_lambda"):
        host = getattr(ns, fn)(t)
        device = getattr(ns, fn)(jnp.asarray(t, jnp.float32))
        np.testing.assert_allclose(np.asarray(device), host, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(ns.inverse_lambda(ns.marginal_lambda(t)), t, rtol=1e-9)


def test_unsupported_settings_raise_clear_errors():
    betas = openai.get_named_beta_schedule("linear", 100)
    model_fn, _ = _toy_model(3)
    x = jnp.zeros((1, 4, 4, 3))
    call = functools.partial(dpm_solver.dpm_solver_sample, model_fn, x, betas=betas, steps=4)
    with pytest.raises(ValueError, match="supported: multistep"):
        call(method="singlestep")
    with pytest.raises(ValueError, match="algorithm_type"):
        call(algorithm_type="ddim")
    with pytest.raises(ValueError, match="skip_type"):
        call(skip_type="karras")
    with pytest.raises(ValueError, match="order"):
        call(order=4)
    with pytest.raises(ValueError, match="steps"):
        call(order=3, steps=2)
    with pytest.raises(ValueError, match="dpmsolver\\+\\+"):
        call(algorithm_type="dpmsolver", dynamic_thresholding=True)


def test_dynamic_thresholding_bounds_the_data_prediction():
    x0 = jnp.stack([jnp.linspace(-3.0, 3.0, 48), jnp.linspace(-0.5, 0.5, 48)]).reshape(2, 4, 4, 3)
    out = dpm_solver.dynamic_thresholding_fn(x0, 0.995, 1.0)
    # The wide example is rescaled into [-1, 1]; the narrow one is below max_val and unchanged.
    assert float(jnp.abs(out[0]).max()) == pytest.approx(1.0)
    np.testing.assert_allclose(out[1], x0[1])
    s = np.quantile(np.abs(np.asarray(x0[0])).ravel(), 0.995)
    np.testing.assert_allclose(out[0], np.clip(x0[0], -s, s) / s, rtol=1e-6)
