"""Continuing a reference (PyTorch) training run: finding its files, reading AdamW's state (fp32
and fp16 layouts), `train.resume_checkpoint` end to end, and clear errors for a mismatched run.
The step's numbers themselves are checked in tests/test_training_parity.py."""

import json

import jax
import numpy as np
import pytest
from conftest import fixture_path, load_fixture

from configs import common
from gdiff import distributed, errors
from gdiff.checkpoints import locate, torch_file
from gdiff.compat import flags, openai, reference_run
from gdiff.jobs import train as train_job
from gdiff.train import diffusion_trainer

RUN = "training_run"


@pytest.fixture(scope="module")
def run_dir():
    return fixture_path(RUN)


def _model_file(run_dir):
    return sorted(run_dir.glob("model*.pt"))[-1]


def test_locate_finds_the_run_from_its_model_file_or_folder(run_dir):
    model = _model_file(run_dir)
    step = int(model.stem.removeprefix("model"))
    for path in (run_dir, model):
        loc = locate.locate(path)
        assert (loc.format, loc.path, loc.step) == ("reference_run", run_dir, step)
    run = reference_run.find_run(locate.locate(run_dir))
    assert run.model == model and run.opt == run_dir / f"opt{step:06d}.pt"
    assert run.ema and all(p.name.endswith(f"_{step:06d}.pt") for p in run.ema.values())
    # Sampling cannot use the run as it is: the message says what to do instead.
    with pytest.raises(ValueError, match="--mode=convert.*train.resume_checkpoint"):
        locate.load_params(run_dir)


def _as_fp16_layout(opt: dict, shapes: list[tuple]) -> dict:
    """The AdamW state a use_fp16 run saves: moments over two flat master tensors (1-D
    parameters, then the others with shape [1, -1])."""
    vectors = [i for i, s in enumerate(shapes) if len(s) <= 1]
    matrices = [i for i, s in enumerate(shapes) if len(s) > 1]
    state = {}
    for g, members in enumerate((vectors, matrices)):
        entry = {"step": opt["state"][0]["step"]}
        for key in ("exp_avg", "exp_avg_sq"):
            flat = np.concatenate([opt["state"][i][key].ravel() for i in members])
            entry[key] = flat if g == 0 else flat[None]
        state[g] = entry
    return {"state": state, "param_groups": [dict(opt["param_groups"][0], params=[0, 1])]}


def test_adam_state_in_parameter_order_and_in_the_fp16_layout(run_dir):
    run = reference_run.find_run(locate.locate(run_dir))
    sd = torch_file.load_torch_state_dict(run.model)
    shapes = {k: v.shape for k, v in sd.items()}
    opt = torch_file.load_torch_file(run.opt)
    step, mu, nu = reference_run.adam_moments(opt, shapes, "opt")
    assert step == run.step and list(mu) == list(sd)
    first = next(iter(sd))
    np.testing.assert_array_equal(mu[first], opt["state"][0]["exp_avg"])
    fp16 = _as_fp16_layout(opt, list(shapes.values()))
    step16, mu16, nu16 = reference_run.adam_moments(fp16, shapes, "opt")
    assert step16 == step
    for name in sd:
        np.testing.assert_array_equal(mu16[name], mu[name])
        np.testing.assert_array_equal(nu16[name], nu[name])
    shorter = dict(opt, param_groups=[dict(opt["param_groups"][0], params=[0, 1, 2])])
    with pytest.raises(ValueError, match="not this model's optimiser state"):
        reference_run.adam_moments(shorter, shapes, "opt")


def _config(cfg: dict, resume: str, num_steps: int):
    """The file's UNet trained on digits (upsampled to its size), resuming the reference run."""
    config = common.get_config()
    config.data.num_classes = openai.NUM_CLASSES
    flags.write_config(config, cfg["create_model"])
    opt = cfg["optimizer"]
    config.optim.lr = opt["lr"]
    config.optim.weight_decay = opt["weight_decay"]
    config.optim.anneal_lr = opt["lr_anneal_steps"] > 0
    config.train.batch_size = cfg["batch"]
    config.train.num_steps = num_steps
    config.train.ema_rates = str(opt["ema_rate"])
    config.train.resume_checkpoint = resume
    config.train.progress = False
    config.train.log_every = 1
    return config


def test_train_resume_checkpoint_continues_the_run(run_dir, tmp_path):
    cfg = json.loads(str(load_fixture("training_step.npz")["config_json"]))
    model = _model_file(run_dir)
    step = int(model.stem.removeprefix("model"))
    mesh = distributed.data_mesh(jax.devices()[:1])
    config = _config(cfg, str(model), step + 1)
    # The trainer alone (the library) reads no foreign format: the job hands the importer down.
    with pytest.raises(errors.ConfigError, match="is a reference .PyTorch. training run"):
        diffusion_trainer.train(config, str(tmp_path / "lib"), mesh=mesh)
    result = train_job.train(config, str(tmp_path / "a"), mesh=mesh)
    assert result["start_step"] == step
    assert [h["step"] for h in result["history"]] == [step + 1]
    assert np.isfinite(result["history"][0]["loss"])
    assert int(result["state"].step) == step + 1
    assert list(result["state"].ema_params) == [config.train.ema_rates]
    # Now a gdiff training checkpoint: the next run resumes from it, not from the reference.
    ckpt = locate.locate(tmp_path / "a", "model")
    assert (ckpt.format, ckpt.step) == ("training", step + 1)

    # Another architecture: every mismatched layer is named before anything is trained.
    config = _config(cfg, str(run_dir), step + 1)
    config.model.num_channels = 2 * config.model.num_channels
    with pytest.raises(ValueError, match="does not match this config's network") as err:
        train_job.train(config, str(tmp_path / "b"), mesh=mesh)
    assert "mis-shaped" in str(err.value) and "input_blocks.0.0.weight" in str(err.value)
