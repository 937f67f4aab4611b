"""Training logs: metric writers, per-interval aggregation, and the loop's per-step metrics.

`TrainMetrics` is what the loop hands each step's metrics to; `MetricsLog` writes rows (clu's
writer and `metrics_<task>.jsonl`), `MetricAccumulator` averages them over a logging interval.
Sample grids are drawn with `gdiff.sampling.grid`.

Only process 0 writes logs and files; every process takes part in the computations (sampling and
checkpointing are collective on a multi-host mesh).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gdiff import atomic, distributed

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """One writer facade: clu's default writer (TensorBoard + logging) plus `metrics.jsonl`.

    The JSON-lines file (process 0 only) keeps every logged scalar with its step; it is what tests
    and quick scripts read, without TensorBoard.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        name: str = METRICS_FILE,
        resume_step: int | None = None,
    ):
        """`resume_step`: a run resuming from that checkpoint step first drops the rows logged
        after it (a killed run logged them, and the resumed run logs those steps again)."""
        self.main = jax.process_index() == 0
        self.workdir = pathlib.Path(workdir)
        # Imported here, not at the top: clu's summary writer imports TensorFlow (seconds of
        # start-up), which only a run that writes logs needs.
        from clu import metric_writers

        self.writer = metric_writers.create_default_writer(
            str(workdir), just_logging=not self.main, asynchronous=True
        )
        self._file = None
        if self.main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                _drop_rows_after(self.workdir / name, resume_step)
            self._file = open(self.workdir / name, "a")

    def scalars(self, step: int, scalars: dict[str, Any]) -> None:
        clean = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, clean)
        if self._file is not None:
            self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
            self._file.flush()

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        self.writer.write_images(step, images)

    def hparams(self, config: dict[str, Any]) -> None:
        """The run's configuration as TensorBoard hparams: a flat {"group.key": value} dict."""
        self.writer.write_hparams(flat_hparams(config))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        if self._file is not None:
            self._file.close()


def _drop_rows_after(path: pathlib.Path, step: int) -> None:
    """Rewrites a metrics file without its rows past `step` (atomically; no-op when none)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(keep) == len([line for line in lines if line.strip()]):
        return
    logging.warning("%s: dropping %d row(s) past step %d", path, len(lines) - len(keep), step)
    atomic.write_text(path, "".join(line + "\n" for line in keep))


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict -> {"group.key": bool | int | float | str} (what hparams accept)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


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
    q = (4 * t.astype(jnp.int32)) // num_timesteps
    out = {}
    for k in range(4):
        mask = (q == k).astype(jnp.float32)
        out[f"{name}_q{k}/sum"] = jnp.sum(values.astype(jnp.float32) * mask)
        out[f"{name}_q{k}/count"] = jnp.sum(mask)
    return out


class _RowScalars:
    """Where clu's ReportProgress writes (steps_per_sec, uptime): into the next metrics row."""

    def __init__(self):
        self.pending: dict[str, float] = {}

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        del step  # the row written at this step takes them
        self.pending.update({k: float(v) for k, v in scalars.items()})


class TrainMetrics:
    """The training loop's per-step metrics: kept on the device, read once per row, checked,
    averaged, written.

    Every read makes the host wait for the device and costs one device-to-host transfer, so
    `record` only keeps each step's (device) metrics; a log row (every `log_every` steps and the
    last step) and `flush` read all the steps kept since the last read in ONE transfer. Each step
    read appends to `history`, warns about a skipped non-finite step, and raises
    FloatingPointError at the first step whose streak of consecutive non-finite steps reached
    `max_nonfinite`. Both are therefore noticed at the next row, not at the step itself: the
    error still names that step; the steps run between it and the row are ordinary steps (a
    non-finite one changes no parameters), and none inside a streak is checkpointed (the loop
    reads the state's own streak before each save).

    Args:
      workdir: where `metrics_<name>.jsonl` (and clu's logs) go.
      name: the task ("diffusion" or "classifier"): log prefix and file name.
      batch_size: the global batch (for the `examples` column).
      start_step: the step this invocation starts from.
      num_steps: the run's last step (for the progress report's ETA).
      log_every: write a row every this many steps (and at the last one).
      max_nonfinite: consecutive non-finite steps that stop the run.
      last_keys: metric keys logged as their newest value rather than an interval mean.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        name: str,
        *,
        batch_size: int,
        start_step: int,
        num_steps: int,
        log_every: int,
        max_nonfinite: int,
        last_keys: tuple[str, ...],
    ):
        self.name = name
        self.log = MetricsLog(workdir, name=f"metrics_{name}.jsonl", resume_step=start_step)
        self.history: list[dict] = []
        self._acc = MetricAccumulator(last=last_keys)
        # clu's ReportProgress logs steps/s and the ETA at every row (and the last step); its
        # steps_per_sec joins the row's scalars. Imported here for the reason MetricsLog gives.
        from clu import periodic_actions

        self._rates = _RowScalars()
        self._report = periodic_actions.ReportProgress(
            num_train_steps=num_steps,
            writer=self._rates,
            every_steps=max(int(log_every), 1),
            every_secs=None,
            on_steps=[num_steps],
        )
        self._batch_size = batch_size
        self._log_every = max(int(log_every), 1)
        self._max_nonfinite = max_nonfinite
        self._pending: list[tuple[int, dict]] = []  # (step, device metrics) not read yet

    def record(self, step: int, metrics: dict, last_step: int) -> None:
        """Keeps the (device) metrics after `step` steps; reads them all and writes a row when
        one is due."""
        self._pending.append((step, metrics))
        self._report(step)
        if step % self._log_every == 0 or step == last_step:
            self.flush()
            self._write_row(step)

    def flush(self) -> None:
        """Reads every step kept since the last read, in one device-to-host transfer."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = distributed.host_copy([metrics for _, metrics in pending])
        for (step, _), m in zip(pending, values, strict=True):
            self._read(step, m)

    def close(self) -> None:
        self.log.close()

    def _read(self, step: int, metrics: dict) -> None:
        """Checks and accumulates one step's metrics (host values)."""
        m = {k: float(v) for k, v in metrics.items()}
        self.history.append({"step": step, "loss": m["loss"], "finite": bool(m["finite"])})
        if not m["finite"]:
            logging.warning(
                "%s step %d: non-finite loss or gradients; update skipped (%d skipped so far)",
                self.name,
                step,
                int(m["num_skipped"]),
            )
        if m["nonfinite_streak"] >= self._max_nonfinite:
            raise FloatingPointError(
                f"{self.name} training stopped at step {step}: the loss or gradients were "
                f"non-finite for {int(m['nonfinite_streak'])} consecutive steps (limit "
                "train.max_nonfinite_steps); lower optim.lr, enable optim.grad_clip or check the "
                "data. The last checkpoint was left as it was."
            )
        self._acc.add({k: v for k, v in m.items() if k != "finite"})

    def _write_row(self, step: int) -> None:
        scalars = self._acc.result()
        scalars.update(self._rates.pending)
        self._rates.pending = {}
        scalars["examples"] = step * self._batch_size
        self.log.scalars(step, scalars)
        self._acc.reset()
