"""Issue 23, sampling side: a user's mistake or a machine's state ends in one line that says what,
where and what to do (a `gdiff.errors.GdiffError`), never a traceback; and two resume faults.

Most scenarios call the job functions (gdiff.jobs.sample.run, nll.run, sweep.run) and check the
error's kind and message; two run `main.py` to prove the one-line form of the command.
"""

import errno
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from conftest import perturbed

from configs import tiny
from gdiff import atomic, distributed, errors, factory, workdir_lock
from gdiff.checkpoints import locate, store
from gdiff.engine import manifest as manifest_lib
from gdiff.jobs import nll, sweep
from gdiff.jobs import sample as sample_run
from gdiff.sampling import labels as labels_lib
from gdiff.sampling import plan as plan_lib
from gdiff.sampling import sample_files

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = os.path.join(tempfile.gettempdir(), "gdiff_test_jax_cache")
N = 10  # two global batches of 8 on the 8 fake devices, the last one trimmed
ONE_HOST = plan_lib.Topology(num_devices=8, local_devices=8)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny model as a parameter checkpoint (`model`) and as a training checkpoint directory
    with steps 2 and 4 and two EMA copies (`train/checkpoints`, what a trainer leaves)."""
    root = tmp_path_factory.mktemp("ckpts")
    config = tiny.get_config()
    params = perturbed(factory.init_variables(factory.build_model(config), jax.random.key(0)))
    params = params["params"]
    store.save_params(root / "model", params, metadata={"kind": "model"})
    manager = store.CheckpointManager(root / "train" / "checkpoints")
    for step in (2, 4):
        manager.save(
            step,
            {
                "step": np.int32(step),
                "params": params,
                "ema_params": {"0.9999": params, "0.999": params},
            },
        )
    manager.close()
    return root


def _config(ckpts, out, **sample):
    config = tiny.get_config()
    s = config.sample
    s.num_samples = N
    s.batch_size = 1
    s.timestep_respacing = "3"
    s.classifier_scale = "0"
    s.labels = "balanced"
    s.model_checkpoint = str(ckpts / "model")
    s.output_dir = str(out)
    for k, v in sample.items():
        s[k] = v
    return config


def _refused(kind, fn, *args, **kwargs) -> str:
    """`fn(*args, **kwargs)` raises a GdiffError of `kind` with a one-line message; returns it."""
    with pytest.raises(kind) as e:
        fn(*args, **kwargs)
    assert isinstance(e.value, errors.GdiffError), type(e.value)
    message = str(e.value)
    assert "\n" not in message, message
    return message


class Killed(Exception):
    pass


def _die(batch):
    raise Killed(batch)


# --- Missing inputs and bad settings: the user's to fix -------------------------------------


def test_a_missing_checkpoint_is_a_missing_input(ckpts, tmp_path):
    nowhere = tmp_path / "nowhere"
    message = _refused(
        errors.MissingInputError,
        sample_run.run,
        _config(ckpts, tmp_path / "a", model_checkpoint=str(nowhere)),
        str(tmp_path),
    )
    assert message.startswith(f"cannot load the model from {nowhere}: ")
    assert f"checkpoint path {nowhere} does not exist" in message
    message = _refused(
        errors.MissingInputError,
        sample_run.run,
        _config(ckpts, tmp_path / "b", classifier_scale="0,1", classifier_checkpoint=str(nowhere)),
        str(tmp_path),
    )
    assert message.startswith(f"cannot load the classifier from {nowhere}: ")

    config = _config(ckpts, tmp_path / "c", model_checkpoint=str(nowhere))
    config.eval.nll_num_samples, config.eval.nll_batch_size = 4, 1
    config.eval.nll_output_dir = str(tmp_path / "nll")
    message = _refused(errors.MissingInputError, nll.run, config, str(tmp_path))
    assert message.startswith(f"cannot load the model from {nowhere}: ")

    config = _config(ckpts, tmp_path / "d", model_checkpoint=str(nowhere))
    assert "eval.ref_batch" in _refused(errors.ConfigError, sweep.run, config, str(tmp_path))
    config.eval.ref_batch = str(tmp_path / "ref.npz")
    assert f"eval.ref_batch={tmp_path / 'ref.npz'} does not exist" in _refused(
        errors.MissingInputError, sweep.run, config, str(tmp_path)
    )
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    message = _refused(errors.MissingInputError, sweep.run, config, str(tmp_path))
    assert message.startswith(f"cannot load the model from {nowhere}: ")
    assert not (tmp_path / "d").exists()  # nothing was written


def test_counts_that_cannot_work_are_config_errors(ckpts, tmp_path):
    for key in ("num_samples", "batch_size"):
        message = _refused(
            errors.ConfigError,
            sample_run.run,
            _config(ckpts, tmp_path / key, **{key: 0}),
            str(tmp_path),
        )
        assert message.startswith(f"sample.{key}") and "must be positive; got 0" in message
    for key in ("nll_num_samples", "nll_batch_size"):
        config = _config(ckpts, tmp_path / key)
        config.eval.nll_output_dir = str(tmp_path / key)
        config.eval.nll_num_samples, config.eval.nll_batch_size = 4, 1
        config.eval[key] = -1
        message = _refused(errors.ConfigError, nll.run, config, str(tmp_path))
        assert "must be positive" in message and "(-1" in message
    # A respacing the diffusion's steps cannot give, refused before run.json (nll: the
    # diffusion's own respacing).
    config = _config(ckpts, tmp_path / "r")
    config.eval.nll_output_dir = str(tmp_path / "r")
    config.diffusion.timestep_respacing = "ddim11"
    message = _refused(errors.ConfigError, nll.run, config, str(tmp_path))
    assert message.startswith("diffusion.timestep_respacing='ddim11' cannot respace the 100 steps")
    assert not (tmp_path / "r").exists()


def test_train_batch_size_not_divisible_by_the_devices(tmp_path):
    mesh = distributed.data_mesh()
    message = _refused(errors.ConfigError, distributed.check_batch_divisible, 12, mesh=mesh)
    assert message == (
        "train.batch_size=12 must be a positive multiple of the number of devices (8); try 8"
    )


def test_classifier_scales(ckpts, tmp_path):
    for spec, why in [
        ("1,nan", "contains a non-finite value (nan)"),
        ("inf", "contains a non-finite value"),
        ("abc", "is not a number or a comma-separated list of numbers"),
        ([1, "x"], "is not a number or a comma-separated list of numbers"),
        ("0,2,2.0", "repeats a scale (2)"),
        (" , ", "names no scale"),
        (True, "is not a number"),
    ]:
        message = _refused(errors.ConfigError, labels_lib.parse_scales, spec)
        assert message.startswith(f"sample.classifier_scale={spec!r}") and why in message
    # Negative scales push samples away from their label: allowed, each its own folder.
    assert labels_lib.parse_scales("-1,0,-0.5") == [-1.0, 0.0, -0.5]
    assert labels_lib.parse_scales("-0") == [0.0]  # the scale 0 (scale_0), not scale_-0
    message = _refused(
        errors.ConfigError,
        sample_run.run,
        _config(ckpts, tmp_path / "a", classifier_scale="0,nan"),
        str(tmp_path),
    )
    assert "non-finite" in message


def test_labels_out_of_range_and_labels_nothing_reads(ckpts, tmp_path, caplog):
    for spec, bad in [("3,12", "[12]"), ("-1", "[-1]")]:
        message = _refused(
            errors.ConfigError,
            sample_run.run,
            _config(ckpts, tmp_path / "a", labels=spec),
            str(tmp_path),
        )
        assert f"sample.labels={spec!r}: label(s) {bad} outside the model's classes 0..9" in message

    # An unconditional, unguided model reads no labels: they are ignored, with a warning.
    config = _config(ckpts, tmp_path / "b", labels="3")
    config.model.class_cond = False
    with caplog.at_level(logging.WARNING):
        plan = plan_lib.make_plan(config, str(tmp_path), ONE_HOST)
    assert plan.labels is None and not plan.by_class
    warned = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert warned == [
        "sample.labels='3' is ignored: the model is unconditional (model.class_cond=False) and "
        "no classifier guides it (every sample.classifier_scale is 0)"
    ]
    caplog.clear()
    config.sample.labels = "random"  # the default: nothing to warn about
    with caplog.at_level(logging.WARNING):
        plan_lib.make_plan(config, str(tmp_path), ONE_HOST)
    assert not [r for r in caplog.records if "is ignored" in r.getMessage()]


def test_an_unknown_ema_rate_names_the_stored_rates(ckpts, tmp_path):
    train = ckpts / "train"
    for rate in ("0.5", "fast"):
        message = _refused(
            errors.ConfigError,
            sample_run.run,
            _config(ckpts, tmp_path / rate, model_checkpoint=str(train), ema_rate=rate),
            str(tmp_path),
        )
        assert message == (
            f"{train / 'checkpoints'} step 4 has EMA rates ['0.999', '0.9999'], not {rate}: set "
            "sample.ema_rate to one of them, or leave it empty for the slowest"
        )
    # Still a KeyError for a library caller looking the copy up.
    with pytest.raises(KeyError):
        locate.load_params(train, ema_rate=0.25)


def test_an_invalid_respacing_is_refused_before_run_json(ckpts, tmp_path):
    out = tmp_path / "out"
    for spec, why in [
        ("ddim11", "cannot create exactly 11 steps from 100 with an integer stride"),
        ("abc", "cannot parse timestep respacing 'abc'"),
        ("200", "cannot divide section of 100 steps into 200"),
        ("0", "keeps none of the 100 steps"),
    ]:
        message = _refused(
            errors.ConfigError,
            sample_run.run,
            _config(ckpts, out, timestep_respacing=spec),
            str(tmp_path),
        )
        assert message.startswith(f"sample.timestep_respacing={spec!r}") and why in message
        assert not (out / manifest_lib.RUN_FILE).exists()
    # The corrected rerun is not refused as another run.
    paths = sample_run.run(_config(ckpts, out), str(tmp_path))
    assert paths[0.0].exists()


# --- Damaged outputs, full disks ------------------------------------------------------------


def test_a_truncated_shard_is_refused_naming_it(ckpts, tmp_path):
    config = _config(ckpts, tmp_path / "out")
    with pytest.raises(Killed):
        sample_run.run(config, str(tmp_path), on_batch_done=_die)
    shard = plan_lib.scale_dir(tmp_path / "out", 0.0) / "shard_0_0.npz"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    message = _refused(errors.InputError, sample_run.run, config, str(tmp_path))
    assert message.startswith(f"cannot read the shard {shard} (")
    assert message.endswith(
        "it is truncated or damaged; delete it and rerun the same command to redraw it"
    )
    shard.unlink()
    done = []
    paths = sample_run.run(config, str(tmp_path), on_batch_done=done.append)
    assert done == [0]  # only the deleted shard's batch was drawn again
    images, labels = sample_files.read_sample_file(paths[0.0])
    assert images.shape == (N, 8, 8, 3) and labels.tolist() == [i % 10 for i in range(N)]


def test_a_full_disk_while_sampling_names_the_shard_and_the_rerun_resumes(
    ckpts, tmp_path, monkeypatch
):
    config = _config(ckpts, tmp_path / "out")
    original = atomic.savez

    def savez(path, **arrays):
        if pathlib.Path(path).name == "shard_0_1.npz":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, **arrays)

    monkeypatch.setattr(atomic, "savez", savez)
    message = _refused(errors.DiskFullError, sample_run.run, config, str(tmp_path))
    shard = plan_lib.scale_dir(tmp_path / "out", 0.0) / "shard_0_1.npz"
    assert message.startswith(
        f"disk full while writing the shard {shard} of the sampling run in {tmp_path / 'out'}: "
        "free space and rerun the same command; it resumes from the 1 of 2 batches on disk"
    )
    assert not workdir_lock.lock_path(tmp_path, "out").exists()
    monkeypatch.undo()
    done = []
    sample_run.run(config, str(tmp_path), on_batch_done=done.append)
    assert done == [1]


def test_a_full_disk_while_taking_a_lock_leaves_no_lock(tmp_path, monkeypatch):
    def dump(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    lock = workdir_lock.lock_path(tmp_path, "samples")
    monkeypatch.setattr(workdir_lock.json, "dump", dump)
    with pytest.raises(errors.DiskFullError) as e:
        with workdir_lock.hold(tmp_path, "samples", what="sampling run"):
            pass
    monkeypatch.undo()
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(
        f"disk full while taking the lock {lock} for the sampling run: free space in {tmp_path} "
        "and rerun; nothing was written"
    )
    assert not lock.exists()  # an empty lock would block every later run
    with workdir_lock.hold(tmp_path, "samples", what="sampling run"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# --- Resume faults --------------------------------------------------------------------------


def test_restart_moves_aside_samples_merged_under_another_run(ckpts, tmp_path):
    out = tmp_path / "out"
    config = _config(ckpts, out)
    merged = sample_run.run(config, str(tmp_path))[0.0]
    before = merged.read_bytes()
    manifest_lib.side_digest_path(merged).unlink()  # as if merged before digests existed
    message = _refused(errors.ConfigMismatchError, sample_run.run, config, str(tmp_path))
    assert "sample.restart=true to move the old samples aside and draw afresh" in message

    config.sample.restart = True
    paths = sample_run.run(config, str(tmp_path))
    (aside,) = tmp_path.glob("out.replaced-*")
    assert (aside / merged.relative_to(out)).read_bytes() == before
    assert not manifest_lib.side_digest_path(aside / merged.relative_to(out)).exists()
    run_id = manifest_lib.run_digest(manifest_lib.read(out))
    manifest_lib.check_side_digest(paths[0.0], run_id)  # drawn afresh, under this run
    assert sample_files.read_sample_file(paths[0.0])[0].shape == (N, 8, 8, 3)
    # Finished and consistent now: a rerun, restart or not, leaves it alone.
    assert sample_run.run(config, str(tmp_path)) == paths
    assert len(list(tmp_path.glob("out.replaced-*"))) == 1


def _rotating(monkeypatch, rotate):
    """Makes the next reads of a training step run `rotate(directory, step)` first, as a live
    trainer's max_to_keep rotation deleting that step while it is read."""
    original = store.CheckpointManager.restore_raw

    def restore_raw(self, step=None):
        rotate(self.directory, step)
        return original(self, step)

    monkeypatch.setattr(store.CheckpointManager, "restore_raw", restore_raw)


def test_the_newest_step_rotated_away_while_read_is_replaced_by_the_new_newest(
    ckpts, tmp_path, monkeypatch, caplog
):
    train = tmp_path / "train"
    shutil.copytree(ckpts / "train", train)

    def rotate(directory, step):  # the trainer saves step 6 and deletes step 4
        if step == 4:
            shutil.copytree(directory / "4", directory / "6")
            shutil.rmtree(directory / "4")

    _rotating(monkeypatch, rotate)
    with caplog.at_level(logging.WARNING):
        params, pin = locate.load_pinned(train)
    assert pin["step"] == 6 and pin["ema_rate"] == "0.9999"
    assert any(
        "step 4 was deleted while it was being read" in r.getMessage() for r in caplog.records
    )


def test_a_step_rotated_away_while_read_is_one_line(ckpts, tmp_path, monkeypatch):
    train = tmp_path / "train"
    shutil.copytree(ckpts / "train", train)

    def rotate(directory, step):
        shutil.rmtree(directory / str(step), ignore_errors=True)

    _rotating(monkeypatch, rotate)
    # A named step folder is not replaced by another step.
    step_dir = train / "checkpoints" / "2"
    message = _refused(
        errors.MissingInputError,
        sample_run.run,
        _config(ckpts, tmp_path / "a", model_checkpoint=str(step_dir)),
        str(tmp_path),
    )
    assert message.startswith(
        f"step 2 of {train / 'checkpoints'} was deleted while it was being read: a live trainer "
        "rotated it away (train.max_to_keep); rerun to read the newest step, or set "
        "sample.model_checkpoint"
    )
    # The newest step is replaced once; losing that one too is reported.
    shutil.copytree(ckpts / "train" / "checkpoints" / "2", train / "checkpoints" / "2")
    message = _refused(
        errors.MissingInputError,
        sample_run.run,
        _config(ckpts, tmp_path / "b", model_checkpoint=str(train)),
        str(tmp_path),
    )
    assert message.startswith(f"step 2 of {train / 'checkpoints'} was deleted while it was being")


# --- The command: one line, exit 1 ----------------------------------------------------------


def _gdiff(*args):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_COMPILATION_CACHE_DIR=CACHE,
        JAX_PLATFORMS="cpu",
    )
    return subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", *args],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "mode,flag,line",
    [
        (
            "sample",
            "--config.sample.timestep_respacing=ddim11",
            "gdiff: sample.timestep_respacing='ddim11' cannot respace the 100 steps",
        ),
        (
            "train",
            "--config.train.batch_size=12",
            "gdiff: train.batch_size=12 must be a positive multiple of the number of devices (8)",
        ),
    ],
)
def test_the_command_reports_in_one_line(ckpts, tmp_path, mode, flag, line):
    result = _gdiff(
        f"--mode={mode}",
        f"--workdir={tmp_path / 'w'}",
        f"--config.sample.model_checkpoint={ckpts / 'model'}",
        flag,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr[-3000:]
