"""Issue 23, the input side: a user's bad input ends in one line, exit status 1, no traceback.

Each command runs as a user runs it (`python main.py ...` in a subprocess) and fails on its inputs
before anything slow (Inception weights, a network) is built. Evaluate's outputs replace a
symlink planted at their name instead of writing through it, and a damaged reference-activation
cache is rebuilt with a warning.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gdiff.evaluation import evaluator

REPO = pathlib.Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _run(*args, timeout=120):
    return subprocess.run(
        [sys.executable, *args],
        env=_env(),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _gdiff(*args):
    return _run("main.py", "--config", "configs/tiny.py", *args)


def _one_line(proc, *names) -> str:
    """The one `gdiff: ...` line a failed command ends in; it names each of `names`."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gdiff: "), last
    for name in names:
        assert str(name) in last, (name, last)
    return last


def _images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


# --- --mode=evaluate: batch files -----------------------------------------------------------


def _write_case(tmp_path, case):
    """(ref path, sample path, weights path, what the line names) for one malformed input."""
    ref, sample = tmp_path / "ref.npz", tmp_path / "samples.npz"
    np.savez(ref, arr_0=_images())
    weights = tmp_path / "missing_weights.pb"
    good = _images(seed=1)
    if case == "missing_ref":
        return tmp_path / "nowhere_ref.npz", ref, weights, ["nowhere_ref.npz", "does not exist"]
    if case == "missing_sample":
        return ref, tmp_path / "nowhere.npz", weights, ["nowhere.npz", "does not exist"]
    if case == "directory":
        (tmp_path / "adir.npz").mkdir()
        return ref, tmp_path / "adir.npz", weights, ["adir.npz", "is a directory"]
    if case == "no_arr_0":
        np.savez(sample, images=good)
    elif case == "float":
        np.savez(sample, arr_0=good.astype(np.float32) / 127.5 - 1)
    elif case == "nchw":
        np.savez(sample, arr_0=good.transpose(0, 3, 1, 2).copy())
    elif case == "zero_images":
        np.savez(sample, arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    elif case == "not_npz":
        sample.write_text("these are not images\n")
    elif case == "truncated_npz":
        np.savez(sample, arr_0=_images(64, seed=2))
        sample.write_bytes(sample.read_bytes()[:2000])
    elif case == "missing_weights":
        np.savez(sample, arr_0=good)
        return ref, sample, weights, ["missing_weights.pb", "config.eval.inception_weights"]
    message = {
        "no_arr_0": "has no arr_0",
        "float": "must be uint8",
        "nchw": "looks NCHW",
        "zero_images": "need at least 2 images",
        "not_npz": "is not an .npz file",
        "truncated_npz": "samples.npz",
    }[case]
    return ref, sample, weights, [sample, message]


EVALUATE_CASES = [
    "missing_ref",
    "missing_sample",
    "directory",
    "no_arr_0",
    "float",
    "nchw",
    "zero_images",
    "not_npz",
    "truncated_npz",
    "missing_weights",
]


@pytest.mark.parametrize("case", EVALUATE_CASES)
def test_evaluate_bad_input_ends_in_one_line(tmp_path, case):
    ref, sample, weights, names = _write_case(tmp_path, case)
    proc = _gdiff(
        f"--workdir={tmp_path / 'w'}",
        "--mode=evaluate",
        f"--config.eval.ref_batch={ref}",
        f"--config.eval.sample_batch={sample}",
        f"--config.eval.inception_weights={weights}",
    )
    _one_line(proc, *names)


def test_the_evaluator_module_command_ends_in_one_line(tmp_path):
    ref, sample, weights, names = _write_case(tmp_path, "nchw")
    proc = _run(
        "-m", "gdiff.evaluation.evaluator", str(ref), str(sample), "--weights", str(weights)
    )
    _one_line(proc, *names)


# --- --mode=evaluate: what it writes ----------------------------------------------------------


class _PixelFeatures:
    """A cheap deterministic stand-in for the Inception network."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        logits = x[:, :6] * 4.0
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        return {"pool": x[:, :12], "spatial": x[:, 12:20], "probs": probs}


def _batches(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    np.savez(out / "ref.npz", arr_0=_images(40, seed=3))
    np.savez(out / "samples.npz", arr_0=_images(40, seed=4))
    weights = tmp_path / "weights.npz"
    weights.write_bytes(b"stand-in weights: only hashed for the cache key")
    return out, weights


def test_evaluate_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    out, weights = _batches(tmp_path)
    victim = tmp_path / "elsewhere" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("not yours\n")
    link = out / "samples_metrics.json"
    link.symlink_to(victim)
    got = evaluator.evaluate_files(
        out / "ref.npz", out / "samples.npz", weights, extractor=_PixelFeatures(), is_split_size=8
    )
    assert victim.read_text() == "not yours\n"
    assert link.is_file() and not link.is_symlink()
    assert {k: json.loads(link.read_text())[k] for k in evaluator.METRIC_NAMES} == got


def test_a_truncated_reference_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    out, weights = _batches(tmp_path)

    def evaluate(extractor):
        return evaluator.evaluate_files(
            out / "ref.npz", out / "samples.npz", weights, extractor=extractor, is_split_size=8
        )

    first = evaluate(_PixelFeatures())
    (cache,) = out.glob("ref.gdiff_acts_*.npz")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    ext = _PixelFeatures()
    assert evaluate(ext) == first
    assert ext.calls == 2  # the reference activations were computed again
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(cache) in warnings[0], warnings
    # The rebuilt cache is whole again: the next run reads it.
    ext = _PixelFeatures()
    assert evaluate(ext) == first and ext.calls == 1
    assert sorted(p.name for p in out.iterdir() if ".tmp-" in p.name) == []


# --- --mode=convert -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "directory", "not_torch"])
def test_convert_bad_checkpoint_path_ends_in_one_line(tmp_path, case):
    path = tmp_path / "model.pt"
    if case == "directory":
        path.mkdir()
        message = "is a directory"
    elif case == "not_torch":
        path.write_text("# a text file, not a checkpoint\n")
        message = "not a torch checkpoint"
    else:
        message = "does not exist"
    proc = _gdiff(
        f"--workdir={tmp_path / 'w'}", "--mode=convert", f"--config.torch_checkpoint={path}"
    )
    _one_line(proc, path, message)


# --- --config files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ("CONFIG = {'seed': 0}\n", "defines no get_config()"),
        ("def get_config():\n    return {'seed': 0}\n", "returned a value of type dict"),
    ],
    ids=["no_get_config", "returns_a_dict"],
)
def test_a_config_file_that_is_not_a_config_ends_in_one_line(tmp_path, body, message):
    path = tmp_path / "my_config.py"
    path.write_text(body)
    proc = _run("main.py", "--config", str(path), f"--workdir={tmp_path / 'w'}", "--mode=evaluate")
    _one_line(proc, path, message)


# --- The machine: a read-only directory, a full disk ------------------------------------------

# The mode raises what a failed write raises; a read-only directory cannot be made for root (who
# runs the tests in CI), and a full disk cannot be made at all, so the mode is replaced.
_RAISING_MODE = """
import errno, sys
from gdiff import cli
def mode(config, workdir):
    raise {error}
cli.MODES["evaluate"] = mode
cli.main(["main.py", "--config", "configs/tiny.py", "--workdir", {workdir!r}, "--mode=evaluate"])
"""


@pytest.mark.parametrize("kind", ["read_only", "disk_full"])
def test_a_read_only_directory_or_a_full_disk_ends_in_one_line(tmp_path, kind):
    workdir = tmp_path / "w"
    target = workdir / "checkpoints" / ".run.json.tmp-0123456789abcdef0123456789abcdef"
    if kind == "read_only":
        error = f"PermissionError(errno.EACCES, 'Permission denied', {str(target)!r})"
        names = [workdir / "checkpoints" / "run.json", "read-only", workdir / "checkpoints"]
    else:
        inner = f"OSError(errno.ENOSPC, 'No space left on device', {str(target)!r})"
        # What orbax does: its own exception, raised from the OSError.
        error = f"RuntimeError('write failed') from {inner}"
        names = [workdir / "checkpoints" / "run.json", "no space left on device"]
    proc = _run("-c", _RAISING_MODE.format(error=error, workdir=str(workdir)))
    _one_line(proc, *names)
    if kind == "disk_full":  # any other error is a bug: it keeps its traceback
        proc = _run("-c", _RAISING_MODE.format(error="RuntimeError('a bug')", workdir=str(workdir)))
        assert proc.returncode == 1 and "RuntimeError: a bug" in proc.stderr.splitlines()[-1]
        assert "Traceback" in proc.stderr
