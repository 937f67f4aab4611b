"""Optimiser: AdamW with an optional linear anneal and gradient clipping; micro-batch gradients.

The learning rate is a function of the global step (`learning_rate(config, step)`) written into the
optax state every step (`optax.inject_hyperparams`), so skipped non-finite steps still advance the
anneal exactly like the reference's `_anneal_lr`, and the schedule survives a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate(optim_config, step: jax.Array, num_steps: int) -> jax.Array:
    """lr, or lr * (1 - step / num_steps) with `optim.anneal_lr` (float32 [])."""
    lr = jnp.asarray(optim_config.lr, jnp.float32)
    if optim_config.anneal_lr:
        frac = jnp.clip(step.astype(jnp.float32) / max(int(num_steps), 1), 0.0, 1.0)
        lr = lr * (1.0 - frac)
    return lr


def create_optimizer(optim_config) -> optax.GradientTransformation:
    """optax.adamw (PyTorch AdamW semantics: decoupled decay scaled by lr), clip first if asked."""

    def make(learning_rate):
        parts = []
        if optim_config.grad_clip and optim_config.grad_clip > 0:
            parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
        parts.append(
            optax.adamw(
                learning_rate,
                b1=optim_config.b1,
                b2=optim_config.b2,
                eps=optim_config.eps,
                weight_decay=optim_config.weight_decay,
            )
        )
        return optax.chain(*parts)

    return optax.inject_hyperparams(make)(learning_rate=optim_config.lr)


def set_learning_rate(opt_state: Any, lr: jax.Array) -> Any:
    """Writes `lr` into an `inject_hyperparams` state."""
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hyper)


def check_microbatch(batch_size: int, microbatch: int, num_devices: int) -> int:
    """Number of micro-steps for `train.microbatch` (-1/0: 1). ValueError when it does not fit."""
    if microbatch is None or microbatch <= 0 or microbatch >= batch_size:
        return 1
    if batch_size % microbatch or microbatch % num_devices:
        raise ValueError(
            f"train.microbatch={microbatch} must divide the global batch ({batch_size}) and be a "
            f"multiple of the device count ({num_devices})"
        )
    return batch_size // microbatch


def split_microbatches(tree: Any, num_micro: int, num_devices: int) -> Any:
    """[B, ...] sharded over D devices -> [num_micro, B / num_micro, ...].

    Micro-batch i takes an equal slice of every device's shard (like the reference, where every rank
    splits its own batch), so each micro-step stays data-parallel without moving examples.
    """

    def split(x):
        b = x.shape[0]
        x = x.reshape(num_devices, num_micro, b // (num_devices * num_micro), *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape(num_micro, b // num_micro, *x.shape[3:])

    return jax.tree.map(split, tree)


def accumulate_gradients(
    loss_fn: Callable[[Any, Any, int], tuple[jax.Array, Any]],
    params: Any,
    batch: Any,
    num_micro: int,
    num_devices: int,
) -> tuple[jax.Array, Any, Any]:
    """Mean loss, its gradient, and per-example aux over the whole batch, `num_micro` at a time.

    `loss_fn(params, micro_batch, micro_index) -> (scalar mean loss, aux pytree with leading [b])`.
    With one micro-step this is `value_and_grad`; otherwise a `lax.scan` sums gradients of
    equal-size micro-batches and divides by their number (= the gradient of the global mean).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, aux), grads = grad_fn(params, batch, 0)
        return loss, grads, aux
    micro = split_microbatches(batch, num_micro, num_devices)

    def body(carry, xs):
        loss_sum, grad_sum = carry
        i, mb = xs
        (loss, aux), grads = grad_fn(params, mb, i)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), aux = jax.lax.scan(
        body, (jnp.zeros([], jnp.float32), zeros), (jnp.arange(num_micro), micro)
    )
    grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
    # Undo the micro split so aux lines up with the original batch order.
    aux = jax.tree.map(lambda a: _unsplit(a, num_devices), aux)
    return loss_sum / num_micro, grads, aux


def _unsplit(x: jax.Array, num_devices: int) -> jax.Array:
    n, m = x.shape[:2]
    x = x.reshape(n, num_devices, m // num_devices, *x.shape[2:])
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(n * m, *x.shape[3:])
