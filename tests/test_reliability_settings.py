"""Issue 23, items 1 and 5: weights are used only with the settings they were trained with, and a
resumed bits/dim run never mixes precisions.

1. A training checkpoint records its diffusion, image size and network group
   (gdiff_config.json); sampling and bits/dim compare them with the config and refuse, naming
   every differing key, where they used to sample at linear/1000 or 16x16 what was trained at
   cosine/100 and 8x8 (exit 0, no word).
5. `--mode=nll` resumed with another `model.dtype` used to merge float32 and bfloat16 shards; the
   manifest now pins the model group, so the rerun is refused.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from configs import tiny
from gdiff import errors
from gdiff.checkpoints import locate, settings
from gdiff.jobs import nll, sample
from gdiff.train import diffusion_trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(workdir, **diffusion):
    config = tiny.get_config()
    config.train.num_steps = 2
    config.train.save_every = 2
    config.train.progress = False
    config.sample.num_samples = 8
    config.sample.batch_size = 1
    config.sample.classifier_scale = "0"
    config.sample.timestep_respacing = "3"
    config.sample.model_checkpoint = str(workdir)
    config.sample.output_dir = str(workdir / "samples")
    for key, value in diffusion.items():
        config.diffusion[key] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 2 steps with tiny's diffusion (cosine, 100 steps) at 8x8."""
    workdir = tmp_path_factory.mktemp("settings")
    diffusion_trainer.train(_config(workdir), str(workdir))
    return workdir


def test_differences_name_every_changed_setting_and_ignore_loss_only_keys(trained):
    trained_settings = settings.recorded(locate.locate(trained, "model"))
    config = _config(trained, noise_schedule="linear", steps=1000, use_kl=True)
    config.sample.timestep_respacing = "7"
    config.model.num_heads = 4
    config.model.dtype = "bfloat16"  # how the network computes: not a trained setting
    config.model.dropout = 0.3  # training only
    got = settings.differences(
        trained_settings,
        network="model",
        config_network=config.model.to_dict(),
        diffusion=config.diffusion.to_dict(),
        image_size=16,
    )
    assert got == [
        "data.image_size: trained 8, configured 16",
        "diffusion.noise_schedule: trained 'cosine', configured 'linear'",
        "diffusion.steps: trained 100, configured 1000",
        "model.num_heads: trained 2, configured 4",
    ]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"noise_schedule": "linear", "steps": 1000}, "diffusion.noise_schedule: trained 'cosine'"),
        ({"image_size": 16}, "data.image_size: trained 8, configured 16"),
    ],
)
def test_sampling_refuses_weights_trained_with_other_settings(trained, tmp_path, change, named):
    config = _config(trained)
    config.sample.output_dir = str(tmp_path / "samples")
    if "image_size" in change:
        config.data.image_size = change["image_size"]  # model.image_size refers to it
    else:
        for key, value in change.items():
            config.diffusion[key] = value
    with pytest.raises(errors.ConfigMismatchError, match="trained with other settings") as err:
        sample.run(config, str(tmp_path))
    assert named in str(err.value) and str(trained / "checkpoints") in str(err.value)
    assert not (tmp_path / "samples").exists()  # refused before anything was written


def test_bits_per_dim_refuses_weights_trained_with_other_settings(trained, tmp_path):
    config = _config(trained, steps=1000)
    config.eval.nll_num_samples = 8
    config.eval.nll_batch_size = 1
    config.eval.nll_output_dir = str(tmp_path / "nll")
    with pytest.raises(errors.ConfigMismatchError, match="diffusion.steps: trained 100"):
        nll.run(config, str(tmp_path))


def test_the_command_line_refuses_in_one_line(trained, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--config=configs/tiny.py",
            f"--workdir={trained}",
            "--mode=sample",
            "--config.diffusion.noise_schedule=linear",
            "--config.sample.num_samples=8",
            f"--config.sample.output_dir={tmp_path / 'samples'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gdiff: the model in ") and "diffusion.noise_schedule" in last, last


class Killed(Exception):
    pass


def _kill(batch):
    raise Killed(batch)


def test_a_resumed_bits_per_dim_run_refuses_another_precision(trained, tmp_path):
    config = _config(trained)
    config.eval.nll_num_samples = 16  # two global batches of 8 (one example per device)
    config.eval.nll_batch_size = 1
    config.eval.nll_output_dir = str(tmp_path / "nll")
    with pytest.raises(Killed):
        nll.run(config, str(tmp_path), on_batch_done=_kill)
    config.model.dtype = "bfloat16"
    with pytest.raises(errors.ConfigMismatchError, match="model.dtype: 'float32' -> 'bfloat16'"):
        nll.run(config, str(tmp_path))
