"""`--mode=train` and `--mode=train_classifier`: the trainers, with the reference-run import.

The trainers (gdiff/train/) and their loop know only gdiff's own checkpoints; a reference PyTorch
training run named by `train.resume_checkpoint` is read by the compat adapter, which sits above
them. This is where the two meet: the jobs hand `compat/reference_run.py`'s importer down to the
loop (`runner.train(..., import_run=...)`).
"""

from __future__ import annotations

from gdiff.compat import reference_run
from gdiff.train import classifier_trainer, diffusion_trainer, runner


def train(config, workdir: str, *, mesh=None, stop_at_step: int | None = None) -> dict:
    """Trains the diffusion model (`diffusion_trainer`); `train.resume_checkpoint` may name a
    gdiff training checkpoint or a reference PyTorch run. Returns runner.run's dict."""
    return runner.train(
        config,
        workdir,
        diffusion_trainer.build_task,
        mesh=mesh,
        stop_at_step=stop_at_step,
        import_run=reference_run.load_train_state,
    )


def train_classifier(config, workdir: str, *, mesh=None, stop_at_step: int | None = None) -> dict:
    """Trains the noise-aware classifier (`classifier_trainer`), as `train` does."""
    return runner.train(
        config,
        workdir,
        classifier_trainer.build_task,
        mesh=mesh,
        stop_at_step=stop_at_step,
        import_run=reference_run.load_train_state,
    )
