"""Numerical parity of the Flax ADM networks with the reference (PyTorch) networks.

Every module is rebuilt from the fixture's own config_json through the reference-style factories
of gdiff.compat.openai, and its weights come through convert_state_dict, so these tests cover the
architecture, the factories and the converter together. Tolerance: rel-L2 <= 1e-4 (float32).
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture, nchw_to_nhwc, rel_l2

from gdiff.compat import openai

TOL = 1e-4
# Measured bf16 (compute) vs the float32 reference on unet_small: rel-L2 1.5e-2 on CPU. The bound
# leaves headroom for other backends while still catching a wrong cast (O(1) errors).
BF16_TOL = 3e-2


def _state_dict(z) -> dict:
    return {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}


@functools.cache
def _loaded(name: str):
    """(fixture, module, variables, jitted apply) for one model fixture, built from config_json."""
    z = load_fixture(name)
    cfg = json.loads(str(z["config_json"]))
    if "create_model" in cfg:
        module = openai.create_model(**cfg["create_model"])
    elif "sr_create_model" in cfg:
        module = openai.sr_create_model(**cfg["sr_create_model"])
    else:
        module = openai.create_classifier(**cfg["create_classifier"])
    variables = openai.convert_state_dict(module, _state_dict(z))
    return z, module, variables, jax.jit(module.apply)


def _model_kwargs(z, module) -> dict:
    kw = {}
    if getattr(module, "num_classes", None) is not None:
        kw["y"] = jnp.asarray(z["y"], jnp.int32)
    if "low_res" in z.files:
        kw["low_res"] = nchw_to_nhwc(z["low_res"])
    return kw


# Timesteps go in as float32 for both the integer and the fractional keys, so one compilation
# serves both (the model embeds timesteps in float32 either way).
def _ts(a):
    return jnp.asarray(a, jnp.float32)


@pytest.mark.parametrize("name", ["unet_small.npz", "unet_small_legacy.npz"])
@pytest.mark.parametrize("suffix", ["", "_frac"])
def test_unet_matches_reference(name, suffix):
    z, module, variables, apply = _loaded(name)
    out = apply(
        variables, nchw_to_nhwc(z["x"]), _ts(z["timesteps" + suffix]), **_model_kwargs(z, module)
    )
    assert out.dtype == jnp.float32
    assert rel_l2(out, nchw_to_nhwc(z["output" + suffix])) <= TOL


def test_super_res_matches_reference():
    z, module, variables, apply = _loaded("super_res_small.npz")
    out = apply(variables, nchw_to_nhwc(z["x"]), _ts(z["timesteps"]), **_model_kwargs(z, module))
    assert out.shape == nchw_to_nhwc(z["output"]).shape
    assert rel_l2(out, nchw_to_nhwc(z["output"])) <= TOL


@pytest.mark.parametrize("suffix", ["", "_frac"])
def test_classifier_logits_match_reference(suffix):
    z, _, variables, apply = _loaded("classifier_small.npz")
    logits = apply(variables, nchw_to_nhwc(z["x"]), _ts(z["timesteps" + suffix]))
    assert logits.shape == z["logits" + suffix].shape and logits.dtype == jnp.float32
    assert rel_l2(logits, z["logits" + suffix]) <= TOL


@functools.cache
def _cond_grad():
    """One compiled guidance gradient with the scale as an argument (shared by both scales)."""
    z, module, variables, _ = _loaded("classifier_small.npz")
    y = jnp.asarray(z["y"], jnp.int32)

    def grad(x, t, scale):
        apply = lambda x, t: module.apply(variables, x, t)  # noqa: E731
        return openai.classifier_cond_fn(apply, y, scale)(x, t)

    return jax.jit(grad)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_classifier_guidance_gradient_matches_reference(scale):
    z, _, _, _ = _loaded("classifier_small.npz")
    grad = _cond_grad()(nchw_to_nhwc(z["x"]), _ts(z["timesteps"]), jnp.float32(scale))
    assert rel_l2(grad, nchw_to_nhwc(z[f"cond_grad/scale{scale}"])) <= TOL


@pytest.mark.parametrize("name", ["unet_small_legacy.npz"])
def test_other_attention_order_gives_a_different_output(name):
    # The two orders share every weight shape, so only the outputs show which one was used.
    z, module, variables, _ = _loaded(name)
    flipped = dataclasses.replace(
        module, use_new_attention_order=not module.use_new_attention_order
    )
    out = jax.jit(flipped.apply)(
        variables, nchw_to_nhwc(z["x"]), _ts(z["timesteps"]), **_model_kwargs(z, module)
    )
    assert rel_l2(out, nchw_to_nhwc(z["output"])) > 100 * TOL


def test_bfloat16_compute_stays_close_to_float32():
    z, module, variables, _ = _loaded("unet_small.npz")
    bf16 = dataclasses.replace(module, dtype=jnp.bfloat16)
    out = jax.jit(bf16.apply)(
        variables, nchw_to_nhwc(z["x"]), _ts(z["timesteps"]), **_model_kwargs(z, module)
    )
    assert out.dtype == jnp.float32  # outputs are always float32
    # Parameters stay float32 whatever the compute dtype.
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(variables))
    err = rel_l2(out, nchw_to_nhwc(z["output"]))
    assert 0 < err < BF16_TOL, err  # > 0: the reduced precision really was used
