"""`--mode=sample` end to end on tiny random models: files, resume, devices, bad input."""

import os

import jax
import numpy as np
import pytest
from conftest import perturbed

from configs import tiny as tiny_config
from gdiff import distributed, factory
from gdiff.checkpoints import store
from gdiff.jobs import sample as sample_run
from gdiff.sampling import plan as plan_lib
from gdiff.sampling import sample_files

N = 10  # not a multiple of the 8-example global batch: the last batch is trimmed


def _tiny():
    config = tiny_config.get_config()
    # The reference's classifier fixes 64 channels per attention head, more than the tiny
    # classifier's 32 (the factory reads classifier.num_head_channels for small images).
    config.classifier.num_head_channels = 32
    return config


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Random tiny model and classifier saved as inference checkpoints (what --mode=convert or
    training leaves), loaded back by run() through gdiff.checkpoints.locate.load_params."""
    root = tmp_path_factory.mktemp("ckpts")
    config = _tiny()
    # Perturbed: a fresh network's zero-initialised output layers would ignore the inputs.
    model_vars = perturbed(factory.init_variables(factory.build_model(config), jax.random.key(0)))
    cls_vars = factory.init_variables(factory.build_classifier(config), jax.random.key(1))
    cls_vars = perturbed(cls_vars, seed=1, scale=0.2)  # sharp logits: visible guidance
    store.save_params(root / "model", model_vars["params"], metadata={"kind": "model"})
    store.save_params(root / "cls", cls_vars["params"], metadata={"kind": "classifier"})
    return root


def _config(ckpts, out, **sample):
    config = _tiny()
    s = config.sample
    s.num_samples = N
    s.batch_size = 1
    s.timestep_respacing = "3"
    s.classifier_scale = "0,2"
    s.labels = "balanced"
    s.model_checkpoint = str(ckpts / "model")
    s.classifier_checkpoint = str(ckpts / "cls")
    s.output_dir = str(out)
    for k, v in sample.items():
        s[k] = v
    return config


def _stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def test_run_files_resume_and_devices(ckpts, tmp_path):
    # Reference: one device, 8 examples per device (the same 8-example global batch).
    ref_paths = sample_run.run(
        _config(ckpts, tmp_path / "one", batch_size=8),
        str(tmp_path),
        mesh=distributed.data_mesh(jax.devices()[:1]),
    )
    assert sorted(ref_paths) == [0.0, 2.0]
    for scale, path in ref_paths.items():
        assert path.name == f"samples_{N}x8x8x3.npz"
        assert path.parent.name == f"scale_{scale:g}"
        with np.load(path) as z:
            assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (N, 8, 8, 3)
            np.testing.assert_array_equal(z["arr_1"], np.arange(N) % 10)
        assert (path.parent / "grid.png").exists()
        assert sorted(p.name for p in path.parent.glob("shard_*")) == [
            "shard_0_0.npz",
            "shard_0_1.npz",
        ]
    ref = {s: sample_files.read_sample_file(p)[0] for s, p in ref_paths.items()}
    assert np.abs(ref[2.0].astype(int) - ref[0.0]).mean() > 0.5  # guidance did something

    # 8 devices, killed after the first batch, then resumed.
    config = _config(ckpts, tmp_path / "eight")

    class Killed(RuntimeError):
        pass

    def die(batch):
        raise Killed(batch)

    with pytest.raises(Killed):
        sample_run.run(config, str(tmp_path), on_batch_done=die)
    first = plan_lib.scale_dir(tmp_path / "eight", 2.0) / "shard_0_0.npz"
    assert first.exists() and not (first.parent / "shard_0_1.npz").exists()
    with np.load(first) as z:
        assert z["arr_0"].shape == (8, 8, 8, 3)
    before = _stat(first)
    done = []
    paths = sample_run.run(config, str(tmp_path), on_batch_done=done.append)
    assert done == [1]  # only the missing batch was sampled
    assert _stat(first) == before  # a finished shard is never rewritten
    for scale, path in paths.items():
        images, labels = sample_files.read_sample_file(path)
        # Same samples as the uninterrupted one-device run (per-example noise, same seed).
        np.testing.assert_array_equal(images, ref[scale])
        np.testing.assert_array_equal(labels, np.arange(N) % 10)
    merged = _stat(paths[2.0])
    again = sample_run.run(config, str(tmp_path), on_batch_done=done.append)
    assert done == [1] and again == paths and _stat(paths[2.0]) == merged

    # Resuming into the same directory with other settings is refused.
    with pytest.raises(ValueError, match="seed"):
        sample_run.run(_config(ckpts, tmp_path / "eight", seed=3), str(tmp_path))


def test_bad_input_messages(ckpts, tmp_path):
    with pytest.raises(ValueError, match="classifier_checkpoint"):
        sample_run.run(_config(ckpts, tmp_path / "a", classifier_checkpoint=""), str(tmp_path))
    with pytest.raises(ValueError, match=r"label\(s\) \[12\] outside the model's classes 0\.\.9"):
        sample_run.run(_config(ckpts, tmp_path / "b", labels="3,12"), str(tmp_path))
    with pytest.raises(ValueError, match="repeats"):
        sample_run.run(_config(ckpts, tmp_path / "c", classifier_scale="1,1"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cannot load the model"):
        sample_run.run(
            _config(
                ckpts,
                tmp_path / "d",
                model_checkpoint=str(tmp_path / "nowhere"),
                classifier_scale="0",
            ),
            str(tmp_path),
        )

    # Super-resolution: base samples must match model.small_size.
    config = _config(ckpts, tmp_path / "e", classifier_scale="0")
    config.model.small_size = 4
    base = tmp_path / "base.npz"
    np.savez(base, arr_0=np.zeros((3, 8, 8, 3), np.uint8), arr_1=np.array([0, 1, 2]))
    config.sample.base_samples = str(base)
    with pytest.raises(ValueError, match=r"8x8, but the model upsamples from model.small_size=4x4"):
        sample_run.run(config, str(tmp_path))
    config.sample.base_samples = ""
    with pytest.raises(ValueError, match="sample.base_samples is empty"):
        sample_run.run(config, str(tmp_path))
    np.savez(base, arr_0=np.full((3, 4, 4, 3), 255, np.uint8))
    low, labels = plan_lib.load_base_samples(str(base), 4)
    assert labels is None and low.dtype == np.float32 and np.all(low == 1.0)
    config.sample.base_samples = str(base)
    with pytest.raises(ValueError, match="no labels"):
        sample_run.run(config, str(tmp_path))


def _super_res_config(ckpt, out, base):
    config = _tiny()
    config.model.small_size = 4  # 4x4 -> 8x8
    s = config.sample
    s.num_samples = 7  # not a multiple of the 8-example global batch, nor of the 3 base images
    s.batch_size = 1
    s.timestep_respacing = "3"
    s.classifier_scale = "0"  # the reference's upsamplers are never classifier-guided
    s.model_checkpoint = str(ckpt)
    s.base_samples = str(base)
    s.output_dir = str(out)
    return config


def test_super_resolution_end_to_end_routes_each_base_image(tmp_path):
    """A random SuperResModel upsamples base samples: example i sees base image i mod N, so
    changing one base image changes exactly the examples that cycle onto it."""
    config = _super_res_config(tmp_path / "sr", tmp_path / "out_a", tmp_path / "a.npz")
    module = factory.build_model(config)
    variables = perturbed(factory.init_variables(module, jax.random.key(3)), seed=3)
    store.save_params(tmp_path / "sr", variables["params"], metadata={"kind": "model"})

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    labels = np.array([4, 0, 7])
    np.savez(tmp_path / "a.npz", arr_0=base, arr_1=labels)
    changed = base.copy()
    changed[1] = 255 - changed[1]
    np.savez(tmp_path / "b.npz", arr_0=changed, arr_1=labels)

    path_a = sample_run.run(config, str(tmp_path))[0.0]
    config_b = _super_res_config(tmp_path / "sr", tmp_path / "out_b", tmp_path / "b.npz")
    path_b = sample_run.run(config_b, str(tmp_path))[0.0]
    images_a, labels_a = sample_files.read_sample_file(path_a)
    images_b, labels_b = sample_files.read_sample_file(path_b)
    assert images_a.shape == (7, 8, 8, 3) and images_a.dtype == np.uint8
    # Labels follow the base samples (the reference's super_res_sample.py cycles them).
    np.testing.assert_array_equal(labels_a, labels[np.arange(7) % 3])
    np.testing.assert_array_equal(labels_b, labels_a)
    on_changed = np.arange(7) % 3 == 1
    differs = np.any(images_a != images_b, axis=(1, 2, 3))
    # Same noise (fold_in(seed, id)) everywhere: only the examples fed base image 1 move.
    np.testing.assert_array_equal(differs, on_changed)
    # And the output is not the base image's bilinear upsampling by accident: a random model
    # still adds its own (noise-driven) content, so two examples of the same base image differ.
    assert np.any(images_a[0] != images_a[3])
