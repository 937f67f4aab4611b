"""Two processes on localhost (2 CPU devices each) train together, each reading its own shard."""

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

from configs import tiny
from gdiff.data import digits, pipeline
from gdiff.train import diffusion_trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
# The persistent compilation cache tests/conftest.py enables; subprocesses share it.
CACHE = os.path.join(tempfile.gettempdir(), "gdiff_test_jax_cache")

WORKER = r"""
import json, sys
sys.path.insert(0, {repo!r})
import jax
jax.distributed.initialize(coordinator_address={addr!r}, num_processes=2, process_id={pid})
from configs import tiny
from gdiff.data import pipeline
from gdiff.train import diffusion_trainer

seen = []
original = pipeline.to_global
def to_global(batch, mesh):
    seen.append(batch["id"].tolist())
    return original(batch, mesh)
pipeline.to_global = to_global

config = tiny.get_config()
config.train.num_steps = 4
config.train.batch_size = 8
config.train.log_every = 1
config.train.save_every = 2
config.train.sample_every = 4  # the preview grid gathers both processes' rows
result = diffusion_trainer.train(config, {workdir!r})
print("RESULT", json.dumps({{"process": jax.process_index(), "devices": jax.device_count(),
      "local": jax.local_device_count(), "ids": seen,
      "losses": [h["loss"] for h in result["history"]]}}))
"""


# The fsdp run's training settings, the same in the two-process workers and the one-process resume.
FSDP_TRAIN = {
    "num_steps": 4,
    "log_every": 1,
    "progress": False,
    "state_sharding": "fsdp",
    "fsdp_min_elements": 0,
}
# Two processes train 2 steps with the state split over their 4 devices (each process holds
# only its half of every split array) and save; process 0 writes the whole state gathered.
FSDP_WORKER = r"""
import sys
sys.path.insert(0, {repo!r})
import jax
import numpy as np
jax.distributed.initialize(coordinator_address={addr!r}, num_processes=2, process_id={pid})
from configs import tiny
from gdiff import distributed
from gdiff.train import diffusion_trainer

config = tiny.get_config()
config.train.update({train!r})
state = diffusion_trainer.train(config, {workdir!r}, stop_at_step=2)["state"]
assert not state.params["out_2"]["kernel"].sharding.is_fully_replicated
leaves = distributed.to_host(jax.tree.leaves(state))  # a collective: both processes call it
if jax.process_index() == 0:
    np.savez({workdir!r} + "/state.npz", *leaves)
print("RESULT done")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(env, addr, workdir, worker=WORKER, **fields):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                worker.format(repo=str(REPO), addr=addr, pid=pid, workdir=str(workdir), **fields),
            ],
            env=env,
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=400)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outs


def test_two_processes_train_checkpoint_and_read_disjoint_shards(tmp_path):
    addr = f"localhost:{_free_port()}"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COMPILATION_CACHE_DIR=CACHE,
    )
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    # Two coordinated processes on a loaded 2-core machine can miss the coordinator's start-up
    # window; a genuine failure fails both attempts, and the first attempt's output is printed.
    for attempt in range(2):
        workdir = tmp_path / f"attempt{attempt}"
        procs, outs = _launch(env, addr if attempt == 0 else f"localhost:{_free_port()}", workdir)
        if all(p.returncode == 0 for p in procs):
            break
        print("attempt", attempt, "failed:\n", "\n".join(o[-3000:] for o in outs))
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    results = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outs]
    results.sort(key=lambda r: r["process"])
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["devices"] == 4 and r["local"] == 2 for r in results)
    # Each process fed half of every global batch of 8, from its own shard of the examples.
    ids = [[i for batch in r["ids"] for i in batch] for r in results]
    assert all(len(r["ids"]) == 4 and all(len(b) == 4 for b in r["ids"]) for r in results)
    assert not set(ids[0]) & set(ids[1])
    # Process p fed rows 4p..4p+3 of every global batch: together, one process's global batches.
    n = digits.DigitsSource("train", 8).num_examples
    for step in range(4):
        whole = pipeline.batch_indices(n, step=step, local_batch=8, seed=tiny.get_config().seed,
                                       process_index=0, process_count=1)  # fmt: skip
        assert results[0]["ids"][step] + results[1]["ids"][step] == whole.tolist()
    # Both processes computed the same (global) losses; only process 0 wrote the log.
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], rel=1e-6)
    rows = (workdir / "metrics_diffusion.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    assert (workdir / "samples_train" / "step_0000004.png").exists()


def test_an_fsdp_run_of_two_processes_resumes_on_one(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COMPILATION_CACHE_DIR=CACHE,
    )
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    for attempt in range(2):  # as above: a missed coordinator start-up gets a second try
        workdir = tmp_path / f"attempt{attempt}"
        procs, outs = _launch(
            env, f"localhost:{_free_port()}", workdir, FSDP_WORKER, train=FSDP_TRAIN
        )
        if all(p.returncode == 0 for p in procs):
            break
        print("attempt", attempt, "failed:\n", "\n".join(o[-3000:] for o in outs))
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    saved = np.load(workdir / "state.npz")
    config = tiny.get_config()
    config.train.update(FSDP_TRAIN)
    # This one process (8 devices) reads the two processes' halves back bit for bit ...
    restored = diffusion_trainer.train(config, str(workdir), stop_at_step=2)
    leaves = jax.tree.leaves(restored["state"])
    assert restored["start_step"] == 2 and len(leaves) == len(saved.files)
    assert not restored["state"].params["out_2"]["kernel"].sharding.is_fully_replicated
    for i, leaf in enumerate(leaves):
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])
    # ... and trains on from them.
    resumed = diffusion_trainer.train(config, str(workdir))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert all(np.isfinite(h["loss"]) for h in resumed["history"])
