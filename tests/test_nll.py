"""--mode=nll: bits/dim of a data split (the reference's image_nll.py) on the tiny config.

A freshly initialised (and perturbed, so that it depends on its inputs) tiny model is evaluated on
the digits held-out split over 8 devices, killed after its first batch and resumed; its per-image
numbers must equal `calc_bpd_loop` called directly on the same images and noise, and its files
must have the reference's layout. `calc_bpd_loop` itself is held to the reference's numbers through
the diffusion parity fixture.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture, nchw_to_nhwc, perturbed, rel_l2

from configs import tiny
from gdiff import cli, factory
from gdiff import diffusion as gdd
from gdiff.checkpoints import locate, store
from gdiff.data import digits
from gdiff.jobs import nll
from gdiff.sampling import sampler as sampler_lib

N = 12  # two global batches of 8 (one example per device), the last one trimmed


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory):
    config = tiny.get_config()
    variables = factory.init_variables(factory.build_model(config), jax.random.key(0))
    path = tmp_path_factory.mktemp("nll") / "model_params"
    return store.save_params(path, perturbed(variables, seed=1)["params"])


def _config(params_dir, out, **flag_overrides):
    config = tiny.get_config()
    # The run is described by a pasted image_nll flag string, as a user coming from the
    # reference would give it.
    flag_string = (
        f"--num_samples {N} --batch_size 1 --timestep_respacing 10 --model_path models/tiny.pt"
    )
    cli.apply_reference_flags(config, flag_string, "image_nll", False)
    config.sample.model_checkpoint = str(params_dir)
    config.eval.nll_output_dir = str(out)
    for key, value in flag_overrides.items():
        setattr(config, key, value)
    return config


def _direct(config, params_dir):
    """calc_bpd_loop called directly on the first N held-out digits with the noise streams of
    examples 0..N-1, as one batch."""
    source = digits.DigitsSource("validation", config.data.image_size)
    loaded = [source.load(i, np.random.default_rng(0)) for i in range(N)]
    images = jnp.asarray(np.stack([x for x, _ in loaded]))
    labels = jnp.asarray([y for _, y in loaded], jnp.int32)
    diffusion = factory.build_diffusion(config)
    model = factory.build_model(config)
    variables = {"params": locate.load_params(params_dir)}
    keys = sampler_lib.example_keys(jax.random.key(config.seed), jnp.arange(N, dtype=jnp.int32))
    T = diffusion.num_timesteps
    noise = jnp.stack([sampler_lib.step_noise(keys, T - 1 - k, images.shape[1:]) for k in range(T)])

    @jax.jit
    def run(variables, images, labels, noise):
        def model_fn(x, ts):
            return model.apply(variables, x, ts, y=labels)

        return diffusion.calc_bpd_loop(model_fn, images, None, clip_denoised=True, noise=noise)

    return jax.device_get(run(variables, images, labels, noise)), np.asarray(labels)


def test_nll_mode_resumes_and_equals_calc_bpd_loop(params_dir, tmp_path):
    config = _config(params_dir, tmp_path / "nll")
    assert config.diffusion.timestep_respacing == "10" and config.eval.nll_num_samples == N

    def kill_after_first(batch):
        raise Killed(batch)

    with pytest.raises(Killed):
        nll.run(config, str(tmp_path), on_batch_done=kill_after_first)
    shard = tmp_path / "nll" / "shards" / "shard_0_0.npz"
    assert shard.exists() and not (tmp_path / "nll" / "shards" / "shard_0_1.npz").exists()
    before = shard.stat().st_mtime_ns
    done = []
    summary = nll.run(config, str(tmp_path), on_batch_done=done.append)
    assert done == [1] and shard.stat().st_mtime_ns == before  # only the missing batch ran

    out = tmp_path / "nll"
    with np.load(out / "per_image.npz") as z:
        per_image = {k: z[k] for k in z.files}
    want, labels = _direct(config, params_dir)
    np.testing.assert_array_equal(per_image["position"], np.arange(N))
    np.testing.assert_array_equal(per_image["id"], np.arange(N))  # held-out examples 0..N-1
    np.testing.assert_array_equal(per_image["label"], labels)
    for key in ("total_bpd", "prior_bpd", "vb", "mse", "xstart_mse"):
        assert per_image[key].shape == want[key].shape, key
        np.testing.assert_allclose(per_image[key], want[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert per_image["vb"].shape == (N, 10)

    # The reference's files: <term>_terms.npz holding arr_0 = the term per step, over the images.
    for term in ("vb", "mse", "xstart_mse"):
        with np.load(out / f"{term}_terms.npz") as z:
            assert z.files == ["arr_0"] and z["arr_0"].shape == (10,)
            np.testing.assert_allclose(z["arr_0"], per_image[term].mean(0), rtol=1e-6)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == N and summary["num_timesteps"] == 10
    np.testing.assert_allclose(summary["bpd"], want["total_bpd"].mean(), rtol=2e-5)
    np.testing.assert_allclose(summary["bpd"], summary["prior_bpd"] + summary["vb_bpd"], rtol=1e-6)

    # Finished: a rerun computes nothing; other settings in the same directory are refused.
    assert nll.run(config, str(tmp_path), on_batch_done=done.append) == summary and done == [1]
    with pytest.raises(ValueError, match="seed.*eval.nll_output_dir"):
        nll.run(_config(params_dir, out, seed=3), str(tmp_path))


def test_nll_refuses_what_it_cannot_evaluate(params_dir, tmp_path):
    config = _config(params_dir, tmp_path / "a")
    config.eval.nll_num_samples = 0
    with pytest.raises(ValueError, match="must be positive"):
        nll.run(config, str(tmp_path))
    config = _config(params_dir, tmp_path / "b")
    config.model.small_size = 4
    with pytest.raises(ValueError, match="super-resolution"):
        nll.run(config, str(tmp_path))
    config = _config(params_dir, tmp_path / "c")
    config.sample.model_checkpoint = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="cannot load the model"):
        nll.run(config, str(tmp_path))


def test_calc_bpd_loop_terms_are_the_references():
    """Each vb term of the loop is the reference's `_vb_terms_bpd` (diffusion_math.npz) at that
    step, when the loop replays the fixture's noise and model output at every step."""
    z = load_fixture("diffusion_math.npz")
    cfg = json.loads(str(z["config_json"]))
    diffusion = gdd.GaussianDiffusion(
        betas=gdd.get_named_beta_schedule(cfg["schedule"], cfg["steps"]),
        model_mean_type=gdd.ModelMeanType.EPSILON,
        model_var_type=gdd.ModelVarType.LEARNED_RANGE,
        loss_type=gdd.LossType.MSE,
    )
    x_start, noise = nchw_to_nhwc(z["x_start"]), nchw_to_nhwc(z["noise"])
    model_output, t = nchw_to_nhwc(z["model_output"]), np.asarray(z["t"])
    T = diffusion.num_timesteps
    out = jax.jit(
        lambda x: diffusion.calc_bpd_loop(
            lambda x_t, ts: jnp.asarray(model_output),
            x,
            None,
            clip_denoised=False,
            noise_fn=lambda index: jnp.asarray(noise),
        )
    )(x_start)
    got = np.asarray(out["vb"])[np.arange(len(t)), T - 1 - t]
    assert rel_l2(got, z["vb_terms_bpd/output"]) < 1e-5
