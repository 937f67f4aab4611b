"""Noise-aware classifier training on the tiny config: learns, evaluates held-out data, resumes."""

import jax
import numpy as np
import pytest

from configs import tiny
from gdiff.checkpoints import locate
from gdiff.train import classifier_trainer, loop_utils


def _config():
    config = tiny.get_config()
    config.train.classifier_num_steps = 60
    config.train.log_every = 20
    config.train.eval_every = 30
    config.train.eval_batches = 4
    config.train.save_every = 30
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("classifier")
    return workdir, classifier_trainer.train(_config(), str(workdir))


def test_classifier_beats_chance_on_held_out_digits(trained):
    workdir, result = trained
    rows = loop_utils.read_metrics(workdir, "metrics_classifier.jsonl")
    evals = [r for r in rows if "val_acc@1" in r]
    assert [r["step"] for r in evals] == [30, 60]
    last = evals[-1]
    for key in ("val_loss", "val_acc@5", "val_acc@1_q0", "val_acc@1_q3", "val_loss_q1"):
        assert np.isfinite(last[key]), key
    # Chance is 10% (top-1) and 50% (top-5); weakly noised digits are far easier than that.
    assert last["val_acc@1_q0"] > 0.3, last
    assert last["val_acc@5"] > 0.6, last
    # Heavier noise makes the task harder (the point of a noise-aware classifier's t input).
    assert last["val_loss_q3"] > last["val_loss_q0"]
    train_rows = [r for r in rows if "train_acc@1" in r]
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    assert train_rows[-1]["train_acc@1_q0"] > 0.3


def test_classifier_checkpoint_has_no_ema_and_loads_for_guidance(trained):
    workdir, result = trained
    assert result["state"].ema_params == {}
    params = locate.load_params(workdir, kind="classifier")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result["state"].params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_classifier_resume_is_exact(trained, tmp_path):
    _, result = trained
    config = _config()
    config.train.eval_every = 0
    first = classifier_trainer.train(config, str(tmp_path), stop_at_step=40)
    second = classifier_trainer.train(config, str(tmp_path))
    assert second["start_step"] == 40
    losses = [h["loss"] for h in first["history"] + second["history"]]
    np.testing.assert_array_equal(losses, [h["loss"] for h in result["history"]])


def test_classifier_batch_must_divide_devices(tmp_path):
    config = _config()
    config.train.classifier_batch_size = 20
    with pytest.raises(ValueError, match="train.classifier_batch_size=20"):
        classifier_trainer.train(config, str(tmp_path))
