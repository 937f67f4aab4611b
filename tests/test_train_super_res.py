"""Super-resolution training (`model.small_size > 0`, the reference's super_res_train.py): the
model is conditioned on the batch's area-downsampled copy; tiny 8x8-from-4x4 digits, trained a few
steps, previewed and sampled from base samples."""

import jax
import numpy as np
import pytest

from configs import tiny
from gdiff import factory
from gdiff.data import digits
from gdiff.jobs import sample as sampling_run
from gdiff.models import layers
from gdiff.sampling import sample_files
from gdiff.train import diffusion_trainer

SMALL = 4
STEPS = 4


def _config(workdir, base: str = "", sample_every: int = 0):
    config = tiny.get_config()
    config.model.small_size = SMALL  # 4x4 -> 8x8
    config.train.num_steps = STEPS
    config.train.log_every = 1
    config.train.sample_every = sample_every
    config.train.progress = False
    s = config.sample
    s.base_samples = base
    s.num_samples = 6
    s.batch_size = 1
    s.timestep_respacing = "3"
    s.output_dir = str(workdir / "samples")
    return config


def _base_samples(path, n: int = 3):
    """Held-out digits area-downsampled to SMALL, as uint8 sample files (arr_0, arr_1)."""
    src = digits.DigitsSource("validation", 8)
    pairs = [src.load(i, np.random.default_rng(0)) for i in range(n)]
    images = np.stack([p[0] for p in pairs])
    low = np.asarray(layers.area_resize(images, SMALL, SMALL))
    pixels = np.clip(np.round((low + 1) * 127.5), 0, 255).astype(np.uint8)
    labels = np.asarray([p[1] for p in pairs])
    np.savez(path, arr_0=pixels, arr_1=labels)
    return labels


def test_area_resize_is_torch_area_interpolation():
    x = np.random.default_rng(0).normal(size=(2, 6, 9, 3)).astype(np.float32)
    blocks = x[:, :6, :9].reshape(2, 3, 2, 3, 3, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(layers.area_resize(x, 3, 3), blocks, rtol=1e-6, atol=1e-7)
    # Sizes that do not divide: PyTorch's adaptive windows [floor(i*in/out), ceil((i+1)*in/out)).
    got = np.asarray(layers.area_resize(x, 4, 5))
    want = np.empty((2, 4, 5, 3), np.float32)
    for i in range(4):
        for j in range(5):
            r0, r1 = (i * 6) // 4, -(-((i + 1) * 6) // 4)
            c0, c1 = (j * 9) // 5, -(-((j + 1) * 9) // 5)
            want[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_super_res_trains_previews_and_samples(tmp_path):
    base = tmp_path / "base.npz"
    labels = _base_samples(base)
    config = _config(tmp_path, str(base), sample_every=STEPS)
    result = diffusion_trainer.train(config, str(tmp_path))
    assert [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))
    assert all(np.isfinite(h["loss"]) for h in result["history"])
    # A SuperResModel: the first conv sees the image and the upsampled low-resolution copy.
    assert result["state"].params["input_blocks_0_0"]["kernel"].shape[2] == 6
    assert (tmp_path / "samples_train" / f"step_{STEPS:07d}.png").exists()

    paths = sampling_run.run(config, str(tmp_path))
    images, got_labels = sample_files.read_sample_file(paths[0.0])
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(got_labels, labels[np.arange(6) % 3])


def test_the_step_conditions_on_the_area_downsampled_batch(tmp_path):
    """What the trainer calls a SuperResModel with: the labels and the batch's 2x2 block means
    (the reference's F.interpolate(x, small_size, mode="area"))."""
    config = _config(tmp_path)
    model = factory.build_model(config)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    kwargs = diffusion_trainer.model_kwargs(model, {"x": x, "y": np.array([1, 2])}, SMALL)
    np.testing.assert_allclose(
        kwargs["low_res"], np.asarray(x).reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4)), atol=1e-6
    )
    assert kwargs["y"].tolist() == [1, 2]


def test_super_res_preview_needs_base_samples(tmp_path):
    with pytest.raises(ValueError, match="training preview.*sample.base_samples"):
        diffusion_trainer.train(_config(tmp_path, sample_every=2), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written
