"""--mode=train: the diffusion model (the reference's `scripts/image_train.py` + `train_util.py`).

One jitted, data-parallel step over the global batch: sample t (uniform or loss-second-moment, the
sampler's state inside the TrainState), q_sample with fresh noise, the configured loss (MSE, hybrid
MSE+VB, KL, ...), gradients accumulated over micro-batches, AdamW, EMA for every rate, the sampler
updated from the global batch's timesteps and losses. Because the loss is a mean over the global
batch sharded over the mesh, XLA's SPMD partitioner inserts the gradient all-reduce itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gdiff import checkpointing, distributed, factory
from gdiff.sampling import grid as grid_lib
from gdiff.sampling import labels as labels_lib
from gdiff.sampling import sampler as sampling_lib
from gdiff.train import loop_utils, optim, runner, update
from gdiff.train import state as state_lib
from gdiff.train import task as task_lib

CHECKPOINT_SUBDIR = "checkpoints"
PREVIEW_SAMPLES = 16  # images in the periodic training preview (`train.sample_every`)


def fingerprint(config) -> dict:
    """What a diffusion training checkpoint depends on (a resume with other values is refused)."""
    return task_lib.fingerprint(
        config,
        "diffusion",
        model=config.model.to_dict(),
        ema_rates=state_lib.parse_ema_rates(config.train.ema_rates),
        schedule_sampler=config.train.schedule_sampler,
    )


def make_train_step(config, model, diffusion, sampler, num_devices: int):
    """The pure step `(TrainState, dict(image [B,H,W,C], label [B])) -> (TrainState, metrics)`."""
    class_cond = bool(config.model.class_cond)
    num_micro = optim.check_microbatch(
        config.train.batch_size, config.train.microbatch, num_devices
    )
    num_t = int(diffusion.num_timesteps)
    tx = optim.create_optimizer(config.optim)

    def train_step(state: state_lib.TrainState, batch: dict):
        x = batch["image"]
        b = x.shape[0]
        k_t, k_noise, k_drop = jax.random.split(state.step_key(), 3)
        t, weights = sampler.sample(state.sampler_state, k_t, b)
        noise = jax.random.normal(k_noise, x.shape, x.dtype)
        inputs = {"x": x, "y": batch["label"], "t": t, "w": weights, "noise": noise}

        def loss_fn(params, mb, i):
            def model_fn(x_t, ts):
                return model.apply(
                    {"params": params},
                    x_t,
                    ts,
                    y=mb["y"] if class_cond else None,
                    train=True,
                    rngs={"dropout": jax.random.fold_in(k_drop, i)},
                )

            terms = diffusion.training_losses(model_fn, mb["x"], mb["t"], mb["noise"])
            return jnp.mean(terms["loss"] * mb["w"]), terms

        loss, grads, terms = optim.accumulate_gradients(
            loss_fn, state.params, inputs, num_micro, num_devices
        )
        # The loss-aware sampler learns from the unweighted losses of the whole global batch.
        new_sampler = sampler.update(state.sampler_state, t, jax.lax.stop_gradient(terms["loss"]))
        lr = optim.learning_rate(config.optim, state.step, config.train.num_steps)
        new_state, metrics = update.apply_update(
            state, tx, grads, loss, lr, sampler_state=new_sampler
        )
        metrics["loss"] = loss
        for key, values in terms.items():
            weighted = values * weights  # the reference logs importance-weighted terms
            if key != "loss":
                metrics[key] = jnp.mean(weighted)
            metrics.update(loop_utils.quartile_sums(key, weighted, t, num_t))
        return new_state, metrics

    return train_step


def make_sample_grid_action(config, model, mesh, num_samples: int = PREVIEW_SAMPLES):
    """A periodic action: sample a small grid, save PNG + write image.

    The preview is drawn by `--mode=sample`'s sampler (gdiff/sampling/sampler.py) from the EMA
    copy it would load (`_preview_ema_rate`): example i of the grid is example i of a
    `--mode=sample` run on this step's checkpoint with the same config and balanced labels (its
    noise comes from fold_in(key(sample.seed), i)), so successive previews show the same noise as
    training goes on.
    """
    s = config.sample
    diffusion = factory.build_diffusion(config, timestep_respacing=s.timestep_respacing or None)
    size = int(config.model.image_size)
    options = sampling_lib.SamplerOptions(
        image_shape=(size, size, 3),
        use_ddim=bool(s.use_ddim),
        eta=float(s.eta),
        clip_denoised=bool(s.clip_denoised),
        class_cond=bool(config.model.class_cond),
    )
    sampler = sampling_lib.Sampler(diffusion, model.apply, options, mesh=mesh, seed=int(s.seed))
    rows = _preview_rows(config, num_samples, mesh)
    rate = _preview_ema_rate(config)

    def action(state: state_lib.TrainState, step: int, log: loop_utils.MetricsLog) -> None:
        params = state.params if rate is None else state.ema_params[rate]
        images = sampler({"params": params}, None, sampler.make_batch(rows))
        # A collective on several hosts (every process calls it); process 0 draws the grid.
        pixels = distributed.to_host(images)[:num_samples]
        if jax.process_index() == 0:
            # A square-ish grid on black, 1 pixel apart: a quick look, not the class-row preview.
            ncols = math.ceil(math.sqrt(len(pixels)))
            grid = grid_lib.make_grid(pixels, ncols, pad=1, fill=0)
            grid_lib.save_png(f"{log.workdir}/samples_train/step_{step:07d}.png", grid)
            log.images(step, {"samples": grid[None]})
            logging.info("step %d: wrote a %d-image sample grid", step, num_samples)

    return action


def _preview_ema_rate(config) -> str | None:
    """The EMA copy `--mode=sample` loads from a training checkpoint (`checkpointing.ema_key`);
    None (the raw parameters) without EMA."""
    rates = state_lib.parse_ema_rates(config.train.ema_rates)
    if not rates:
        return None
    return checkpointing.ema_key(rates, config.sample.ema_rate, where="train.ema_rates")


def _preview_rows(config, num_samples: int, mesh) -> dict[str, np.ndarray]:
    """This process's rows of the preview batch: example ids 0..num_samples-1 (padded up to a
    multiple of the device count), balanced labels, guidance scale 0; as `--mode=sample` lays out
    its first batch."""
    total = math.ceil(num_samples / mesh.size) * mesh.size
    local = distributed.local_batch_size(total, mesh)
    ids = jax.process_index() * local + np.arange(local)
    num_classes = max(int(config.model.num_classes), 1)
    labels = labels_lib.make_labels("balanced", total, num_classes, int(config.sample.seed))
    return {
        "ids": ids.astype(np.int32),
        "labels": labels[ids],
        "scales": np.zeros([local], np.float32),
    }


def build_task(config, mesh) -> task_lib.Task:
    """Validates the config and describes diffusion training as a `task_lib.Task`."""
    distributed.check_batch_divisible(config.train.batch_size, mesh=mesh)
    if config.model.image_size != config.data.image_size:
        raise ValueError(
            f"model.image_size={config.model.image_size} differs from "
            f"data.image_size={config.data.image_size}"
        )
    model = factory.build_model(config)
    diffusion, sampler = task_lib.training_diffusion(config)
    periodic = []
    if config.train.sample_every and config.train.sample_every > 0:
        action = make_sample_grid_action(config, model, mesh)
        periodic.append((int(config.train.sample_every), action))
    return task_lib.Task(
        name="diffusion",
        checkpoint_subdir=CHECKPOINT_SUBDIR,
        num_steps=int(config.train.num_steps),
        batch_size=int(config.train.batch_size),
        init_params=task_lib.params_initializer(model, config.model.image_size),
        ema_rates=state_lib.parse_ema_rates(config.train.ema_rates),
        sampler_state=sampler.init_state(),
        train_step=make_train_step(config, model, diffusion, sampler, mesh.size),
        fingerprint=fingerprint(config),
        random_crop=bool(config.data.random_crop),
        random_flip=bool(config.data.random_flip),
        periodic=periodic,
    )


def train(config, workdir: str, *, mesh=None, stop_at_step: int | None = None) -> dict:
    """Trains the diffusion model; checkpoints go to `<workdir>/checkpoints`.

    Resumes from the newest checkpoint there (or `train.resume_checkpoint`) with the exact step,
    optimiser, EMA, sampler state, rng stream and data position. `mesh` defaults to all devices;
    `stop_at_step` ends early (with a checkpoint), as a preemption would.

    Returns:
      runner.run's dict: final state, per-step history, start step, whether stopped early.
    """
    return runner.train(config, workdir, build_task, mesh=mesh, stop_at_step=stop_at_step)


__all__ = ["train", "make_train_step", "build_task", "fingerprint"]
