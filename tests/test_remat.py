"""`model.remat`: none / dots / full activation rematerialisation of the UNet's blocks.

The policies change what the forward pass keeps for the backward pass, never what is computed:
the loss and the sampling program are bit-identical, the gradients are the same maths (bitwise
equal between the two checkpointing policies when evaluated op by op). What they save is measured
twice: the residuals JAX keeps between the forward and the backward pass (exact, no compiler
involved), and the peak temporary memory XLA plans for a compiled training step.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, tiny
from configs.released import imagenet64, imagenet256, imagenet512, upsampler_64_256
from gdiff import factory
from gdiff.compat import openai
from gdiff.models import unet

POLICIES = ("none", "dots", "full")


def _net(remat: str) -> unet.UNetModel:
    """A tiny ADM: two levels, attention at the 8x8 level, up/down resblocks, dropout."""
    return unet.UNetModel(
        model_channels=32,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_classes=10,
        num_heads=2,
        use_scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.1,
        remat=remat,
    )


def _inputs(batch: int, size: int):
    x = jax.random.normal(jax.random.key(3), (batch, size, size, 3))
    t = jnp.linspace(1.0, 999.0, batch)
    y = jnp.arange(batch) % 10
    return x, t, y


def _params(x, t, y):
    params = jax.jit(_net("none").init)(jax.random.key(0), x, t, y=y)["params"]
    # Away from the zero-initialised output layers, so every parameter gets a gradient.
    noise = jax.random.key(9)
    return jax.tree.map(lambda p: p + 0.02 * jax.random.normal(noise, p.shape), params)


def _loss_fn(remat: str, x, t, y):
    """params -> the mean squared output of a training-mode (dropout) forward pass."""
    net = _net(remat)

    def loss(params):
        rngs = {"dropout": jax.random.key(1)}
        out = net.apply({"params": params}, x, t, y=y, train=True, rngs=rngs)
        return jnp.mean((out - 0.3) ** 2)

    return loss


def test_loss_is_bit_identical_and_gradients_agree_under_jit():
    x, t, y = _inputs(4, 16)
    params = _params(x, t, y)
    got = {r: jax.jit(jax.value_and_grad(_loss_fn(r, x, t, y)))(params) for r in POLICIES}
    loss, grads = got["none"]
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    for remat in ("dots", "full"):
        other_loss, other_grads = got[remat]
        np.testing.assert_array_equal(other_loss, loss)
        # Float32 rounding only (measured: 1.1e-7 of the largest gradient): XLA fuses a
        # recomputed block differently from a stored one.
        for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale)


def test_checkpointing_policies_are_bitwise_the_same_gradient_op_by_op():
    """Evaluated primitive by primitive (no XLA fusion), dots and full give the same bits: they
    only choose which forward values the backward pass recomputes. ("none" sums a block input's
    cotangents in another order, since its blocks are no checkpoints: last-bit differences.)"""
    x, t, y = _inputs(2, 8)
    params = _params(x, t, y)
    with jax.disable_jit():
        dots = jax.value_and_grad(_loss_fn("dots", x, t, y))(params)
        full = jax.value_and_grad(_loss_fn("full", x, t, y))(params)
    for a, b in zip(jax.tree.leaves(dots), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sampling_programs_do_not_depend_on_the_policy():
    """Without differentiation a checkpoint is its body: the lowered forward pass is the same."""
    x, t, y = _inputs(2, 16)
    params = jax.eval_shape(_net("none").init, jax.random.key(0), x, t, y=y)["params"]

    def sampling_program(remat: str) -> str:
        net = _net(remat)
        return jax.jit(lambda p: net.apply({"params": p}, x, t, y=y)).lower(params).as_text()

    texts = {r: sampling_program(r) for r in POLICIES}
    assert texts["dots"] == texts["none"] and texts["full"] == texts["none"]


def _residual_bytes(remat: str, x, t, y, params) -> int:
    """Bytes the forward pass keeps for the backward pass (the leaves of jax.vjp's pullback)."""
    pullback = jax.eval_shape(lambda p: jax.vjp(_loss_fn(remat, x, t, y), p)[1], params)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(pullback))


def test_policies_keep_fewer_activations_for_the_backward_pass():
    x, t, y = _inputs(8, 16)
    params = jax.eval_shape(_net("none").init, jax.random.key(0), x, t, y=y)["params"]
    kept = {r: _residual_bytes(r, x, t, y, params) for r in POLICIES}
    # Measured: 44.2 / 12.8 / 7.9 MiB (none / dots / full; parameters included in each).
    assert kept["full"] < kept["dots"] < 0.5 * kept["none"], kept


# Compiles one training step per policy and prints XLA's planned temporary memory. XLA:CPU's
# default scheduler optimises for concurrency and moves the recomputation back next to the forward
# pass, which undoes any remat (measured: the same temp size under every policy); GPUs schedule for
# memory, as this flag makes the CPU do.
_PEAK_SCRIPT = """
import json, sys
import jax
from tests import test_remat as tr
x, t, y = tr._inputs(8, 16)
params = jax.eval_shape(tr._net("none").init, jax.random.key(0), x, t, y=y)["params"]
out = {}
for remat in tr.POLICIES:
    step = jax.jit(jax.value_and_grad(tr._loss_fn(remat, x, t, y)))
    out[remat] = step.lower(params).compile().memory_analysis().temp_size_in_bytes
print(json.dumps(out))
"""


def test_remat_lowers_the_peak_memory_of_a_compiled_training_step():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false",
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    temp = json.loads(proc.stdout.strip().splitlines()[-1])
    # Measured: 23.8 / 17.5 / 17.5 MiB (none / dots / full); 33.3 MiB under every policy with
    # XLA:CPU's default scheduler.
    assert temp["full"] < 0.85 * temp["none"] and temp["dots"] < 0.85 * temp["none"], temp


def test_config_factory_and_reference_flag():
    assert common.get_config().model.remat == "none"
    config = tiny.get_config()
    config.model.remat = "dots"
    assert factory.build_model(config).remat == "dots"
    # The large training configs recompute; the 64x64 one trains without.
    assert imagenet64.get_config().model.remat == "none"
    for module in (imagenet256, imagenet512, upsampler_64_256):
        assert module.get_config().model.remat == "full", module.__name__
    # The reference's use_checkpoint is the "full" policy.
    assert openai.create_model(64, 32, 1, use_checkpoint=True).remat == "full"
    assert openai.create_model(64, 32, 1).remat == "none"
    x, t, y = _inputs(1, 8)
    with pytest.raises(ValueError, match=r"remat must be one of \('none', 'dots', 'full'\)"):
        _net("checkpoint").init(jax.random.key(0), x, t, y=y)
