"""Training metrics come back from the device in one transfer per logging interval.

The loop used to read every step's ~30 metric scalars one step late (one device-to-host transfer
per step); now `TrainMetrics` keeps the device dicts of an interval and reads them together at the
row. These tests count the transfers (`gdiff.distributed.host_copy`, the one function every read
goes through), check that the rows hold exactly what reading step by step gives, and that a
non-finite streak still stops the run at the step where it reached the limit, with no checkpoint
saved inside it.
"""

import logging

import numpy as np
import pytest

from configs import tiny
from gdiff import distributed
from gdiff.checkpoints import store
from gdiff.data import pipeline
from gdiff.train import classifier_trainer, diffusion_trainer, loop_utils
from gdiff.train import task as task_lib

STEPS = 7
LOG_EVERY = 3


def _config(**train):
    config = tiny.get_config()
    config.train.num_steps = STEPS
    config.train.log_every = LOG_EVERY
    config.train.save_every = 1000
    config.train.eval_every = 0
    config.train.progress = False
    for k, v in train.items():
        config.train[k] = v
    return config


def _count_reads(monkeypatch, marker: str) -> list[list[dict]]:
    """Wraps host_copy; returns the list that receives, per call whose tree holds dicts with the
    key `marker` (a training step's or an evaluation batch's metrics), the host values it read
    (as a list of dicts, whatever the shape of the call)."""
    reads = []
    original = distributed.host_copy

    def host_copy(tree):
        out = original(tree)
        dicts = out if isinstance(out, list) else [out]
        if dicts and all(isinstance(d, dict) and marker in d for d in dicts):
            reads.append(dicts)
        return out

    monkeypatch.setattr(distributed, "host_copy", host_copy)
    return reads


def _rows_of(per_step: list[dict], last_keys, log_every: int, last_step: int) -> dict:
    """The rows that reading the steps one by one gives, computed here independently of
    MetricAccumulator: {row step: {key: value}}."""
    rows, interval = {}, []
    for step, m in enumerate(per_step, start=1):
        interval.append(m)
        if step % log_every and step != last_step:
            continue
        row = {}
        for key in interval[0]:
            values = [float(d[key]) for d in interval]
            if key == "finite" or key.endswith("/count"):
                continue
            if key in last_keys:
                row[key] = values[-1]
            elif key.endswith("/sum"):
                count = sum(float(d[key[: -len("/sum")] + "/count"]) for d in interval)
                if count > 0:
                    row[key[: -len("/sum")]] = sum(values) / count
            else:
                row[key] = sum(values) / len(values)
        rows[step] = row
        interval = []
    return rows


def test_one_transfer_per_row_and_the_rows_reading_step_by_step_gives(tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch, "loss")
    result = diffusion_trainer.train(_config(), str(tmp_path / "interval"))
    # Rows at steps 3, 6 and 7 (the last): three transfers of 3, 3 and 1 steps (it was 7 of 1).
    assert [len(r) for r in reads] == [3, 3, 1]
    per_step = [m for r in reads for m in r]
    assert [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in result["history"]] == [float(m["loss"]) for m in per_step]
    assert all(h["finite"] for h in result["history"])

    rows = loop_utils.read_metrics(tmp_path / "interval", "metrics_diffusion.jsonl")
    assert [r["step"] for r in rows] == [3, 6, STEPS]
    expected = _rows_of(per_step, task_lib.Task.last_keys, LOG_EVERY, STEPS)
    for row in rows:
        want = expected[row["step"]]
        assert {k: row[k] for k in want} == want, row["step"]
        assert row["examples"] == row["step"] * 16 and row["steps_per_sec"] > 0

    # The same run read step by step (a row per step) saw the same values at every step.
    reads.clear()
    one = diffusion_trainer.train(_config(log_every=1), str(tmp_path / "per_step"))
    assert [len(r) for r in reads] == [1] * STEPS
    assert [h["loss"] for h in one["history"]] == [h["loss"] for h in result["history"]]
    single = loop_utils.read_metrics(tmp_path / "per_step", "metrics_diffusion.jsonl")
    for row, m in zip(single, per_step, strict=True):
        for key in ("loss", "mse", "vb", "grad_norm", "param_norm", "lr"):
            assert row[key] == float(m[key]), (row["step"], key)


def _poison_from(monkeypatch, first_bad: int):
    """Makes the images of every batch from the (0-based) call `first_bad` on NaN."""
    calls = {"n": 0}
    original = pipeline.to_global

    def to_global(batch, mesh):
        if calls["n"] >= first_bad:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        calls["n"] += 1
        return original(batch, mesh)

    monkeypatch.setattr(pipeline, "to_global", to_global)


def test_a_streak_found_at_the_row_stops_at_its_step_and_is_never_saved(
    tmp_path, monkeypatch, caplog
):
    # Step 1 is clean, steps 2, 3, 4 ... are NaN: the streak reaches the limit 3 at step 4, which
    # the host learns at the row of step 5. Every step is due for a periodic save.
    _poison_from(monkeypatch, 1)
    reads = _count_reads(monkeypatch, "loss")
    config = _config(num_steps=20, log_every=5, save_every=1, max_nonfinite_steps=3)
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(FloatingPointError, match="stopped at step 4: .* for 3 consecutive steps"),
    ):
        diffusion_trainer.train(config, str(tmp_path))
    assert [len(r) for r in reads] == [5]
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert [msg.split(":")[0] for msg in skipped] == [f"diffusion step {s}" for s in (2, 3, 4)]
    # Only the clean step 1 was saved: the loop checks the state's streak before every save.
    assert store.CheckpointManager(tmp_path / "checkpoints").all_steps() == [1]


def test_classifier_evaluation_reads_all_its_batches_in_one_transfer(tmp_path, monkeypatch):
    train_reads = _count_reads(monkeypatch, "loss")
    eval_reads = _count_reads(monkeypatch, "val_loss")
    config = _config(
        classifier_num_steps=4, log_every=2, eval_every=4, eval_batches=3, save_every=0
    )
    classifier_trainer.train(config, str(tmp_path))
    assert [len(r) for r in train_reads] == [2, 2]
    assert [len(r) for r in eval_reads] == [3]
    rows = loop_utils.read_metrics(tmp_path, "metrics_classifier.jsonl")
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4]
    want = np.mean([float(m["val_loss"]) for m in eval_reads[0]])
    assert evals[0]["val_loss"] == pytest.approx(want, rel=1e-12)
