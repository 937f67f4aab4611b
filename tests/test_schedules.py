"""Beta schedules and respacing against the reference's schedules.npz (every key, generically)."""

import numpy as np
import pytest
from conftest import load_fixture, rel_l2

from gdiff import diffusion as gdd

RESPACED_ARRAYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def _parse_base(base: str) -> tuple[str, int]:
    name, steps = base.rsplit("_", 1)
    return name, int(steps)


def _spaced(name: str, steps: int, respacing: str) -> gdd.SpacedDiffusion:
    # The arrays do not depend on the mean/variance/loss types; any valid choice will do.
    return gdd.SpacedDiffusion(
        gdd.space_timesteps(steps, respacing),
        betas=gdd.get_named_beta_schedule(name, steps),
        model_mean_type=gdd.ModelMeanType.EPSILON,
        model_var_type=gdd.ModelVarType.FIXED_LARGE,
        loss_type=gdd.LossType.MSE,
    )


def test_every_schedules_key():
    z = load_fixture("schedules.npz")
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    checked = 0
    for key in z.files:
        if key == "config_json":
            continue
        parts = key.split("/")
        if len(parts) == 2:
            base, array = parts
            assert array == "betas", key
            name, steps = _parse_base(base)
            got = gdd.get_named_beta_schedule(name, steps)
            assert got.dtype == np.float64
            assert rel_l2(got, z[key]) < 1e-12, key
            checked += 1
        else:
            # The respacing itself never contains "/" (e.g. "10,15,20", "ddim25").
            base, respacing, array = parts[0], "/".join(parts[1:-1]), parts[-1]
            groups.setdefault((base, respacing), {})[array] = z[key]

    for (base, respacing), arrays in groups.items():
        name, steps = _parse_base(base)
        if "error" in arrays:
            with pytest.raises(ValueError):
                gdd.space_timesteps(steps, respacing)
            checked += 1
            continue
        use = gdd.space_timesteps(steps, respacing)
        assert isinstance(use, set)
        np.testing.assert_array_equal(np.array(sorted(use)), arrays["use_timesteps"])
        diff = _spaced(name, steps, respacing)
        np.testing.assert_array_equal(diff.timestep_map, arrays["timestep_map"])
        assert diff.original_num_steps == steps
        for array in RESPACED_ARRAYS:
            if array in arrays:
                got = getattr(diff, array)
                assert rel_l2(got, arrays[array]) < 1e-12, (base, respacing, array)
                checked += 1
    assert checked > 0


def test_space_timesteps_rounding_and_sections():
    # A stride of 999/24 accumulated in floats; half-way cases round to even as Python does.
    steps = sorted(gdd.space_timesteps(1000, "25"))
    assert len(steps) == 25 and steps[0] == 0 and steps[-1] == 999
    # Sections: 300 steps into three sections of 100 -> 10, 15 and 20 steps each.
    use = sorted(gdd.space_timesteps(300, "10,15,20"))
    assert len(use) == 45
    assert sum(s < 100 for s in use) == 10 and sum(100 <= s < 200 for s in use) == 15
    assert sorted(gdd.space_timesteps(100, [100])) == list(range(100))
    assert gdd.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))


@pytest.mark.parametrize(
    "respacing, match",
    [
        ("250", "cannot divide section of 100 steps into 250"),
        ("abc", "cannot parse"),
        ("10,x", "cannot parse"),
        ("ddimx", "cannot parse"),
        ("ddim45", "integer stride"),
        ("-3", "non-negative"),
    ],
)
def test_space_timesteps_refusals(respacing, match):
    with pytest.raises(ValueError, match=match):
        gdd.space_timesteps(100, respacing)


def test_unknown_schedule_is_a_clear_value_error():
    with pytest.raises(ValueError, match="unknown beta schedule: 'quadratic'"):
        gdd.get_named_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="positive integer"):
        gdd.get_named_beta_schedule("linear", 0)


def test_linear_scale_and_cosine_cap():
    lin = gdd.get_named_beta_schedule("linear", 100)
    np.testing.assert_allclose(lin[[0, -1]], [0.001, 0.2], rtol=1e-12)
    cos = gdd.get_named_beta_schedule("cosine", 50)
    assert cos.max() <= 0.999 and np.isclose(cos[-1], 0.999)


def test_factory_semantics():
    d = gdd.create_gaussian_diffusion(steps=100, learn_sigma=True, noise_schedule="cosine")
    assert isinstance(d, gdd.SpacedDiffusion)
    assert d.num_timesteps == 100
    np.testing.assert_array_equal(d.timestep_map, np.arange(100))
    assert d.model_var_type == gdd.ModelVarType.LEARNED_RANGE
    assert d.loss_type == gdd.LossType.MSE and d.model_mean_type == gdd.ModelMeanType.EPSILON
    d = gdd.create_gaussian_diffusion(
        steps=100, sigma_small=True, use_kl=True, predict_xstart=True, timestep_respacing="ddim10"
    )
    assert d.num_timesteps == 10 and d.original_num_steps == 100
    assert d.model_var_type == gdd.ModelVarType.FIXED_SMALL
    assert d.loss_type == gdd.LossType.RESCALED_KL
    assert d.model_mean_type == gdd.ModelMeanType.START_X
    d = gdd.create_gaussian_diffusion(steps=100, rescale_learned_sigmas=True)
    assert d.loss_type == gdd.LossType.RESCALED_MSE
    assert d.model_var_type == gdd.ModelVarType.FIXED_LARGE


def test_diffusion_is_immutable():
    d = gdd.create_gaussian_diffusion(steps=10, noise_schedule="cosine")
    with pytest.raises(AttributeError):
        d.num_timesteps = 3
    with pytest.raises(ValueError):
        d.betas[0] = 0.5
