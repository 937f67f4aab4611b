"""Diffusion training on the tiny config: learning, mesh independence, exact resume, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from gdiff import distributed
from gdiff.checkpoints import locate, store
from gdiff.data import pipeline
from gdiff.evaluation import ClassifierExtractor, SmallClassifier, evaluator
from gdiff.jobs import sample as sampling_run
from gdiff.sampling import grid as grid_lib
from gdiff.sampling import sample_files
from gdiff.train import diffusion_trainer, loop_utils

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 16
# Identical programs (the same step compiled by a resumed run, a subprocess) compile once.
# The persistent compilation cache tests/conftest.py enables; subprocesses share it.
CACHE = os.path.join(tempfile.gettempdir(), "gdiff_test_jax_cache")


def _config(**train):
    config = tiny.get_config()
    config.train.num_steps = STEPS
    config.train.log_every = 1
    config.train.save_every = 1000
    for k, v in train.items():
        config.train[k] = v
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run on all 8 devices."""
    workdir = tmp_path_factory.mktemp("reference")
    result = diffusion_trainer.train(_config(), str(workdir))
    return workdir, result


def _losses(result):
    return np.asarray([h["loss"] for h in result["history"]])


def test_training_lowers_the_loss_and_keeps_ema(reference):
    workdir, result = reference
    assert [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))
    rows = loop_utils.read_metrics(workdir, "metrics_diffusion.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    mse = np.asarray([r["mse"] for r in rows])
    assert mse[-6:].mean() < 0.8 * mse[:3].mean(), mse
    for key in ("loss_q0", "mse_q3", "vb_q1", "grad_norm", "param_norm", "lr", "steps_per_sec"):
        assert key in rows[-1] and np.isfinite(rows[-1][key])
    state = result["state"]
    assert int(state.step) == STEPS
    assert sorted(state.ema_params) == ["0.9", "0.99"]
    p = jax.tree.leaves(state.params)
    e90, e99 = jax.tree.leaves(state.ema_params["0.9"]), jax.tree.leaves(state.ema_params["0.99"])
    moved = [np.abs(a - b).max() for a, b in zip(p, e99, strict=True)]
    assert max(moved) > 0
    # The faster EMA tracks the parameters more closely.
    d90 = sum(float(np.abs(a - b).sum()) for a, b in zip(p, e90, strict=True))
    d99 = sum(float(np.abs(a - b).sum()) for a, b in zip(p, e99, strict=True))
    assert d90 < d99
    # Inference loading picks the slowest EMA from the training workdir.
    loaded = locate.load_params(workdir)
    for a, b in zip(jax.tree.leaves(loaded), e99, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_device_gives_the_eight_device_loss_curve(reference, tmp_path):
    _, result = reference
    mesh = distributed.data_mesh(jax.devices()[:1])
    one = diffusion_trainer.train(_config(), str(tmp_path), mesh=mesh, stop_at_step=8)
    np.testing.assert_allclose(_losses(one), _losses(result)[:8], rtol=2e-4)


def test_stop_and_resume_continues_exactly(reference, tmp_path):
    _, result = reference
    first = diffusion_trainer.train(_config(), str(tmp_path), stop_at_step=8)
    assert store.CheckpointManager(tmp_path / "checkpoints").latest_step() == 8
    second = diffusion_trainer.train(_config(), str(tmp_path))
    assert second["start_step"] == 8
    assert [h["step"] for h in second["history"]] == list(range(9, STEPS + 1))
    np.testing.assert_array_equal(
        np.concatenate([_losses(first), _losses(second)]), _losses(result)
    )
    for a, b in zip(
        jax.tree.leaves(second["state"]), jax.tree.leaves(result["state"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_every_zero_saves_only_the_last_step(tmp_path):
    # 0 means "off" for save_every as for sample_every and eval_every (it used to save every step).
    diffusion_trainer.train(_config(save_every=0), str(tmp_path), stop_at_step=5)
    assert store.CheckpointManager(tmp_path / "checkpoints").all_steps() == [5]


def test_sigterm_saves_and_the_resumed_run_matches(reference, tmp_path):
    _, result = reference
    script = (
        f"import sys; sys.path.insert(0, {str(REPO)!r});"
        "from tests.test_train import _config;"
        "from gdiff.train import diffusion_trainer;"
        f"r = diffusion_trainer.train(_config(num_steps=100000), {str(tmp_path)!r});"
        "print('STOPPED_EARLY', r['stopped_early'])"
    )
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_COMPILATION_CACHE_DIR=CACHE,
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "metrics_diffusion.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "STOPPED_EARLY True" in out
    k = store.CheckpointManager(tmp_path / "checkpoints").latest_step()
    logged = [r["step"] for r in loop_utils.read_metrics(tmp_path, "metrics_diffusion.jsonl")]
    assert k == logged[-1] and 3 <= k < STEPS - 2, (k, logged)
    resumed = diffusion_trainer.train(_config(num_steps=k + 2), str(tmp_path))
    assert resumed["start_step"] == k
    assert [h["step"] for h in resumed["history"]] == [k + 1, k + 2]
    np.testing.assert_array_equal(_losses(resumed), _losses(result)[k : k + 2])


def _poison(monkeypatch, bad_calls):
    """Makes the images of the given (0-based) batches NaN."""
    calls = {"n": 0}
    original = pipeline.to_global

    def to_global(batch, mesh):
        if calls["n"] in bad_calls:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        calls["n"] += 1
        return original(batch, mesh)

    monkeypatch.setattr(pipeline, "to_global", to_global)


def test_nan_steps_are_skipped_then_a_persistent_nan_stops(reference, tmp_path, monkeypatch):
    _, result = reference
    _poison(monkeypatch, {2})
    run = diffusion_trainer.train(_config(), str(tmp_path), stop_at_step=5)
    finite = [h["finite"] for h in run["history"]]
    assert finite == [True, True, False, True, True]
    state = run["state"]
    assert int(state.num_skipped) == 1 and int(state.nonfinite_streak) == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    np.testing.assert_array_equal(_losses(run)[:2], _losses(result)[:2])
    rows = loop_utils.read_metrics(tmp_path, "metrics_diffusion.jsonl")
    assert rows[-1]["num_skipped"] == 1

    # Every batch from now on is NaN: the run stops with a clear message and saves nothing.
    monkeypatch.undo()
    _poison(monkeypatch, set(range(1000)))
    config = _config(max_nonfinite_steps=3)
    ckpt = tmp_path / "checkpoints"
    before = sorted(str(p) for p in ckpt.rglob("*"))
    with pytest.raises(FloatingPointError, match="non-finite for 3 consecutive steps"):
        diffusion_trainer.train(config, str(tmp_path))
    assert sorted(str(p) for p in ckpt.rglob("*")) == before
    assert store.CheckpointManager(ckpt).latest_step() == 5


def test_no_checkpoint_is_saved_inside_a_non_finite_streak(tmp_path, monkeypatch):
    # Step 3 is non-finite: neither its periodic save nor the final save may persist it, so a
    # rerun resumes from step 2 (it used to resume from the poisoned step 3).
    _poison(monkeypatch, {2})
    diffusion_trainer.train(_config(save_every=1), str(tmp_path), stop_at_step=3)
    assert store.CheckpointManager(tmp_path / "checkpoints").all_steps() == [1, 2]


def test_resume_after_a_kill_leaves_one_metrics_row_per_step(tmp_path):
    # A killed run logs steps past its last checkpoint; the resumed run logs them again.
    diffusion_trainer.train(_config(save_every=2), str(tmp_path), stop_at_step=4)
    log = tmp_path / "metrics_diffusion.jsonl"
    rows = log.read_text().splitlines()
    extra = [dict(json.loads(rows[-1]), step=s) for s in (5, 6)]  # logged, never checkpointed
    log.write_text("".join(r + "\n" for r in rows) + "".join(json.dumps(r) + "\n" for r in extra))
    diffusion_trainer.train(_config(save_every=2), str(tmp_path), stop_at_step=6)
    steps = [r["step"] for r in loop_utils.read_metrics(tmp_path, "metrics_diffusion.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_bad_configs_fail_clearly_and_touch_nothing(reference, tmp_path):
    workdir, _ = reference
    config = _config(batch_size=12)
    with pytest.raises(ValueError, match=r"train.batch_size=12 .*number of devices \(8\)"):
        diffusion_trainer.train(config, str(tmp_path))
    config = _config(microbatch=4)
    with pytest.raises(ValueError, match="train.microbatch=4 .*device count"):
        diffusion_trainer.train(config, str(tmp_path))
    config = _config()
    config.data.source = "tfds"
    config.data.name = "imagenet_typo"
    with pytest.raises(ValueError, match="unknown dataset data.name='imagenet_typo'"):
        diffusion_trainer.train(config, str(tmp_path))
    ckpt = workdir / "checkpoints"
    before = {str(p): p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    config = _config()
    config.model.num_channels = 64
    with pytest.raises(ValueError, match="another configuration.*model.num_channels"):
        diffusion_trainer.train(config, str(workdir))
    assert {str(p): p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before


def test_microbatches_accumulate_to_the_full_batch_gradient(reference, tmp_path):
    _, result = reference
    config = _config(microbatch=8, sample_every=3)
    run = diffusion_trainer.train(config, str(tmp_path), stop_at_step=3)
    # Step 2 and 3 losses depend on the accumulated updates of the steps before them.
    np.testing.assert_allclose(_losses(run), _losses(result)[:3], rtol=2e-4)
    grid = tmp_path / "samples_train" / "step_0000003.png"
    assert grid.exists()
    image = np.asarray(Image.open(grid))
    assert image.shape == (4 * 9 + 1, 4 * 9 + 1, 3) and image.std() > 0


def test_training_preview_draws_what_mode_sample_draws(tmp_path):
    """Preview example i is --mode=sample's example i (same seed, labels and parameters)."""
    config = _config(sample_every=2)
    diffusion_trainer.train(config, str(tmp_path), stop_at_step=2)
    preview = np.asarray(Image.open(tmp_path / "samples_train" / "step_0000002.png"))
    config.sample.num_samples = diffusion_trainer.PREVIEW_SAMPLES
    config.sample.batch_size = 2  # per device: one batch of 16 on the 8 test devices
    config.sample.labels = "balanced"
    config.sample.classifier_scale = "0"
    paths = sampling_run.run(config, str(tmp_path))
    images, labels = sample_files.read_sample_file(paths[0.0])
    np.testing.assert_array_equal(labels, np.arange(16) % 10)
    np.testing.assert_array_equal(preview, grid_lib.make_grid(images, 4, pad=1, fill=0))
    assert images.std() > 0


def test_fid_during_training_is_evaluate_of_what_mode_sample_draws(tmp_path, monkeypatch):
    """train.fid_every: the logged numbers are --mode=evaluate's for --mode=sample's samples of
    that step (the same examples, drawn in sample.batch_size batches, the last one trimmed)."""
    small = SmallClassifier(num_classes=10, width=8)
    extractor = ClassifierExtractor(
        small, small.init(jax.random.key(2), np.zeros((1, 8, 8, 3), np.float32)), batch_size=8
    )
    # The FID Inception stands in: a small feature network (the weights file is only hashed).
    monkeypatch.setattr(evaluator, "build_extractor", lambda *args, **kwargs: extractor)
    ref = tmp_path / "ref.npz"
    ref_images = np.random.default_rng(0).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
    np.savez(ref, arr_0=ref_images)
    weights = tmp_path / "weights.npz"
    weights.write_bytes(b"stand-in weights: hashed for the activation cache only")
    config = _config(fid_every=2, fid_samples=20)  # 16 per batch on 8 devices: 2 batches
    config.eval.is_split_size = 7
    with pytest.raises(FileNotFoundError, match="train.fid_every=2 .* eval.ref_batch=''"):
        diffusion_trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
    config.eval.ref_batch, config.eval.inception_weights = str(ref), str(weights)
    diffusion_trainer.train(config, str(tmp_path / "run"), stop_at_step=2)
    rows = loop_utils.read_metrics(tmp_path / "run", "metrics_diffusion.jsonl")
    logged = [r for r in rows if "eval_fid" in r]
    assert [r["step"] for r in logged] == [2]
    config.sample.num_samples = 20
    config.sample.labels = "balanced"
    config.sample.classifier_scale = "0"
    paths = sampling_run.run(config, str(tmp_path / "run"))
    images, _ = sample_files.read_sample_file(paths[0.0])
    acts = extractor(ref_images)
    want = evaluator.metrics_from_activations(
        {"pool": acts["pool"], "spatial": acts["spatial"]}, extractor(images), is_split_size=7
    )
    assert {k: logged[0][f"eval_{k}"] for k in evaluator.METRIC_NAMES} == {
        k: float(want[k]) for k in evaluator.METRIC_NAMES
    }
    assert logged[0]["eval_fid"] > 0.0


def test_resume_checkpoint_starts_from_a_step_folder_and_refuses_parameters(reference, tmp_path):
    _, result = reference
    diffusion_trainer.train(_config(), str(tmp_path / "first"), stop_at_step=8)
    config = _config(resume_checkpoint=str(tmp_path / "first" / "checkpoints" / "8"))
    second = diffusion_trainer.train(config, str(tmp_path / "second"))
    assert second["start_step"] == 8
    np.testing.assert_array_equal(_losses(second), _losses(result)[8:])
    # Inference weights carry no optimiser state or step: not something training can resume.
    store.save_params(tmp_path / "params", second["state"].params)
    config = _config(resume_checkpoint=str(tmp_path / "params"))
    with pytest.raises(ValueError, match="parameter checkpoint .* not a resumable training state"):
        diffusion_trainer.train(config, str(tmp_path / "third"))
    config = _config(resume_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="train.resume_checkpoint=.*does not exist"):
        diffusion_trainer.train(config, str(tmp_path / "fourth"))
