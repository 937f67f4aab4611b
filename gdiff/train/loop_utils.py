"""Training-loop plumbing: metric writers, metric aggregation, SIGTERM handling.

Sample grids are drawn with `gdiff.sampling.grid`.

Only process 0 writes logs and files; every process takes part in the computations (sampling and
checkpointing are collective on a multi-host mesh).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"


class _LoggingWriter:
    """Stand-in for clu's writer when clu cannot be imported (it needs tensorboard)."""

    def __init__(self, active: bool):
        self.active = active

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if self.active:
            text = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
            logging.info("[%d] %s", step, text)

    def write_images(self, step: int, images: dict[str, Any]) -> None:
        del step, images  # the PNG files next to the logs hold the same pictures

    def write_hparams(self, hparams: dict[str, Any]) -> None:
        if self.active:
            logging.info("hparams: %s", hparams)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog:
    """One writer facade: clu's default writer (or plain logging) plus `metrics.jsonl`.

    The JSON-lines file (process 0 only) keeps every logged scalar with its step; it is what tests
    and quick scripts read, without TensorBoard.
    """

    def __init__(self, workdir: str | os.PathLike, *, name: str = METRICS_FILE):
        self.main = jax.process_index() == 0
        self.workdir = pathlib.Path(workdir)
        try:
            from clu import metric_writers

            self.writer = metric_writers.create_default_writer(
                str(workdir), just_logging=not self.main, asynchronous=True
            )
        except ImportError as e:  # clu's summary writer needs tensorboard
            logging.warning("clu metric writers unavailable (%s); logging to absl + JSONL only", e)
            self.writer = _LoggingWriter(self.main)
        self._file = None
        if self.main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.workdir / name, "a")

    def scalars(self, step: int, scalars: dict[str, Any]) -> None:
        clean = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, clean)
        if self._file is not None:
            self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
            self._file.flush()

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        self.writer.write_images(step, images)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        if self._file is not None:
            self._file.close()


def read_metrics(workdir: str | os.PathLike, name: str = METRICS_FILE) -> list[dict]:
    """The rows written by `MetricsLog`, in order."""
    path = pathlib.Path(workdir) / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricAccumulator:
    """Averages per-step metrics over a logging interval.

    Keys "<name>/sum" and "<name>/count" combine into <name> = total sum / total count (per-example
    means such as the loss per timestep quartile, as the reference's `logkv_mean` per example);
    keys in `last` keep the newest value; everything else is a mean over steps.
    """

    def __init__(self, last: tuple[str, ...] = ()):
        self.last = set(last)
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, float] = collections.defaultdict(float)
        self._n: dict[str, int] = collections.defaultdict(int)
        self._last: dict[str, float] = {}

    def add(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            v = float(v)
            if k in self.last:
                self._last[k] = v
            elif k.endswith("/sum") or k.endswith("/count"):
                self._sums[k] += v
            else:
                self._sums[k] += v
                self._n[k] += 1

    def result(self) -> dict[str, float]:
        out = dict(self._last)
        for k, v in self._sums.items():
            if k.endswith("/sum"):
                name = k[: -len("/sum")]
                count = self._sums.get(name + "/count", 0.0)
                if count > 0:
                    out[name] = v / count
            elif not k.endswith("/count"):
                out[k] = v / self._n[k]
        return out


def quartile_sums(name: str, values: jax.Array, t: jax.Array, num_timesteps: int) -> dict:
    """Per-quartile sums and counts of per-example `values` [B] by timestep `t` [B] (jit-able).

    Quartile k holds t with int(4 t / T) == k, as the reference's `log_loss_dict`.
    """
    import jax.numpy as jnp

    q = (4 * t.astype(jnp.int32)) // num_timesteps
    out = {}
    for k in range(4):
        mask = (q == k).astype(jnp.float32)
        out[f"{name}_q{k}/sum"] = jnp.sum(values.astype(jnp.float32) * mask)
        out[f"{name}_q{k}/count"] = jnp.sum(mask)
    return out


class Preemption:
    """Turns SIGTERM (preemption, `kill`) into a flag the loop polls: save, then exit cleanly.

    On several processes the flag is agreed on collectively (every process must take part in the
    final save), at `sync_every` step boundaries.
    """

    def __init__(self, sync_every: int = 1):
        self.requested = False
        self.sync_every = max(int(sync_every), 1)
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            self._previous = None

    def _handle(self, signum, frame) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint, then stopping")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % self.sync_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class StepTimer:
    """Steps per second between log points (the part of clu's ReportProgress gdiff needs)."""

    def __init__(self, step: int):
        self._step, self._time = step, time.perf_counter()

    def rate(self, step: int) -> float:
        now = time.perf_counter()
        steps = step - self._step
        out = steps / max(now - self._time, 1e-9)
        self._step, self._time = step, now
        return out
