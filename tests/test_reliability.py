"""Reliability on the tiny config: nothing lost, nothing mixed, and the message a user sees.

Each test is one scenario of issue 17: a sampling run resumed after its model changed, a corrupt
newest checkpoint, a learning-rate change on resume, two runs on one workdir, a run killed by
SIGKILL, a full disk, a config that does not match its checkpoint.
"""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from gdiff import errors, workdir_lock
from gdiff.checkpoints import locate, store
from gdiff.engine import manifest as manifest_lib
from gdiff.jobs import nll
from gdiff.jobs import sample as sample_run
from gdiff.sampling import sample_files
from gdiff.train import diffusion_trainer, loop_utils

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = os.path.join(tempfile.gettempdir(), "gdiff_test_jax_cache")
N = 10  # samples per run: two global batches of 8 on the 8 fake devices, the last trimmed


def _train_config(**train):
    config = tiny.get_config()
    config.train.num_steps = 4
    config.train.save_every = 2
    config.train.log_every = 1
    config.train.progress = False
    for k, v in train.items():
        config.train[k] = v
    return config


def _sample_config(workdir, **sample):
    config = _train_config()
    s = config.sample
    s.num_samples = N
    s.batch_size = 1
    s.timestep_respacing = "3"
    s.classifier_scale = "0"
    s.output_dir = str(workdir / "samples")
    for k, v in sample.items():
        s[k] = v
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained 4 steps, checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained")
    diffusion_trainer.train(_train_config(), str(workdir))
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    """A private copy of `trained`."""
    shutil.copytree(trained, tmp_path / "w")
    return tmp_path / "w"


class Killed(Exception):
    pass


def _kill_after_first_batch(batch):
    raise Killed(batch)


def _merged(config):
    images, labels = sample_files.read_sample_file(sample_run.run(config, "unused")[0.0])
    return images, labels


def _tree(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# --- Sampling never mixes models ------------------------------------------------------------


def test_a_resumed_sampling_run_refuses_weights_trained_further(workdir):
    config = _sample_config(workdir, model_checkpoint=str(workdir))
    with pytest.raises(Killed):
        sample_run.run(config, str(workdir), on_batch_done=_kill_after_first_batch)
    out = workdir / "samples"
    before = _tree(out)
    assert any("shard_" in name for name in before)

    # The same checkpoint folder gains step 6; the rerun used to finish with it, mixing models.
    diffusion_trainer.train(_train_config(num_steps=6), str(workdir))
    with pytest.raises(errors.ConfigMismatchError) as e:
        sample_run.run(config, str(workdir))
    message = str(e.value)
    assert "model_weights.step: 4 -> 6" in message and "model_weights.sha256" in message
    assert f"sample.model_checkpoint={workdir / 'checkpoints' / '4'}" in message
    assert "sample.restart=true" in message
    assert _tree(out) == before  # refused before touching anything

    # Finishing the run with the step it began with gives exactly an uninterrupted run's rows.
    pinned = _sample_config(workdir, model_checkpoint=str(workdir / "checkpoints" / "4"))
    finished = _merged(pinned)
    fresh = _merged(
        _sample_config(
            workdir,
            model_checkpoint=str(workdir / "checkpoints" / "4"),
            output_dir=str(workdir / "fresh"),
        )
    )
    np.testing.assert_array_equal(finished[0], fresh[0])

    # sample.restart moves the old run aside (nothing deleted) and draws step 6 afresh.
    restarted = _merged(_sample_config(workdir, model_checkpoint=str(workdir), restart=True))
    assert not np.array_equal(restarted[0], finished[0])
    aside = [p for p in workdir.iterdir() if p.name.startswith("samples.replaced-")]
    assert len(aside) == 1
    kept, _ = sample_files.read_sample_file(aside[0] / "scale_0" / "samples_10x8x8x3.npz")
    np.testing.assert_array_equal(kept, finished[0])
    manifest = json.loads((out / manifest_lib.RUN_FILE).read_text())
    assert manifest["model_weights"]["step"] == 6


def _params_copy(workdir) -> str:
    """The workdir's weights as a parameter checkpoint, which records no training settings (as a
    converted released checkpoint): only the sampling manifest tells runs apart."""
    return str(store.save_params(workdir / "params", locate.load_params(workdir)))


def test_a_finished_run_is_not_reported_for_other_settings(workdir):
    config = _sample_config(workdir, model_checkpoint=_params_copy(workdir))
    images, _ = _merged(config)
    merged = workdir / "samples" / "scale_0" / "samples_10x8x8x3.npz"
    stamp = merged.stat().st_mtime_ns

    # Another noise schedule over the same weights: refused, naming the key (it used to print
    # "nothing to do" and keep the old samples).
    other = _sample_config(workdir, model_checkpoint=config.sample.model_checkpoint)
    other.diffusion.noise_schedule = "linear"
    with pytest.raises(
        errors.ConfigMismatchError, match="diffusion.noise_schedule: 'cosine' -> 'linear'"
    ):
        sample_run.run(other, str(workdir))

    # Even with run.json gone, the merged file's run digest no longer matches: not reused.
    (workdir / "samples" / manifest_lib.RUN_FILE).unlink()
    with pytest.raises(errors.ConfigMismatchError, match="merged from another run"):
        sample_run.run(other, str(workdir))
    assert merged.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(sample_files.read_sample_file(merged)[0], images)

    # ... and a shard drawn under the first settings is never merged into the second run.
    (workdir / "samples" / manifest_lib.RUN_FILE).unlink()
    merged.unlink()
    with pytest.raises(errors.ConfigMismatchError, match="shard_0_0.npz was drawn under another"):
        sample_run.run(other, str(workdir))


def test_a_config_that_does_not_match_the_checkpoint_names_the_first_key(workdir):
    # A training checkpoint records its network: the setting is named before any weight is read.
    config = _sample_config(workdir, model_checkpoint=str(workdir))
    config.model.num_channels = 64
    with pytest.raises(errors.ConfigMismatchError, match="model.num_channels: trained 32, config"):
        sample_run.run(config, str(workdir))
    # A parameter checkpoint records nothing: the first differing parameter is named.
    config.sample.model_checkpoint = _params_copy(workdir)
    with pytest.raises(errors.ConfigMismatchError) as e:
        sample_run.run(config, str(workdir))
    assert "first differing key: input_blocks_0_0/bias: checkpoint float32[32] vs this config " in (
        str(e.value)
    ), e.value
    assert not (workdir / "samples").exists()


def test_a_resumed_bits_per_dim_run_refuses_another_model(workdir):
    config = _train_config()
    config.eval.nll_num_samples = 10
    config.diffusion.timestep_respacing = "5"
    with pytest.raises(Killed):
        nll.run(config, str(workdir), on_batch_done=_kill_after_first_batch)
    diffusion_trainer.train(_train_config(num_steps=6), str(workdir))
    with pytest.raises(errors.ConfigMismatchError, match="model_weights.step: 4 -> 6"):
        nll.run(config, str(workdir))


# --- A broken checkpoint falls back ---------------------------------------------------------


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
    item = step_dir / "default"
    if how == "empty_step_folder":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    elif how == "missing_metadata":
        (item / "_METADATA").unlink()
    elif how == "truncated_arrays":
        for f in (item / "ocdbt.process_0" / "d").iterdir():
            f.write_bytes(f.read_bytes()[:10])


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("empty_step_folder", "the step folder is empty"),
        ("missing_metadata", "_METADATA is missing"),
        ("truncated_arrays", "is damaged or missing"),
    ],
)
def test_a_corrupt_newest_step_falls_back_to_the_newest_intact_one(workdir, caplog, how, why):
    ckpt = workdir / "checkpoints"
    _corrupt(ckpt / "4", how)
    result = diffusion_trainer.train(_train_config(num_steps=6), str(workdir))
    assert result["start_step"] == 2
    assert [h["step"] for h in result["history"]] == [3, 4, 5, 6]
    lines = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(lines) == 1 and f"{ckpt}: step 4 cannot be restored: " in lines[0], lines
    assert why in lines[0] and "\n" not in lines[0]
    assert any(
        "resuming from step 2, the newest intact one" in r.getMessage() for r in caplog.records
    )
    # Kept for inspection, out of the way of the step the resumed run saved again.
    assert (ckpt / "unrestorable_step_4").is_dir()
    assert store.CheckpointManager(ckpt).all_steps() == [4, 6]


def test_no_intact_step_ends_in_one_line_naming_each_step(workdir):
    ckpt = workdir / "checkpoints"
    _corrupt(ckpt / "4", "truncated_arrays")
    _corrupt(ckpt / "2", "missing_metadata")
    proc = _gdiff(
        "--mode=train", "--config=tiny", f"--workdir={workdir}", "--config.train.num_steps=6"
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gdiff: no step of {ckpt} can be restored: step 4: array "), last
    assert "; step 2: " in last and "_METADATA is missing" in last
    assert "Traceback" not in proc.stderr


def test_a_changed_structure_is_a_config_mismatch_not_a_fallback(tmp_path):
    manager = store.CheckpointManager(tmp_path / "c")
    for step in (1, 2):
        manager.save(step, {"w": np.ones((2, 3), np.float32)})
    manager.wait_until_finished()
    wanted = {"w": ocp.utils.to_shape_dtype_struct(np.ones((2, 4), np.float32))}
    with pytest.raises(
        errors.ConfigMismatchError,
        match=r"first differing key: w: checkpoint float32\[2, 3\] vs this config float32\[2, 4\]",
    ):
        manager.restore_newest_intact(wanted)
    assert manager.all_steps() == [1, 2]  # nothing set aside
    manager.close()


# --- Non-finite stop, then a lower learning rate --------------------------------------------


def test_a_learning_rate_change_on_resume_is_allowed_and_logged(workdir, caplog):
    config = _train_config(num_steps=5)
    config.optim.lr = 1e-3
    result = diffusion_trainer.train(config, str(workdir))
    assert result["start_step"] == 4
    changes = [r.getMessage() for r in caplog.records if "since the checkpoint" in r.getMessage()]
    assert changes == [
        "diffusion: num_steps: 4 -> 5 since the checkpoint; the schedule follows this config "
        "from step 4",
        "diffusion: optim.lr: 0.002 -> 0.001 since the checkpoint; the schedule follows this "
        "config from step 4",
    ], changes
    rows = loop_utils.read_metrics(workdir, "metrics_diffusion.jsonl")
    assert rows[-1]["step"] == 5 and rows[-1]["lr"] == pytest.approx(1e-3)


# --- One writer per workdir; SIGKILL --------------------------------------------------------


def _env():
    return dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_COMPILATION_CACHE_DIR=CACHE,
        JAX_PLATFORMS="cpu",
    )


def _gdiff(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "main.py", *args],
        env=_env(),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_second_trainer_is_refused_and_a_sigkilled_one_leaves_a_stale_lock(tmp_path, caplog):
    workdir = tmp_path / "w"
    proc = subprocess.Popen(
        [
            sys.executable,
            "main.py",
            "--mode=train",
            "--config=tiny",
            f"--workdir={workdir}",
            "--config.train.num_steps=100000",
            "--config.train.save_every=2",
            "--config.train.log_every=1",
            "--config.train.progress=false",
        ],
        env=_env(),
        cwd=str(REPO),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / "metrics_diffusion.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    lock = workdir_lock.lock_path(workdir, "train_diffusion")
    try:
        with pytest.raises(errors.WorkdirLockedError) as e:
            diffusion_trainer.train(_train_config(num_steps=8), str(workdir))
        assert f"is in use by another diffusion training (pid {proc.pid} on host " in str(e.value)
        assert f"delete {lock}" in str(e.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert lock.exists()  # SIGKILL runs no cleanup

    logged = [r["step"] for r in loop_utils.read_metrics(workdir, "metrics_diffusion.jsonl")]
    saved = store.CheckpointManager(workdir / "checkpoints").latest_step()
    assert saved is not None and logged[-1] >= saved
    end = logged[-1] + 2
    resumed = diffusion_trainer.train(_train_config(num_steps=end), str(workdir))
    assert resumed["start_step"] == saved
    stale = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert len(stale) == 1 and f"pid {proc.pid}" in stale[0], stale
    assert not lock.exists()
    rows = [r["step"] for r in loop_utils.read_metrics(workdir, "metrics_diffusion.jsonl")]
    assert rows == list(range(1, end + 1))


@pytest.fixture
def live_pid():
    """The pid of a live process on this host that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _plant_lock(path, pid, host=None):
    record = workdir_lock._record("sampling run")
    record.update(pid=pid, start_time=workdir_lock._start_time(pid), host=host or record["host"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_two_samplers_on_one_output_directory(workdir, live_pid):
    config = _sample_config(workdir, model_checkpoint=str(workdir))
    lock = workdir_lock.lock_path(workdir, "samples")
    _plant_lock(lock, live_pid)
    with pytest.raises(errors.WorkdirLockedError, match=f"pid {live_pid} on host"):
        sample_run.run(config, str(workdir))
    assert not (workdir / "samples").exists()

    # A holder on another host cannot be checked from here: refused, with what to do if dead.
    _plant_lock(lock, 1, host="elsewhere")
    with pytest.raises(errors.WorkdirLockedError, match="no longer running on that host, delete"):
        sample_run.run(config, str(workdir))

    lock.unlink()
    sample_run.run(config, str(workdir))
    assert not lock.exists()


# --- A full disk ----------------------------------------------------------------------------


def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes(workdir, monkeypatch):
    original = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(errors.DiskFullError) as e:
        diffusion_trainer.train(_train_config(num_steps=8), str(workdir))
    assert str(e.value) == (
        f"disk full while saving step 6 to {workdir / 'checkpoints'}: free space (or lower "
        "train.max_to_keep) and rerun; it resumes from step 4"
    )
    monkeypatch.undo()
    assert diffusion_trainer.train(_train_config(num_steps=8), str(workdir))["start_step"] == 4
