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

from gdiff import distributed, factory
from gdiff.diffusion import timestep_sampler
from gdiff.sampling import grid as grid_lib
from gdiff.sampling import sampler as sampling_lib
from gdiff.train import loop_utils, optim, runner
from gdiff.train import state as state_lib

CHECKPOINT_SUBDIR = "checkpoints"


def fingerprint(config) -> dict:
    """What a diffusion training checkpoint depends on (a resume with other values is refused)."""
    return {
        "task": "diffusion",
        "model": config.model.to_dict(),
        "diffusion": config.diffusion.to_dict(),
        "image_size": config.data.image_size,
        "ema_rates": state_lib.parse_ema_rates(config.train.ema_rates),
        "schedule_sampler": config.train.schedule_sampler,
        "grad_clip": bool(config.optim.grad_clip and config.optim.grad_clip > 0),
    }


def make_train_step(config, model, diffusion, sampler, tx, num_devices: int):
    """The pure step `(TrainState, dict(image [B,H,W,C], label [B])) -> (TrainState, metrics)`."""
    class_cond = bool(config.model.class_cond)
    num_micro = optim.check_microbatch(
        config.train.batch_size, config.train.microbatch, num_devices
    )
    num_t = int(diffusion.num_timesteps)

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
        new_state, metrics = runner.apply_update(
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


def make_sample_grid_action(config, model, num_samples: int = 16):
    """A periodic action: sample a small grid from the first EMA copy, save PNG + write image."""
    respacing = config.sample.timestep_respacing or config.diffusion.timestep_respacing or None
    diffusion = factory.build_diffusion(config, timestep_respacing=respacing)
    size = config.model.image_size
    class_cond = bool(config.model.class_cond)
    labels = jnp.arange(num_samples) % max(int(config.model.num_classes), 1)

    @jax.jit
    def sample(params, rng):
        def model_fn(x, ts):
            return model.apply({"params": params}, x, ts, y=labels if class_cond else None)

        shape = (num_samples, size, size, 3)
        if config.sample.use_ddim:
            return diffusion.ddim_sample_loop(
                model_fn,
                shape,
                rng,
                eta=config.sample.eta,
                clip_denoised=config.sample.clip_denoised,
            )
        return diffusion.p_sample_loop(
            model_fn, shape, rng, clip_denoised=config.sample.clip_denoised
        )

    def action(state: state_lib.TrainState, step: int, log: loop_utils.MetricsLog) -> None:
        params = next(iter(state.ema_params.values())) if state.ema_params else state.params
        rng = jax.random.fold_in(jax.random.key(config.sample.seed), step)
        images = runner._fetch(sample(params, rng))
        if jax.process_index() == 0:
            pixels = np.asarray(sampling_lib.to_uint8(images))
            # A square-ish grid on black, 1 pixel apart: a quick look, not the class-row preview.
            ncols = math.ceil(math.sqrt(len(pixels)))
            grid = grid_lib.make_grid(pixels, ncols, pad=1, fill=0)
            grid_lib.save_png(f"{log.workdir}/samples_train/step_{step:07d}.png", grid)
            log.images(step, {"samples": grid[None]})
            logging.info("step %d: wrote a %d-image sample grid", step, num_samples)

    return action


def build_task(config, mesh) -> runner.Task:
    """Validates the config and describes diffusion training as a `runner.Task`."""
    distributed.check_batch_divisible(config.train.batch_size, mesh=mesh)
    optim.check_microbatch(config.train.batch_size, config.train.microbatch, mesh.size)
    if config.model.image_size != config.data.image_size:
        raise ValueError(
            f"model.image_size={config.model.image_size} differs from "
            f"data.image_size={config.data.image_size}"
        )
    model = factory.build_model(config)
    diffusion = factory.build_diffusion(config)
    sampler = timestep_sampler.create_named_schedule_sampler(
        config.train.schedule_sampler, diffusion
    )
    tx = optim.create_optimizer(config.optim)

    def init_params(rng):
        variables = factory.init_variables(model, rng, image_size=config.model.image_size)
        return variables["params"]

    periodic = []
    if config.train.sample_every and config.train.sample_every > 0:
        periodic.append((int(config.train.sample_every), make_sample_grid_action(config, model)))
    return runner.Task(
        name="diffusion",
        checkpoint_subdir=CHECKPOINT_SUBDIR,
        num_steps=int(config.train.num_steps),
        batch_size=int(config.train.batch_size),
        init_params=init_params,
        ema_rates=state_lib.parse_ema_rates(config.train.ema_rates),
        sampler_state=sampler.init_state(),
        train_step=make_train_step(config, model, diffusion, sampler, tx, mesh.size),
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
    runner.initialize_distributed(config)
    from gdiff.data import pipeline

    pipeline.check_data_config(config)
    mesh = distributed.data_mesh() if mesh is None else mesh
    task = build_task(config, mesh)
    return runner.run(config, workdir, task, mesh=mesh, stop_at_step=stop_at_step)


__all__ = ["train", "make_train_step", "build_task", "fingerprint"]
