"""Issue 26: a multi-host run starts anywhere; multi-host sampling equals one host's, exactly.

Start anywhere: `gdiff.distributed` resolves `jax.distributed.initialize`'s arguments from the
config keys and JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (pure functions,
tested directly), and a launch that lacks the count or id ends in one line naming them.

Proven equal: the command line itself (`main.py`, one subprocess per process, localhost
coordinator, each process given only the three variables) runs `--mode=sample` (classifier-guided,
scales 0 and 2), `--mode=sweep` and `--mode=nll` on 2 processes x 4 CPU devices and on 1 process x
8 devices, and once stopped after the first of three batches and resumed under the other process
count. Every merged output holds the same arrays (values and dtypes) as the one-process run's. The
`.npz` files are compared array by array, not as bytes: a zip member records its write time.

A stop is a kill: a wrapper runs `main.py` with the run engine's `on_batch_done` hook (the one the
in-process resume tests use) ending every process with `os._exit` once all have written the
batch's shards (no merge, no cleanup, the lock left to a dead pid). The sweep's FID Inception
needs weights these tests do not have; the same wrapper gives `evaluator.build_extractor` a small
random feature network (as tests/test_sweep.py does in-process), so the scored table is compared
too. All runs share the compilation cache of tests/conftest.py and tests/test_multiprocess.py.

The wrapper also leaves XLA:CPU's convolutions at its default (YNNPACK), as every other backend
runs them (gdiff/xla_options.py gives options to CPU programs only). XLA's own convolution kernels,
which gdiff's CPU option selects for speed, split their work over XLA:CPU's intra-op threads, and
their last bits follow the number of fake devices in a process once it exceeds the cores (measured
on 2 cores: the tiny UNet's outputs on 1 and 2 devices per process agree, on 2, 4 and 8 they differ
pairwise by up to 1e-6; bits/dim of 2 x 4 against 1 x 8 by up to 7e-7 relative, and so do those of
1 x 4). That is the machine's threads, not the process count: with YNNPACK all of them agree
exactly.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from conftest import perturbed

from configs import tiny
from gdiff import distributed, errors, factory
from gdiff.checkpoints import store

REPO = pathlib.Path(__file__).resolve().parents[1]
# The persistent compilation cache tests/conftest.py enables; subprocesses share it.
CACHE = os.environ.get(
    "GDIFF_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "gdiff_test_jax_cache")
)
N = 20  # three global batches of 8 (one example per device), the last one trimmed to 4
KILLED = 75  # the exit status of a process the wrapper stops
# What a plain multi-host launch sets in every process (README, "Running on many hosts").
LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

# main.py with XLA's own CPU convolutions (see the module docstring), optionally stopped after a
# batch and with a stand-in feature network for the sweep.
WRAPPER = r"""
import os, runpy, sys
from gdiff import xla_options
xla_options.CPU_OPTIONS = {{}}
STOP_AFTER, STAND_IN = {stop_after!r}, {stand_in!r}
if STOP_AFTER is not None:
    from gdiff import distributed
    from gdiff.engine import runs
    engine_run = runs.run
    def run(job, *, on_batch_done=None):
        def stop(batch):
            if batch == STOP_AFTER:
                # Every process has written its shards of the batch: all end as if killed.
                distributed.barrier("test_stop")
                os._exit({killed})
        return engine_run(job, on_batch_done=stop)
    runs.run = run
if STAND_IN:
    import jax, numpy as np
    from gdiff.evaluation import ClassifierExtractor, SmallClassifier, evaluator
    def build_extractor(weights_path, *, batch_size=64, resize="legacy"):
        small = SmallClassifier(num_classes=10, width=8)
        variables = small.init(jax.random.key(2), np.zeros((1, 8, 8, 3), np.float32))
        return ClassifierExtractor(small, variables, batch_size=8)
    evaluator.build_extractor = build_extractor
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""


# --- Start anywhere: the arguments of jax.distributed.initialize --------------------------------


def test_initialize_kwargs_from_the_environment_and_the_config():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4"}
    env["JAX_PROCESS_ID"] = " 3 "
    assert distributed.initialize_kwargs(env) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
    }
    # A config key wins over its variable; unset keys ("" / -1) leave the variable in charge.
    got = distributed.initialize_kwargs(env, coordinator_address="head:99", process_id=0)
    assert got == {"coordinator_address": "head:99", "num_processes": 4, "process_id": 0}
    # What neither gives is left to JAX's own cluster detection (SLURM, Cloud TPU).
    assert distributed.initialize_kwargs({}) == {}
    assert distributed.initialize_kwargs({"JAX_NUM_PROCESSES": ""}) == {}
    for given, key, message in [
        ({"JAX_NUM_PROCESSES": "two"}, {}, "JAX_NUM_PROCESSES='two' is not an integer"),
        ({"JAX_NUM_PROCESSES": "0"}, {}, "JAX_NUM_PROCESSES='0': the process count must be >= 1"),
        (env, {"process_id": 4}, "config.process_id=4: the process id must be in 0..3"),
        ({"JAX_PROCESS_ID": "-2"}, {}, "JAX_PROCESS_ID='-2': the process id must be >= 0"),
    ]:
        with pytest.raises(errors.ConfigError) as e:
            distributed.initialize_kwargs(given, **key)
        assert str(e.value) == message


def test_when_to_initialize():
    wants = distributed.wants_initialize
    address = {"coordinator_address": "h:1"}
    assert wants("auto", {}, address)  # JAX_COORDINATOR_ADDRESS or config.coordinator_address
    assert wants("auto", {}, {"num_processes": 2})
    assert wants("auto", {"SLURM_JOB_ID": "7"}, {}) and wants("auto", {"TPU_NAME": "t"}, {})
    assert not wants("auto", {}, {}) and not wants("auto", {}, {"num_processes": 1})
    assert wants(True, {}, {}) and wants("true", {}, {}) and not wants("false", {}, address)
    with pytest.raises(errors.ConfigError, match="config.distributed must be auto, true or false"):
        wants("yes", {}, {})


def test_a_missing_count_or_id_is_one_line_naming_it(monkeypatch):
    calls = []

    def initialize(**kwargs):
        calls.append(kwargs)
        if "num_processes" not in kwargs or "process_id" not in kwargs:
            raise ValueError("Number of processes must be defined.")  # JAX detected no cluster

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    env = {"JAX_COORDINATOR_ADDRESS": "localhost:1234"}
    with pytest.raises(errors.ConfigError) as e:
        distributed.maybe_initialize("auto", env=env)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        "a multi-host run needs JAX_NUM_PROCESSES and JAX_PROCESS_ID, and JAX found no cluster"
    )
    assert "(or --config.num_processes / --config.process_id)" in message
    # Given all three (here the id by its config key), JAX is called with them.
    env["JAX_NUM_PROCESSES"] = "2"
    assert distributed.maybe_initialize("auto", process_id=1, env=env)
    assert calls[-1] == {
        "coordinator_address": "localhost:1234",
        "num_processes": 2,
        "process_id": 1,
    }
    assert not distributed.maybe_initialize("auto", env={})  # nothing says "several processes"
    assert len(calls) == 2


def test_the_command_names_the_missing_variables(tmp_path):
    """Only JAX_COORDINATOR_ADDRESS set, as a new user would try it: one line, exit status 1."""
    env = _env(1)
    env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{_free_port()}"
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/tiny.py", "--mode=sample"],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gdiff: a multi-host run needs JAX_NUM_PROCESSES and JAX_PROCESS_ID")


# --- Multi-host runs of the command line ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=CACHE,
    )
    for name in (*LAUNCH_ENV, "SLURM_JOB_ID", "TPU_NAME"):
        env.pop(name, None)
    return env


def _launch(processes: int, args, *, stop_after=None, stand_in=False) -> list[tuple[int, str]]:
    """`main.py args` as `processes` processes x 8 / processes CPU devices, each given only the
    three launch variables; [(exit status, output)] per process."""
    code = WRAPPER.format(stop_after=stop_after, stand_in=stand_in, killed=KILLED)
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = _env(8 // processes)
        if processes > 1:
            values = (f"localhost:{port}", str(processes), str(pid))
            env.update(zip(LAUNCH_ENV, values, strict=True))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *args],
                env=env,
                cwd=str(REPO),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
        return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _gdiff(processes: int, *args, stop_after=None, stand_in=False) -> None:
    """Runs the command (see `_launch`) and checks how it ended: done, or stopped as asked."""
    want = 0 if stop_after is None else KILLED
    results = _launch(processes, args, stop_after=stop_after, stand_in=stand_in)
    if processes > 1 and any(code != want for code, _ in results):
        # Two coordinated processes on a loaded 2-core machine can miss the coordinator's
        # start-up window; a genuine failure fails again (a rerun resumes from the shards).
        print("first attempt:\n", "\n".join(out[-3000:] for _, out in results))
        results = _launch(processes, args, stop_after=stop_after, stand_in=stand_in)
    for code, out in results:
        assert code == want, out[-4000:]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny model and classifier as parameter checkpoints (what --mode=convert leaves),
    perturbed so that the outputs depend on the inputs and guidance visibly acts; plus a small
    reference batch for the sweep."""
    root = tmp_path_factory.mktemp("multihost")
    config = tiny.get_config()
    model = perturbed(factory.init_variables(factory.build_model(config), jax.random.key(0)))
    cls = factory.init_variables(factory.build_classifier(config), jax.random.key(1))
    store.save_params(root / "model", model["params"], metadata={"kind": "model"})
    store.save_params(root / "cls", perturbed(cls, seed=1, scale=0.2)["params"])
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "ref.npz", arr_0=images)
    return root


def _sample_args(ckpts, workdir, mode="sample") -> list[str]:
    return [
        "--config=configs/tiny.py",
        f"--mode={mode}",
        f"--workdir={workdir}",
        f"--config.sample.num_samples={N}",
        "--config.sample.batch_size=1",
        "--config.sample.timestep_respacing=3",
        "--config.sample.classifier_scale=0,2",
        f"--config.sample.model_checkpoint={ckpts / 'model'}",
        f"--config.sample.classifier_checkpoint={ckpts / 'cls'}",
    ]


@pytest.fixture(scope="module")
def one_host(ckpts, tmp_path_factory):
    """`--mode=sample` on 1 process x 8 devices: the samples every multi-host run must equal."""
    workdir = tmp_path_factory.mktemp("one_host")
    _gdiff(1, *_sample_args(ckpts, workdir))
    return workdir / "samples"


def _arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _assert_same_npz(got, want) -> None:
    """The same arrays (names, dtypes, values) in two .npz files."""
    a, b = _arrays(got), _arrays(want)
    assert sorted(a) == sorted(b), (got, sorted(a), sorted(b))
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (got, k)
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{got}: {k}")


def _assert_same_samples(out, want) -> None:
    for scale in ("scale_0", "scale_2"):
        name = f"{scale}/samples_{N}x8x8x3.npz"
        _assert_same_npz(out / name, want / name)


def _shards(part) -> list[str]:
    return sorted(p.name for p in pathlib.Path(part).glob("shard_*.npz"))


def test_sample_two_hosts_equal_one_and_resume_on_one(ckpts, one_host, tmp_path):
    images = _arrays(one_host / "scale_2" / f"samples_{N}x8x8x3.npz")["arr_0"]
    unguided = _arrays(one_host / "scale_0" / f"samples_{N}x8x8x3.npz")["arr_0"]
    assert np.abs(images.astype(int) - unguided).mean() > 0.5  # guidance acts

    _gdiff(2, *_sample_args(ckpts, tmp_path / "two"))
    out = tmp_path / "two" / "samples"
    _assert_same_samples(out, one_host)
    # Drawn by two processes: each wrote its own shard of every batch.
    assert _shards(out / "scale_2") == [f"shard_{p}of2_{b}.npz" for p in (0, 1) for b in range(3)]

    # Two processes stopped after the first of three batches, resumed by one with 8 devices.
    args = _sample_args(ckpts, tmp_path / "resumed")
    _gdiff(2, *args, stop_after=0)
    out = tmp_path / "resumed" / "samples"
    assert _shards(out / "scale_2") == ["shard_0of2_0.npz", "shard_1of2_0.npz"]
    assert not list(out.glob("scale_*/samples_*.npz"))
    _gdiff(1, *args)
    # Batch 0 kept from the two processes, batches 1 and 2 drawn by the one.
    assert _shards(out / "scale_2") == [
        "shard_0_1.npz",
        "shard_0_2.npz",
        "shard_0of2_0.npz",
        "shard_1of2_0.npz",
    ]
    _assert_same_samples(out, one_host)


def test_sweep_two_hosts_equal_one_and_resume_on_one(ckpts, one_host, tmp_path):
    """The sweep's samples equal `--mode=sample`'s on one host (same model, noise and labels);
    its table, scored on process 0, equals that of the sweep resumed and scored on one host."""
    args = [
        *_sample_args(ckpts, tmp_path / "two", "sweep"),
        f"--config.eval.ref_batch={ckpts}/ref.npz",
    ]
    _gdiff(2, *args, stand_in=True)
    _assert_same_samples(tmp_path / "two" / "samples", one_host)

    args = [*_sample_args(ckpts, tmp_path / "resumed", "sweep"), *args[-1:]]
    _gdiff(2, *args, stop_after=0, stand_in=True)
    assert not (tmp_path / "resumed" / "scale_sweep.csv").exists()
    _gdiff(1, *args, stand_in=True)
    assert "shard_0of2_0.npz" in _shards(tmp_path / "resumed" / "samples" / "scale_0")
    _assert_same_samples(tmp_path / "resumed" / "samples", one_host)
    table = (tmp_path / "two" / "scale_sweep.csv").read_text()
    assert table == (tmp_path / "resumed" / "scale_sweep.csv").read_text()
    assert len(table.splitlines()) == 3  # a header and a row per scale


def _nll_args(ckpts, workdir) -> list[str]:
    return [
        "--config=configs/tiny.py",
        "--mode=nll",
        f"--workdir={workdir}",
        f"--config.eval.nll_num_samples={N}",
        "--config.eval.nll_batch_size=1",
        "--config.diffusion.timestep_respacing=4",
        f"--config.sample.model_checkpoint={ckpts / 'model'}",
    ]


NLL_FILES = ("per_image.npz", "vb_terms.npz", "mse_terms.npz", "xstart_mse_terms.npz")


def _assert_same_nll(out, want) -> None:
    for name in NLL_FILES:
        _assert_same_npz(out / name, want / name)
    assert json.loads((out / "summary.json").read_text()) == json.loads(
        (want / "summary.json").read_text()
    )


def test_nll_two_hosts_equal_one_and_resume_on_two(ckpts, tmp_path):
    _gdiff(1, *_nll_args(ckpts, tmp_path / "one"))
    want = tmp_path / "one" / "nll"
    per_image = _arrays(want / "per_image.npz")
    np.testing.assert_array_equal(per_image["id"], np.arange(N))  # held-out digits 0..N-1
    assert per_image["vb"].shape == (N, 4)

    _gdiff(2, *_nll_args(ckpts, tmp_path / "two"))
    _assert_same_nll(tmp_path / "two" / "nll", want)

    # Stopped on one host after the first of three batches, resumed on two.
    args = _nll_args(ckpts, tmp_path / "resumed")
    _gdiff(1, *args, stop_after=0)
    out = tmp_path / "resumed" / "nll"
    assert _shards(out / "shards") == ["shard_0_0.npz"]
    _gdiff(2, *args)
    assert _shards(out / "shards") == [
        "shard_0_0.npz",
        "shard_0of2_1.npz",
        "shard_0of2_2.npz",
        "shard_1of2_1.npz",
        "shard_1of2_2.npz",
    ]
    _assert_same_nll(out, want)
