"""The compiled guided sampler: loop equivalence, scale sweeps, devices, labels, shard files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import perturbed, sharpened, tiny_classifier, tiny_unet

from gdiff import atomic, distributed
from gdiff.diffusion import create_gaussian_diffusion
from gdiff.diffusion import guidance as guidance_lib
from gdiff.engine import runs
from gdiff.sampling import grid, labels, sample_files, sampler

SIZE, CLASSES = 8, 3


@pytest.fixture(scope="module")
def tiny():
    """A tiny random class-conditional UNet, a sharp random classifier and a 4-step diffusion."""
    model, classifier = tiny_unet(CLASSES), tiny_classifier(SIZE, CLASSES)
    x = jnp.zeros((1, SIZE, SIZE, 3))
    t = jnp.zeros((1,), jnp.int32)
    model_vars = jax.jit(model.init)(jax.random.key(1), x, t, y=jnp.zeros((1,), jnp.int32))
    cls_vars = jax.jit(classifier.init)(jax.random.key(2), x, t)
    # Fresh networks output 0 (zero-initialised last layers, as the reference's): perturb them.
    model_vars, cls_vars = perturbed(model_vars, 1), perturbed(cls_vars, 2)
    # A sharp classifier (visible guidance). The UNet's output conv is shrunk, near the
    # reference's zero-initialised one, so x_t carries through.
    cls_vars = sharpened(cls_vars)
    mp = dict(model_vars["params"])
    out = sorted(k for k in mp if k.startswith("out_"))[-1]
    mp[out] = jax.tree.map(lambda p: p * 0.1, mp[out])
    model_vars = {"params": mp}
    diffusion = create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing="4"
    )
    return dict(model=model, classifier=classifier, mv=model_vars, cv=cls_vars, diffusion=diffusion)


def _python_loop(diffusion, model_fn, x, noise_fn, *, use_ddim, eta, cond_fn):
    # One jitted single step (eager dispatch of a UNet is slow on CPU), called from Python.
    if use_ddim:
        step = jax.jit(lambda x, t, n: diffusion.ddim_sample(model_fn, x, t, n, eta, True, cond_fn))
    else:
        step = jax.jit(lambda x, t, n: diffusion.p_sample(model_fn, x, t, n, True, cond_fn))
    for i in reversed(range(diffusion.num_timesteps)):
        t = jnp.full((x.shape[0],), i, jnp.int32)
        x = step(x, t, noise_fn(jnp.int32(i)))["sample"]
    return x


@pytest.mark.parametrize("use_ddim,eta", [(False, 0.0), (True, 0.5)])
def test_jitted_chain_equals_python_loop(tiny, use_ddim, eta):
    d = tiny["diffusion"]
    ids = jnp.arange(4, dtype=jnp.int32)
    y = jnp.array([0, 1, 2, 1], jnp.int32)
    keys = sampler.example_keys(jax.random.key(7), ids)
    x_T = sampler.initial_noise(keys, (SIZE, SIZE, 3))

    def model_fn(x, ts):
        return tiny["model"].apply(tiny["mv"], x, ts, y=y)

    cond_fn = guidance_lib.classifier_cond_fn(
        lambda x, ts: tiny["classifier"].apply(tiny["cv"], x, ts), y, 2.0
    )

    def noise_fn(i):
        return sampler.step_noise(keys, i, (SIZE, SIZE, 3))

    chain = jax.jit(
        lambda x: sampler.sample_chain(
            d, model_fn, x, noise_fn, use_ddim=use_ddim, eta=eta, cond_fn=cond_fn
        )
    )
    got = np.asarray(chain(x_T))
    want = np.asarray(
        _python_loop(d, model_fn, x_T, noise_fn, use_ddim=use_ddim, eta=eta, cond_fn=cond_fn)
    )
    assert got.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The chain really ran: not the starting noise, and inside the clipped range's reach.
    assert np.abs(got - np.asarray(x_T)).mean() > 0.1


def _sampler(tiny, *, guided, use_ddim=False, mesh=None, seed=0, float_output=False):
    opts = sampler.SamplerOptions(
        image_shape=(SIZE, SIZE, 3), use_ddim=use_ddim, class_cond=True, float_output=float_output
    )
    return sampler.Sampler(
        tiny["diffusion"],
        tiny["model"].apply,
        opts,
        guidance=sampler.classifier_guidance(tiny["classifier"]) if guided else None,
        mesh=mesh,
        seed=seed,
    )


def _rows(ids, y, scales):
    n = len(ids)
    return {
        "ids": np.tile(ids, len(scales)).astype(np.int32),
        "labels": np.tile(y, len(scales)).astype(np.int32),
        "scales": np.repeat(np.asarray(scales, np.float32), n),
    }


def _mean_log_prob(tiny, x, y):
    logits = tiny["classifier"].apply(tiny["cv"], x, jnp.zeros((len(y),), jnp.int32))
    logp = jax.nn.log_softmax(logits)
    return float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=1)))


SCALES = [0.0, 1.0, 4.0]
IDS = np.arange(8)
Y = np.arange(8) % CLASSES


@pytest.fixture(scope="module")
def sweep8(tiny):
    """The scale sweep [0, 1, 4] over 8 examples in one program on 8 devices (float output)."""
    s = _sampler(tiny, guided=True, float_output=True)
    mv, cv = s.put_params(tiny["mv"]), s.put_params(tiny["cv"])
    batch = s.make_batch(_rows(IDS, Y, SCALES))
    out = s(mv, cv, batch)
    return dict(sampler=s, mv=mv, cv=cv, batch=batch, out=out)


def test_scale_sweep_shares_noise_and_guidance_helps(tiny, sweep8):
    out = np.asarray(sweep8["out"]).reshape(len(SCALES), len(IDS), SIZE, SIZE, 3)
    plain = _sampler(tiny, guided=False, float_output=True)
    unguided = np.asarray(plain(sweep8["mv"], None, plain.make_batch(_rows(IDS, Y, [0.0]))))
    # Scale 0 inside the sweep is the unguided sampler: same noise, zero gradient. (Two compiled
    # programs may round differently in the last ulp, hence the float tolerance.)
    np.testing.assert_allclose(out[0], unguided, rtol=0, atol=1e-5)
    q0, qu = sampler.to_uint8(out[0]), sampler.to_uint8(unguided)
    assert np.mean(np.asarray(q0) != np.asarray(qu)) < 0.01
    # Guidance changes the samples, and more guidance makes the targets more likely.
    assert np.abs(out[2] - out[0]).mean() > 0.02
    lp = [_mean_log_prob(tiny, out[k], Y) for k in range(len(SCALES))]
    assert lp[2] > lp[1] > lp[0], lp


def test_samples_do_not_depend_on_device_count_or_batch(tiny, sweep8):
    assert jax.device_count() == 8
    assert len(sweep8["out"].sharding.device_set) == 8
    want = np.asarray(sweep8["out"])
    one = _sampler(
        tiny, guided=True, mesh=distributed.data_mesh(jax.devices()[:1]), float_output=True
    )
    rows = _rows(IDS, Y, SCALES)
    np.testing.assert_allclose(
        np.asarray(one(tiny["mv"], tiny["cv"], one.make_batch(rows))), want, rtol=0, atol=1e-5
    )
    # Per-example noise: examples 4..11 in another batch (same shape, so no recompilation) give
    # the same images for the shared ids 4..7.
    shifted = _rows(IDS + 4, (IDS + 4) % CLASSES, SCALES)
    got = np.asarray(one(tiny["mv"], tiny["cv"], one.make_batch(shifted)))
    got = got.reshape(3, 8, SIZE, SIZE, 3)[:, :4]
    np.testing.assert_allclose(got, want.reshape(3, 8, SIZE, SIZE, 3)[:, 4:], rtol=0, atol=1e-5)


def test_compiled_once_no_host_callbacks_and_seeded(sweep8):
    s = sweep8["sampler"]
    text = s.lower(sweep8["mv"], sweep8["cv"], sweep8["batch"]).as_text()
    assert "callback" not in text.lower()
    assert text.count("stablehlo.while") >= 1  # the chain is a loop inside the program
    other = s(sweep8["mv"], sweep8["cv"], sweep8["batch"], seed=1)
    again = s(sweep8["mv"], sweep8["cv"], sweep8["batch"])
    np.testing.assert_array_equal(np.asarray(again), np.asarray(sweep8["out"]))
    assert np.abs(np.asarray(other) - np.asarray(again)).mean() > 0.05
    assert s._jitted._cache_size() == 1  # three calls, two seeds: one compilation
    bad = {k: v[:6] for k, v in _rows(np.arange(3), [0, 1, 2], [0.0]).items()}
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        s(sweep8["mv"], sweep8["cv"], bad)


def test_labels_specs():
    assert labels.make_labels("balanced", 7, 3, 0).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert labels.make_labels(2, 4, 3, 0).tolist() == [2, 2, 2, 2]
    assert labels.make_labels("1,0", 5, 3, 0).tolist() == [1, 0, 1, 0, 1]
    r1 = labels.make_labels("random", 500, 10, 3)
    assert r1.min() >= 0 and r1.max() <= 9 and len(np.unique(r1)) == 10
    np.testing.assert_array_equal(r1, labels.make_labels("random", 500, 10, 3))
    assert not np.array_equal(r1, labels.make_labels("random", 500, 10, 4))
    with pytest.raises(ValueError, match=r"outside the model's classes 0\.\.2"):
        labels.make_labels("1,5", 4, 3, 0)
    with pytest.raises(ValueError, match="outside"):
        labels.make_labels(-1, 4, 3, 0)
    with pytest.raises(ValueError, match="random"):
        labels.make_labels("cats", 4, 3, 0)


def test_scale_specs():
    assert labels.parse_scales("0, 1,4") == [0.0, 1.0, 4.0]
    assert labels.parse_scales(2) == [2.0]
    assert [labels.format_scale(s) for s in (0.0, 1.5, 10.0)] == ["0", "1.5", "10"]
    with pytest.raises(ValueError, match="not a number"):
        labels.parse_scales("1,x")
    with pytest.raises(ValueError, match="repeats"):
        labels.parse_scales("1,1")


def test_shards_atomic_merge_and_grid(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    labs = np.array([0, 1, 2, 0, 1])
    # The run engine's shards of one part (a scale's folder), gathered in (batch, process) order.
    layout = runs.Layout(out=tmp_path, parts=("scale_1",), num_batches=2, process_count=2)

    def write(process, batch, rows):
        arrays = sample_files.sample_arrays(imgs[rows], labs[rows])
        atomic.savez(layout.shard("scale_1", batch, process), **arrays)

    write(0, 0, slice(0, 3))
    write(1, 0, slice(3, 4))
    write(0, 1, slice(4, 5))
    d = tmp_path / "scale_1"
    assert not [p for p in d.iterdir() if "tmp" in p.name]
    with pytest.raises(FileNotFoundError, match="shard_1of2_1.npz is missing"):
        runs.gather(layout, "scale_1", None)
    write(1, 1, slice(0, 0))
    merged = runs.gather(layout, "scale_1", None)
    out = sample_files.write_sample_file(d / "m.npz", merged["arr_0"], merged["arr_1"])
    with np.load(out) as z:
        assert z["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(z["arr_0"], imgs)
        np.testing.assert_array_equal(z["arr_1"], labs)
    with pytest.raises(ValueError, match="uint8"):
        sample_files.write_sample_file(d / "bad.npz", imgs.astype(np.float32), None)
    g = grid.class_grid(imgs, labs, per_class=2)
    assert g.shape == (3 * 6 + 2, 2 * 6 + 2, 3)  # rows = the 3 classes, 2 per row, 2px padding
    np.testing.assert_array_equal(g[2:6, 2:6], imgs[0])  # class 0, first sample
    np.testing.assert_array_equal(g[8:12, 2:6], imgs[1])  # class 1 starts the second row
    png = grid.save_sample_grid(tmp_path / "g.png", imgs, labs, by_class=True)
    from PIL import Image

    full = grid.class_grid(imgs, labs)  # the default: 8 per class
    assert Image.open(png).size == (full.shape[1], full.shape[0])
    np.testing.assert_array_equal(np.asarray(Image.open(png)), full)
