"""Unit checks of the Flax ADM building blocks (tiny shapes, fast)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturbed

from gdiff.models import layers, unet


def test_timestep_embedding_is_cos_then_sin_and_pads_odd_widths():
    t = jnp.array([0.0, 2.5])
    emb = layers.timestep_embedding(t, 5)
    freqs = np.exp(-np.log(10000.0) * np.arange(2) / 2)
    args = np.array([0.0, 2.5])[:, None] * freqs
    want = np.concatenate([np.cos(args), np.sin(args), np.zeros((2, 1))], axis=1)
    np.testing.assert_allclose(emb, want, rtol=1e-6, atol=1e-6)
    assert emb.dtype == jnp.float32


def _torch_bilinear(x, out_h, out_w):
    """PyTorch's interpolate(mode="bilinear", align_corners=False), written out in numpy."""

    def axis_weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        w = src - lo
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - w
        m[np.arange(n_out), hi] += w
        return m

    wh, ww = axis_weights(x.shape[1], out_h), axis_weights(x.shape[2], out_w)
    return np.einsum("ph,bhwc,qw->bpqc", wh, x, ww)


@pytest.mark.parametrize("size", [(4, 4, 8, 8), (3, 5, 12, 7), (8, 8, 4, 4)])
def test_bilinear_resize_matches_torch_formula(size):
    h, w, oh, ow = size
    x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
    got = layers.bilinear_resize(jnp.asarray(x), oh, ow)
    np.testing.assert_allclose(got, _torch_bilinear(x, oh, ow), rtol=1e-5, atol=1e-5)


def test_stride2_conv_pads_one_pixel_each_side():
    x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1)
    down = layers.Downsample(1, True)
    v = down.init(jax.random.key(0), x)
    k = v["params"]["op"]["kernel"]
    got = down.apply(v, x)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = (
        jax.lax.conv_general_dilated(
            padded, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + v["params"]["op"]["bias"]
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert layers.Downsample(1, False).apply({}, x).shape == (2, 3, 3, 1)


TINY = dict(
    model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2,),
    channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True, resblock_updown=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    model = unet.UNetModel(**TINY, num_classes=10, dropout=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t, y = jnp.array([1.0, 700.0]), jnp.array([3, 7])
    # Jitted init: op-by-op initialisation is slow on a loaded CPU.
    variables = jax.jit(lambda r: model.init(r, x, t, y=y))(jax.random.key(0))
    # A fresh network's zero-initialised last layers would hide what dropout does.
    return model, perturbed(variables), x, t, y


def test_remat_and_dropout(tiny):
    model, v, x, t, y = tiny
    out = model.apply(v, x, t, y=y)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
    remat = dataclasses.replace(model, remat="full")
    np.testing.assert_allclose(remat.apply(v, x, t, y=y), out, rtol=1e-5, atol=1e-5)
    rngs = {"dropout": jax.random.key(5)}
    trained = model.apply(v, x, t, y=y, train=True, rngs=rngs)
    assert not np.allclose(trained, out)  # dropout active only with train=True
    np.testing.assert_allclose(
        remat.apply(v, x, t, y=y, train=True, rngs=rngs), trained, rtol=1e-5, atol=1e-5
    )


def test_labels_required_iff_class_conditional(tiny):
    model, v, x, t, _ = tiny
    with pytest.raises(ValueError, match="class-conditional"):
        model.apply(v, x, t)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_pools(pool):
    enc = unet.EncoderUNetModel(
        image_size=8, model_channels=32, out_channels=5, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=32, pool=pool,
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    v = enc.init(jax.random.key(0), x, jnp.zeros(2))
    logits = enc.apply(v, x, jnp.array([3.0, 9.0]))
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
