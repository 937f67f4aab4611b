"""--mode=train_classifier: the noise-aware classifier (the reference's `classifier_train.py`).

Each step noises the (randomly cropped and flipped) images to a sampled timestep with q_sample and
trains the classifier with cross-entropy at that timestep, so that its gradient can guide sampling
at every noise level. Logged: loss, top-1/top-5 accuracy overall and per timestep quartile; a
held-out split is evaluated every `train.eval_every` steps the same way (fixed examples, fixed
noise, so the curve is comparable across evaluations). No EMA, as in the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from absl import logging

from gdiff import distributed, factory, xla_options
from gdiff.checkpoints import locate
from gdiff.data import pipeline
from gdiff.train import loop_utils, optim, runner, sharding, update
from gdiff.train import state as state_lib
from gdiff.train import task as task_lib


def fingerprint(config) -> dict:
    """What a classifier training checkpoint depends on (a resume with other values is refused)."""
    return task_lib.fingerprint(
        config,
        "classifier",
        classifier=config.classifier.to_dict(),
        noised=bool(config.train.classifier_noised),
    )


def noised_inputs(config, diffusion, sampler, sampler_state, rng, batch: dict) -> dict:
    """The classifier's inputs: dict(x = x_t [B, H, W, C], t [B], y [B]).

    With `train.classifier_noised`, x_t = q_sample(image, t, noise) with t ~ the timestep sampler
    and Gaussian noise, drawn once for the whole batch as classifier_train.py does, unless the
    batch carries recorded `t` [B] / `noise` [B, H, W, C] (a replayed reference step); without
    it, the clean images at t = 0.
    """
    x, b = batch["image"], batch["image"].shape[0]
    if not config.train.classifier_noised:
        return {"x": x, "t": jnp.zeros([b], jnp.int32), "y": batch["label"]}
    k_t, k_noise = jax.random.split(rng)
    if "t" in batch:
        t = batch["t"].astype(jnp.int32)
    else:
        t, _ = sampler.sample(sampler_state, k_t, b)
    if "noise" in batch:
        noise = batch["noise"].astype(x.dtype)
    else:
        noise = jax.random.normal(k_noise, x.shape, x.dtype)
    return {"x": diffusion.q_sample(x, t, noise), "t": t, "y": batch["label"]}


def _per_example(logits, labels):
    """Per-example cross-entropy, top-1 and top-5 hits (float32 [B] each)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    hits = top == labels[:, None]
    return {
        "loss": loss,
        "acc@1": hits[:, 0].astype(jnp.float32),
        "acc@5": jnp.any(hits, axis=-1).astype(jnp.float32),
    }


def _summaries(prefix: str, terms: dict, t, num_t: int) -> dict:
    out = {}
    for key, values in terms.items():
        out[f"{prefix}_{key}"] = jnp.mean(values)
        out.update(loop_utils.quartile_sums(f"{prefix}_{key}", values, t, num_t))
    return out


def make_gradient_fn(config, classifier, num_devices: int):
    """The pure loss-and-gradient part of a step: `grad_fn(params, inputs) -> (loss, grads,
    terms)` for `noised_inputs`' dict; loss the mean cross-entropy (micro-batches weighted by
    their share of the batch, as classifier_train.py's `loss * len(sub_batch) / len(batch)`),
    terms per-example loss and top-1/top-5 hits [B]."""
    batch_size = config.train.classifier_batch_size
    num_micro = optim.check_microbatch(batch_size, config.train.microbatch, num_devices)

    def loss_fn(params, mb, i, carry):
        del i
        logits = classifier.apply({"params": params}, mb["x"], mb["t"])
        terms = _per_example(logits, mb["y"])
        return jnp.mean(terms["loss"]), (terms, carry)

    def grad_fn(params, inputs):
        loss, grads, terms, _ = optim.accumulate_gradients(
            loss_fn, params, inputs, num_micro, num_devices
        )
        return loss, grads, terms

    return grad_fn


def make_train_step(config, classifier, diffusion, sampler, num_devices: int):
    """The pure step `(TrainState, dict(image [B,H,W,C], label [B])) -> (TrainState, metrics)`.

    The learning rate follows classifier_train.py: annealed before each step, so step k uses
    `optim.learning_rate(..., anneal_after_step=False)`.
    """
    num_t = int(diffusion.num_timesteps)
    tx = optim.create_optimizer(config.optim)
    grad_fn = make_gradient_fn(config, classifier, num_devices)

    def train_step(state: state_lib.TrainState, batch: dict):
        inputs = noised_inputs(
            config, diffusion, sampler, state.sampler_state, state.step_key(), batch
        )
        loss, grads, terms = grad_fn(state.params, inputs)
        lr = optim.learning_rate(
            config.optim,
            state.step,
            config.train.classifier_num_steps,
            anneal_after_step=False,
        )
        new_state, metrics = update.apply_update(
            state, tx, grads, loss, lr, sampler_state=state.sampler_state
        )
        metrics["loss"] = loss
        metrics.update(_summaries("train", terms, inputs["t"], num_t))
        return new_state, metrics

    return train_step


def make_eval_action(config, classifier, diffusion, sampler, mesh):
    """A periodic action: `train.eval_batches` held-out batches -> val_loss, val_acc@1/5 (+ q*)."""
    repl, batch_sh = distributed.replicated(mesh), distributed.batch_sharding(mesh)
    num_t = int(diffusion.num_timesteps)
    batch_size = config.train.classifier_batch_size

    def eval_step(params, sampler_state, batch, index):
        rng = jax.random.fold_in(jax.random.key(config.seed + 1), index)
        inputs = noised_inputs(config, diffusion, sampler, sampler_state, rng, batch)
        logits = classifier.apply({"params": params}, inputs["x"], inputs["t"])
        return _summaries("val", _per_example(logits, inputs["y"]), inputs["t"], num_t)

    eval_fn = jax.jit(
        eval_step,
        in_shardings=(repl, repl, batch_sh, repl),
        out_shardings=repl,
        compiler_options=xla_options.compiler_options(),
    )

    def action(state: state_lib.TrainState, step: int, log: loop_utils.MetricsLog) -> None:
        batches = pipeline.local_batches(
            config, global_batch_size=batch_size, mesh=mesh, train=False
        )
        # Every batch's metrics stay on the device until all are dispatched, then come back in
        # one transfer (as the training metrics do), so the host never waits between batches.
        outputs = []
        # The evaluation takes whole parameters: gathered once under train.state_sharding=fsdp.
        params = sharding.gathered(state.params, mesh)
        for i in range(int(config.train.eval_batches)):
            batch = pipeline.to_global(next(batches), mesh)
            outputs.append(eval_fn(params, state.sampler_state, batch, jnp.int32(i)))
        acc = loop_utils.MetricAccumulator()
        for m in distributed.host_copy(outputs):
            # Quartile sums add up over batches; plain means are per batch of equal size.
            acc.add(m)
        result = acc.result()
        log.scalars(step, result)
        logging.info(
            "step %d: held-out loss %.4f, top-1 %.3f", step, result["val_loss"], result["val_acc@1"]
        )

    return action


def build_task(config, mesh) -> task_lib.Task:
    batch_size = int(config.train.classifier_batch_size)
    distributed.check_batch_divisible(batch_size, "train.classifier_batch_size", mesh=mesh)
    classifier = factory.build_classifier(config)
    diffusion, sampler = task_lib.training_diffusion(config)
    periodic = []
    if config.train.eval_every and config.train.eval_every > 0:
        periodic.append(
            (
                int(config.train.eval_every),
                make_eval_action(config, classifier, diffusion, sampler, mesh),
            )
        )
    return task_lib.Task(
        name="classifier",
        checkpoint_subdir=locate.training_dir("classifier"),
        num_steps=int(config.train.classifier_num_steps),
        batch_size=batch_size,
        init_params=task_lib.params_initializer(classifier, config.data.image_size),
        ema_rates=[],
        # The reference never updates a loss-aware sampler while training the classifier.
        sampler_state=sampler.init_state(),
        train_step=make_train_step(config, classifier, diffusion, sampler, mesh.size),
        fingerprint=fingerprint(config),
        # The reference trains its classifiers with random crops (and flips) always.
        random_crop=True,
        random_flip=bool(config.data.random_flip),
        periodic=periodic,
    )


def train(config, workdir: str, *, mesh=None, stop_at_step: int | None = None) -> dict:
    """Trains the noise-aware classifier; checkpoints go to `<workdir>/classifier_checkpoints`.

    Same resume, preemption and logging behaviour as the diffusion trainer.
    """
    return runner.train(config, workdir, build_task, mesh=mesh, stop_at_step=stop_at_step)
