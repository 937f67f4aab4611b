"""--mode=train: the diffusion model (the reference's `scripts/image_train.py` + `train_util.py`,
and `super_res_train.py` when `model.small_size > 0`).

One jitted, data-parallel step over the global batch, in the reference TrainLoop's order: per
micro-batch, t from the timestep sampler (uniform or loss-second-moment; its state inside the
TrainState and updated after every micro-batch, as the reference's `forward_backward` does),
q_sample with fresh noise, the configured loss (MSE, hybrid MSE+VB, KL, ...) and its gradient; then
AdamW at this step's learning rate, EMA for every rate. A super-resolution model is conditioned on
the batch's area-downsampled copy (`low_res`), like the reference's `load_superres_data`. With
`model.class_dropout > 0` (classifier-free guidance) each example's label is replaced by the
network's null label (`factory.null_label`) with that probability, drawn from its own stream.
Because the loss is a mean over the global batch sharded over the mesh, XLA's SPMD partitioner
inserts the gradient all-reduce itself.

A batch may carry recorded draws, `t` int [B] and/or `noise` [B, H, W, C]; the step then uses
them instead of drawing its own (replaying a reference run's step, tests/test_training_parity.py).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gdiff import distributed, errors, factory
from gdiff.checkpoints import locate
from gdiff.models import layers
from gdiff.sampling import grid as grid_lib
from gdiff.sampling import labels as labels_lib
from gdiff.sampling import plan as plan_lib
from gdiff.sampling import sampler as sampling_lib
from gdiff.train import loop_utils, optim, runner, sharding, update
from gdiff.train import state as state_lib
from gdiff.train import task as task_lib

PREVIEW_SAMPLES = 16  # images in the periodic training preview (`train.sample_every`)
# fold_in tag of the label-dropout draw: a stream of its own off the step's draw key, so the
# timesteps and noise (split from that key) are the same with and without label dropout.
LABEL_DROPOUT_TAG = 0x6C64  # "ld"


def fingerprint(config) -> dict:
    """What a diffusion training checkpoint depends on (a resume with other values is refused)."""
    return task_lib.fingerprint(
        config,
        "diffusion",
        model=factory.recorded_model_group(config.model),
        ema_rates=state_lib.parse_ema_rates(config.train.ema_rates),
        schedule_sampler=config.train.schedule_sampler,
    )


def drop_labels(labels: jax.Array, key: jax.Array, p: float, null: int) -> jax.Array:
    """Classifier-free guidance's label dropout: each label independently becomes `null` with
    probability `p` (a pure function of `key`).

    Args:
      labels: int [B].
      key: the draw's key.
      p: the dropout probability, in [0, 1).
      null: the null label (`factory.null_label`: num_classes).

    Returns:
      int [B], labels' dtype: `null` where dropped, the label elsewhere.
    """
    dropped = jax.random.bernoulli(key, p, labels.shape)
    return jnp.where(dropped, jnp.asarray(null, labels.dtype), labels)


def draw_inputs(
    batch: dict, key: jax.Array, *, class_dropout: float = 0.0, null_label: int | None = None
) -> dict:
    """The step's inputs: the batch plus its random draws, unless the batch carries them.

    Args:
      batch: image [B, H, W, C], label [B]; optionally recorded t [B] and noise [B, H, W, C].
      key: the step's key for the draws.
      class_dropout, null_label: label dropout (`drop_labels`, from fold_in(key,
        LABEL_DROPOUT_TAG)) when class_dropout > 0; `null_label` is then required.

    Returns:
      dict(x, y, noise, and t [B] when recorded, else u [B]: uniform numbers in [0, 1) that the
      timestep sampler turns into t micro-batch by micro-batch, see `make_gradient_fn`).
    """
    x = batch["image"]
    k_u, k_noise = jax.random.split(key)
    inputs = {"x": x, "y": batch["label"]}
    # A static branch: without dropout the step draws, and computes, exactly what it did before.
    if class_dropout > 0:
        k_drop = jax.random.fold_in(key, LABEL_DROPOUT_TAG)
        inputs["y"] = drop_labels(inputs["y"], k_drop, class_dropout, null_label)
    if "noise" in batch:
        inputs["noise"] = batch["noise"].astype(x.dtype)
    else:
        inputs["noise"] = jax.random.normal(k_noise, x.shape, x.dtype)
    if "t" in batch:
        inputs["t"] = batch["t"].astype(jnp.int32)
    else:
        inputs["u"] = jax.random.uniform(k_u, (x.shape[0],))
    return inputs


def model_kwargs(model, micro: dict, small_size: int) -> dict:
    """The conditioning the model is called with: labels (class-conditional) and, for a
    super-resolution model, `low_res` = the images area-downsampled to small_size (the reference's
    `F.interpolate(batch, small_size, mode="area")`)."""
    kwargs = {}
    if model.num_classes is not None:
        kwargs["y"] = micro["y"]
    if small_size > 0:
        kwargs["low_res"] = layers.area_resize(micro["x"], small_size, small_size)
    return kwargs


def make_gradient_fn(config, model, diffusion, schedule_sampler, num_devices: int):
    """The pure loss-and-gradient part of a step.

    Returns `grad_fn(params, sampler_state, inputs, dropout_key) -> (loss, grads, aux,
    sampler_state)`: `inputs` as `draw_inputs` makes them; loss the mean importance-weighted loss
    (the reference's `(losses["loss"] * weights).mean()`) and grads its gradient; aux dict(terms
    (per-example loss, mse/vb where the loss type has them), t [B], weights [B]); the timestep
    sampler's state after every micro-batch's update with its unweighted losses.
    """
    num_micro = optim.check_microbatch(
        config.train.batch_size, config.train.microbatch, num_devices
    )
    small_size = int(config.model.small_size)

    def grad_fn(params, sampler_state, inputs, dropout_key):
        def loss_fn(params, mb, i, sampler_state):
            # Drawn here, not up front: micro-batch i samples from the state micro-batches
            # 0..i-1 updated, as in the reference.
            if "t" in mb:
                t, w = mb["t"], schedule_sampler.importance_weights(sampler_state, mb["t"])
            else:
                t, w = schedule_sampler.from_uniform(sampler_state, mb["u"])
            kwargs = model_kwargs(model, mb, small_size)
            rngs = {"dropout": jax.random.fold_in(dropout_key, i)}

            def model_fn(x_t, ts):
                return model.apply({"params": params}, x_t, ts, train=True, rngs=rngs, **kwargs)

            terms = diffusion.training_losses(model_fn, mb["x"], t, mb["noise"])
            new_state = schedule_sampler.update(
                sampler_state, t, jax.lax.stop_gradient(terms["loss"])
            )
            aux = {"terms": terms, "t": t, "weights": w}
            return jnp.mean(terms["loss"] * w), (aux, new_state)

        return optim.accumulate_gradients(
            loss_fn, params, inputs, num_micro, num_devices, sampler_state
        )

    return grad_fn


def make_train_step(config, model, diffusion, schedule_sampler, num_devices: int):
    """The pure step `(TrainState, dict(image [B,H,W,C], label [B])) -> (TrainState, metrics)`.

    The learning rate follows the diffusion TrainLoop: annealed after each step, so step k uses
    `optim.learning_rate(..., anneal_after_step=True)`. Labels are dropped to the null label
    with probability `model.class_dropout` (`draw_inputs`); `model` must then have its null
    class (`factory.build_model(config)` builds it so).
    """
    num_t = int(diffusion.num_timesteps)
    tx = optim.create_optimizer(config.optim)
    grad_fn = make_gradient_fn(config, model, diffusion, schedule_sampler, num_devices)
    dropout = {
        "class_dropout": factory.class_dropout(config.model),
        "null_label": factory.null_label(config.model),
    }
    if dropout["null_label"] is not None and not model.null_class:
        # Its label_emb has no row for the null label: every dropped example would be garbage.
        raise ValueError("model.class_dropout > 0 needs the network built with null_class=True")

    def train_step(state: state_lib.TrainState, batch: dict):
        k_draw, k_drop = jax.random.split(state.step_key())
        inputs = draw_inputs(batch, k_draw, **dropout)
        loss, grads, aux, new_sampler = grad_fn(state.params, state.sampler_state, inputs, k_drop)
        lr = optim.learning_rate(
            config.optim, state.step, config.train.num_steps, anneal_after_step=True
        )
        new_state, metrics = update.apply_update(
            state, tx, grads, loss, lr, sampler_state=new_sampler
        )
        metrics["loss"] = loss
        for key, values in aux["terms"].items():
            weighted = values * aux["weights"]  # the reference logs importance-weighted terms
            if key != "loss":
                metrics[key] = jnp.mean(weighted)
            metrics.update(loop_utils.quartile_sums(key, weighted, aux["t"], num_t))
        return new_state, metrics

    return train_step


def make_sample_grid_action(config, mesh, num_samples: int = PREVIEW_SAMPLES):
    """A periodic action: sample a small grid, save PNG + write image.

    The preview is drawn by `--mode=sample`'s sampler (gdiff/sampling/sampler.py) from the EMA
    copy it would load (`_preview_ema_rate`): example i of the grid is example i of a
    `--mode=sample` run on this step's checkpoint with the same config and balanced labels (its
    noise comes from fold_in(key(sample.seed), i)), so successive previews show the same noise as
    training goes on.
    """
    # The production builder (remat is a training-memory setting; sampling builds without it).
    sampler, _, _ = sampling_lib.build_sampler(
        sampling_lib.config_groups(config), guided=False, mesh=mesh
    )
    rows = _preview_rows(config, num_samples, mesh)
    rate = _preview_ema_rate(config)

    def action(state: state_lib.TrainState, step: int, log: loop_utils.MetricsLog) -> None:
        params = state.params if rate is None else state.ema_params[rate]
        # The sampler takes whole parameters: gathered once here under train.state_sharding=fsdp.
        params = sharding.gathered(params, mesh)
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
    """The EMA copy `--mode=sample` loads from a training checkpoint (`locate.ema_key`);
    None (the raw parameters) without EMA."""
    rates = state_lib.parse_ema_rates(config.train.ema_rates)
    if not rates:
        return None
    return locate.ema_key(rates, config.sample.ema_rate, where="train.ema_rates")


def _preview_rows(
    config, num_samples: int, mesh, *, per_batch: int | None = None, batch: int = 0
) -> dict[str, np.ndarray]:
    """This process's rows of batch `batch` of a preview of `num_samples` examples drawn
    `per_batch` at a time (default: all at once, padded up to a multiple of the device count):
    example ids batch * per_batch + ..., guidance scale 0 and balanced labels, as `--mode=sample`
    lays out its batches; a super-resolution model upsamples `sample.base_samples` (example i its
    row i mod N, with that row's label), as `--mode=sample` does."""
    per_batch = per_batch or math.ceil(num_samples / mesh.size) * mesh.size
    total = math.ceil(num_samples / per_batch) * per_batch
    local = distributed.local_batch_size(per_batch, mesh)
    ids = batch * per_batch + jax.process_index() * local + np.arange(local)
    rows = {"ids": ids.astype(np.int32), "scales": np.zeros([local], np.float32)}
    if plan_lib.is_super_res(config):
        try:
            low_res, base_labels = plan_lib.load_base_samples(
                config.sample.base_samples, int(config.model.small_size)
            )
            labels = plan_lib.plan_labels(config, total, False, base_labels)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(
                f"the super-resolution training preview (train.sample_every) upsamples "
                f"sample.base_samples; set it or train.sample_every=0: {e}"
            ) from e
        rows["low_res"] = low_res[ids % low_res.shape[0]]
        rows["labels"] = (np.zeros(total, np.int32) if labels is None else labels)[ids]
        return rows
    num_classes = max(int(config.model.num_classes), 1)
    labels = labels_lib.make_labels("balanced", total, num_classes, int(config.sample.seed))
    rows["labels"] = labels[ids]
    return rows


def _check_fid_inputs(config) -> None:
    """`train.fid_every`'s inputs, checked before training starts: a sample count, the reference
    batch and the FID Inception weights."""
    ev = config.eval
    if int(config.train.fid_samples) < 2:
        raise errors.ConfigError(
            f"train.fid_samples={config.train.fid_samples} must be at least 2 (a covariance); "
            "k-diffusion's small-sample FID uses a few thousand"
        )
    for key, what in (
        ("ref_batch", "the reference batch .npz (e.g. VIRTUAL_imagenet64_labeled.npz)"),
        ("inception_weights", "the FID Inception weights (pt_inception-2015-12-05)"),
    ):
        if not ev[key] or not os.path.exists(ev[key]):
            raise errors.MissingInputError(
                f"train.fid_every={config.train.fid_every} scores samples during training "
                f"against eval.ref_batch in the FID Inception's features, but eval.{key}="
                f"{ev[key]!r} {'is not set' if not ev[key] else 'does not exist'}: give {what}, "
                "or set train.fid_every=0"
            )


def make_fid_action(config, mesh):
    """A periodic action (`train.fid_every`): a small-sample FID during training, as k-diffusion
    logs one. `train.fid_samples` examples are drawn by `--mode=sample`'s sampler from the EMA
    copy it would load, unguided, with balanced labels and `sample.batch_size` examples per
    device at a time (example i is example i of a `--mode=sample` run on this step's checkpoint
    with the same settings, so successive evaluations see the same noise), and scored as
    `--mode=evaluate` scores a batch: against eval.ref_batch (its statistics; its activations
    computed once and cached next to it) in eval.inception_weights' features at eval.resize.
    Logged as eval_fid, eval_sfid, eval_inception_score, eval_precision, eval_recall (a small
    sample's FID lies above the 50,000-sample figure: compare it across steps, not with papers).
    """
    _check_fid_inputs(config)
    sampler, _, _ = sampling_lib.build_sampler(
        sampling_lib.config_groups(config), guided=False, mesh=mesh
    )
    num_samples = int(config.train.fid_samples)
    per_batch = int(config.sample.batch_size) * mesh.size
    batches = [
        _preview_rows(config, num_samples, mesh, per_batch=per_batch, batch=b)
        for b in range(math.ceil(num_samples / per_batch))
    ]
    rate = _preview_ema_rate(config)
    scorers = []  # built on process 0 at the first evaluation (the reference's activations)

    def scorer(workdir):
        if not scorers:
            # Imported here: the evaluator's Inception is built only by a run that scores.
            from gdiff.evaluation import scoring

            scorers.append(scoring.evaluate_scorer(config.eval, workdir))
        return scorers[0]

    def action(state: state_lib.TrainState, step: int, log: loop_utils.MetricsLog) -> None:
        params = state.params if rate is None else state.ema_params[rate]
        variables = {"params": sharding.gathered(params, mesh)}
        # Every process draws its rows and joins the gathers; process 0 scores.
        pixels = np.concatenate(
            [
                distributed.to_host(sampler(variables, None, sampler.make_batch(rows)))
                for rows in batches
            ]
        )[:num_samples]
        if jax.process_index() == 0:
            row = scorer(log.workdir)(pixels)
            log.scalars(step, {f"eval_{k}": v for k, v in row.items()})
            logging.info(
                "step %d: FID %.4g of %d samples (sFID %.4g, precision %.3g, recall %.3g)",
                step,
                row["fid"],
                num_samples,
                row["sfid"],
                row["precision"],
                row["recall"],
            )

    return action


def build_task(config, mesh) -> task_lib.Task:
    """Validates the config and describes diffusion training as a `task_lib.Task`."""
    distributed.check_batch_divisible(config.train.batch_size, mesh=mesh)
    if config.model.image_size != config.data.image_size:
        raise ValueError(
            f"model.image_size={config.model.image_size} differs from "
            f"data.image_size={config.data.image_size}"
        )
    model = factory.build_model(config)
    diffusion, schedule_sampler = task_lib.training_diffusion(config)
    periodic = []
    if config.train.sample_every and config.train.sample_every > 0:
        action = make_sample_grid_action(config, mesh)
        periodic.append((int(config.train.sample_every), action))
    if int(config.train.fid_every) > 0:
        periodic.append((int(config.train.fid_every), make_fid_action(config, mesh)))
    return task_lib.Task(
        name="diffusion",
        checkpoint_subdir=locate.training_dir("model"),
        num_steps=int(config.train.num_steps),
        batch_size=int(config.train.batch_size),
        init_params=task_lib.params_initializer(model, config.model.image_size),
        ema_rates=state_lib.parse_ema_rates(config.train.ema_rates),
        sampler_state=schedule_sampler.init_state(),
        train_step=make_train_step(config, model, diffusion, schedule_sampler, mesh.size),
        fingerprint=fingerprint(config),
        random_crop=bool(config.data.random_crop),
        random_flip=bool(config.data.random_flip),
        periodic=periodic,
    )


def train(config, workdir: str, *, mesh=None, stop_at_step: int | None = None) -> dict:
    """Trains the diffusion model; checkpoints go to `<workdir>/checkpoints`.

    Resumes from the newest checkpoint there (or `train.resume_checkpoint`) with the exact step,
    optimiser, EMA, timestep-sampler state, rng stream and data position. `mesh` defaults to all
    devices; `stop_at_step` ends early (with a checkpoint), as a preemption would.

    Returns:
      runner.run's dict: final state, per-step history, start step, whether stopped early.
    """
    return runner.train(config, workdir, build_task, mesh=mesh, stop_at_step=stop_at_step)


__all__ = ["train", "make_train_step", "build_task", "fingerprint"]
