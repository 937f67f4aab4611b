"""Optimiser: AdamW with an optional linear anneal and gradient clipping; micro-batch gradients.

The learning rate is a function of the global step (`learning_rate(config, step, ...)`, annealed
at the moment each reference script anneals) written into the optax state every step
(`optax.inject_hyperparams`), so skipped non-finite steps still advance the anneal exactly like the
reference's `_anneal_lr`, and the schedule survives a restart. The optimiser is `optax.adamw`,
PyTorch's AdamW step for step; `with_adam_moments` loads a PyTorch run's moments into it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate(
    optim_config, step: jax.Array, num_steps: int, *, anneal_after_step: bool
) -> jax.Array:
    """The learning rate of optimisation step `step` (0-based; float32 []).

    Without `optim.anneal_lr` it is `optim.lr`. With it, lr * (1 - frac), where the two reference
    scripts compute frac at different moments, and gdiff follows each:
      anneal_after_step=False (classifier_train.py): set before step k, frac = k / num_steps;
      anneal_after_step=True (the diffusion TrainLoop's `_anneal_lr`): set after step k - 1 from
        its own count, frac = (k - 1) / num_steps, so steps 0 and 1 both use the base rate.
    """
    lr = jnp.asarray(optim_config.lr, jnp.float32)
    if optim_config.anneal_lr:
        done = jnp.asarray(step, jnp.float32)
        if anneal_after_step:
            done = jnp.maximum(done - 1.0, 0.0)
        frac = jnp.clip(done / max(int(num_steps), 1), 0.0, 1.0)
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


def with_adam_moments(opt_state: Any, *, count: int, mu: Any, nu: Any) -> Any:
    """`opt_state` of `create_optimizer` with Adam's step count and moments replaced.

    Args:
      opt_state: the optax state (any chain around one `scale_by_adam`).
      count: steps taken (PyTorch's per-parameter `step`); the bias corrections use it.
      mu, nu: first and second moments (PyTorch's `exp_avg`, `exp_avg_sq`), shaped like params.
    """
    found = []

    def swap(node):
        if isinstance(node, optax.ScaleByAdamState):
            found.append(node)
            return optax.ScaleByAdamState(count=jnp.asarray(count, node.count.dtype), mu=mu, nu=nu)
        return node

    out = jax.tree.map(swap, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    if len(found) != 1:
        raise ValueError(f"expected one Adam state in the optimiser state, found {len(found)}")
    # inject_hyperparams counts steps too; keep it equal to a run that took them.
    return out._replace(count=jnp.asarray(count, out.count.dtype))


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
    loss_fn: Callable[[Any, Any, int, Any], tuple[jax.Array, tuple[Any, Any]]],
    params: Any,
    batch: Any,
    num_micro: int,
    num_devices: int,
    carry: Any = None,
) -> tuple[jax.Array, Any, Any, Any]:
    """Mean loss, its gradient, per-example aux and a carried state over the whole batch,
    `num_micro` micro-batches at a time.

    `loss_fn(params, micro_batch, micro_index, carry) -> (scalar mean loss, (aux pytree with
    leading [b], new carry))`; the carry threads through the micro-batches in order (the
    diffusion trainer's timestep sampler, which the reference updates after every micro-batch).
    With one micro-step this is `value_and_grad`; otherwise a `lax.scan` sums gradients of
    equal-size micro-batches and divides by their number (= the gradient of the global mean).

    Returns:
      (loss, grads, aux in the original batch order, final carry).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, (aux, carry)), grads = grad_fn(params, batch, 0, carry)
        return loss, grads, aux, carry
    micro = split_microbatches(batch, num_micro, num_devices)

    def body(acc, xs):
        loss_sum, grad_sum, carry = acc
        i, mb = xs
        (loss, (aux, carry)), grads = grad_fn(params, mb, i, carry)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), carry), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum, carry), aux = jax.lax.scan(
        body, (jnp.zeros([], jnp.float32), zeros, carry), (jnp.arange(num_micro), micro)
    )
    grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
    # Undo the micro split so aux lines up with the original batch order.
    aux = jax.tree.map(lambda a: _unsplit(a, num_devices), aux)
    return loss_sum / num_micro, grads, aux, carry


def _unsplit(x: jax.Array, num_devices: int) -> jax.Array:
    n, m = x.shape[:2]
    x = x.reshape(n, num_devices, m // num_devices, *x.shape[2:])
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(n * m, *x.shape[3:])
