"""Whole guided sampling loops against the reference (guided_sampling.npz).

The UNet of unet_small.npz and the classifier of classifier_small.npz, both rebuilt from their
config_json and converted weights, drive gdiff's diffusion loops: DDIM (ddim10, eta 0) guided and
unguided with full trajectories, and ancestral sampling over respacing "10" with the reference's
per-step noise replayed. Final samples must agree to rel-L2 1e-3, trajectories too.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_network, load_fixture, nchw_to_nhwc, rel_l2

from gdiff.compat import openai

TOL = 1e-3


@functools.cache
def _setup():
    g = load_fixture("guided_sampling.npz")
    cfg = json.loads(str(g["config_json"]))
    unet, unet_vars = fixture_network(cfg["unet_fixture"], openai.create_model)
    clf, clf_vars = fixture_network(cfg["classifier_fixture"], openai.create_classifier)
    y = jnp.asarray(g["y"], jnp.int32)

    def model_fn(x, ts):
        return unet.apply(unet_vars, x, ts, y=y)

    cond_fn = openai.classifier_cond_fn(
        lambda x, ts: clf.apply(clf_vars, x, ts), y, float(cfg["classifier_scale"])
    )

    def diffusion(respacing):
        return openai.create_gaussian_diffusion(
            steps=int(cfg["steps"]),
            learn_sigma=bool(cfg["learn_sigma"]),
            noise_schedule=cfg["schedule"],
            timestep_respacing=respacing,
        )

    return g, cfg, model_fn, cond_fn, diffusion


@pytest.mark.parametrize("guided", [1, 0])
def test_ddim_loop_matches_reference(guided):
    g, cfg, model_fn, cond_fn, diffusion = _setup()
    diff = diffusion(cfg["guided_respacing"])
    x_T = nchw_to_nhwc(g["x_T"])

    @jax.jit
    def run(x_T):
        return diff.ddim_sample_loop(
            model_fn,
            x_T.shape,
            jax.random.key(0),
            eta=0.0,
            clip_denoised=bool(cfg["clip_denoised"]),
            cond_fn=cond_fn if guided else None,
            noise=x_T,
            return_trajectory=True,
        )

    out = run(x_T)
    prefix = f"ddim/guided{guided}"
    assert rel_l2(out["sample"], nchw_to_nhwc(g[f"{prefix}/sample"])) <= TOL
    for key in ("trajectory", "pred_xstart_trajectory"):
        want = np.transpose(g[f"{prefix}/{key}"], (0, 1, 3, 4, 2))
        assert rel_l2(out[key], want) <= TOL, key


def test_ancestral_guided_loop_with_replayed_noise_matches_reference():
    g, cfg, model_fn, cond_fn, diffusion = _setup()
    diff = diffusion(cfg["ancestral_respacing"])
    x_T = nchw_to_nhwc(g["x_T"])
    step_noise = np.transpose(g["ancestral/noise"], (0, 1, 3, 4, 2))

    seen = []

    def recording_model_fn(x, ts):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), ts)
        return model_fn(x, ts)

    @jax.jit
    def run(x_T, step_noise):
        return diff.p_sample_loop(
            recording_model_fn,
            x_T.shape,
            jax.random.key(0),
            clip_denoised=bool(cfg["clip_denoised"]),
            cond_fn=cond_fn,
            noise=x_T,
            step_noise=step_noise,
            return_trajectory=True,
        )

    out = jax.block_until_ready(run(x_T, step_noise))
    assert rel_l2(out["sample"], nchw_to_nhwc(g["ancestral/guided1/sample"])) <= TOL
    want_traj = np.transpose(g["ancestral/guided1/trajectory"], (0, 1, 3, 4, 2))
    assert rel_l2(out["trajectory"], want_traj) <= TOL
    # The model saw the original (un-respaced) timesteps, one call per step, in order.
    seen_ts = np.array([int(np.unique(t)[0]) for t in seen])
    np.testing.assert_array_equal(seen_ts, g["model_timesteps"])
