"""What a trainer hands the shared loop (`gdiff.train.runner`): a `Task`, and the parts both
trainers build theirs from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from gdiff import factory
from gdiff.diffusion import timestep_sampler
from gdiff.train import state as state_lib


@dataclasses.dataclass
class Task:
    """What differs between the diffusion and the classifier trainer.

    name: "diffusion" or "classifier" (log prefix, checkpoint fingerprint).
    checkpoint_subdir: folder of the workdir holding this task's training checkpoints.
    num_steps, batch_size: total steps and global batch.
    init_params: key -> parameter pytree (run under jit with replicated outputs).
    ema_rates: the EMA copies to keep ([] for none).
    sampler_state: initial timestep-sampler state ({} when stateless).
    train_step: pure (TrainState, batch dict of global arrays) -> (TrainState, metrics dict of
      replicated scalars); must include "loss", "finite" and the state's counters.
    fingerprint: JSON-able description of the state's structure and meaning (resume guard).
    random_crop, random_flip: training augmentation.
    periodic: (interval, fn(state, step, log)) actions run after `step` steps (interval > 0).
    last_keys: metric keys logged as their newest value rather than an interval mean.
    """

    name: str
    checkpoint_subdir: str
    num_steps: int
    batch_size: int
    init_params: Callable[[jax.Array], Any]
    ema_rates: list[str]
    sampler_state: Any
    train_step: Callable[[state_lib.TrainState, dict], tuple[state_lib.TrainState, dict]]
    fingerprint: dict
    random_crop: bool
    random_flip: bool
    periodic: list[tuple[int, Callable]] = dataclasses.field(default_factory=list)
    last_keys: tuple[str, ...] = ("lr", "num_skipped", "nonfinite_streak", "param_norm")


def params_initializer(module, image_size: int) -> Callable[[jax.Array], Any]:
    """A Task's `init_params`: key -> freshly initialised parameters of the flax `module`."""

    def init_params(rng):
        return factory.init_variables(module, rng, image_size=image_size)["params"]

    return init_params


def training_diffusion(config) -> tuple[Any, Any]:
    """(diffusion, timestep sampler): the diffusion of `config.diffusion` as trained (no
    respacing) and the `train.schedule_sampler` that draws each example's t."""
    diffusion = factory.build_diffusion(config)
    sampler = timestep_sampler.create_named_schedule_sampler(
        config.train.schedule_sampler, diffusion
    )
    return diffusion, sampler


# How a network computes, not what it is: a resumed run may change these (bfloat16 compute,
# another attention kernel, rematerialisation), so they stay out of the resume fingerprint and
# are reported as settings instead (runner._report_schedule_change). `use_checkpoint` is the
# remat switch of fingerprints written before `remat` existed.
RUNTIME_KEYS = ("dtype", "attention_impl", "remat", "use_checkpoint")


def fingerprint(config, task: str, **fields: Any) -> dict:
    """A Task's fingerprint: what every training checkpoint depends on (the diffusion, the image
    size, whether gradients are clipped) plus the trainer's own `fields`, without the
    RUNTIME_KEYS of a network group."""
    fields = {
        k: {n: x for n, x in v.items() if n not in RUNTIME_KEYS} if isinstance(v, dict) else v
        for k, v in fields.items()
    }
    return {
        "task": task,
        "diffusion": config.diffusion.to_dict(),
        "image_size": config.data.image_size,
        "grad_clip": bool(config.optim.grad_clip and config.optim.grad_clip > 0),
        **fields,
    }


def runtime_settings(config) -> dict:
    """The RUNTIME_KEYS of the model and classifier groups (how the networks compute)."""
    return {
        group: {k: config[group][k] for k in RUNTIME_KEYS if k in config[group]}
        for group in ("model", "classifier")
    }
