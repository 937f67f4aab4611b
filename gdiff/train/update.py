"""The update rule both trainers share: one optimiser + EMA step, skipped whole when non-finite.

A step whose loss or gradient norm is not finite changes nothing but the counters: parameters, EMA
copies, optimiser moments and the timestep sampler's statistics keep their old values, while the
step (and with it the data position, the rng stream and the learning-rate anneal) moves on. The
loop stops the run when such steps keep coming (`train.max_nonfinite_steps`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gdiff.train import optim
from gdiff.train import state as state_lib


def update_ema(ema_params: dict[str, Any], params: Any) -> dict[str, Any]:
    """ema <- rate * ema + (1 - rate) * params, for every rate (the reference's `update_ema`)."""
    return {
        rate: jax.tree.map(lambda e, p, r=float(rate): r * e + (1.0 - r) * p, ema, params)
        for rate, ema in ema_params.items()
    }


def apply_update(
    state: state_lib.TrainState,
    tx: optax.GradientTransformation,
    grads: Any,
    loss: jax.Array,
    lr: jax.Array,
    *,
    sampler_state: Any,
) -> tuple[state_lib.TrainState, dict]:
    """One optimiser + EMA step, or none when the loss/gradients are not finite.

    Args:
      state: the state before the step.
      tx: the optimiser of `optim.create_optimizer` (its learning rate is set to `lr`).
      grads: gradients of the mean loss, shaped like `state.params`.
      loss: the scalar mean loss of the step.
      lr: the learning rate of this step (float32 []).
      sampler_state: the timestep sampler's state after this step (kept only if finite).

    Returns:
      The new state (step always advances, so the data and rng streams move on) and the shared
      metrics: lr, grad_norm, param_norm, finite, num_skipped, nonfinite_streak.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    opt_state = optim.set_learning_rate(state.opt_state, lr)
    # Zero gradients keep the arithmetic finite in the branch that is thrown away.
    safe = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, new_opt = tx.update(safe, opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = update_ema(state.ema_params, new_params)

    def pick(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=pick(new_params, state.params),
        ema_params=pick(new_ema, state.ema_params),
        opt_state=pick(new_opt, opt_state),
        sampler_state=pick(sampler_state, state.sampler_state),
        num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
    )
    metrics = {
        "lr": lr,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(new_state.params),
        "finite": finite.astype(jnp.float32),
        "num_skipped": new_state.num_skipped,
        "nonfinite_streak": new_state.nonfinite_streak,
    }
    return new_state, metrics
