"""The training state: one pytree holding everything a run needs to continue exactly.

Checkpoints store it whole (orbax), so a resumed run continues with the same step, parameters,
EMA copies, optimiser moments, timestep-sampler statistics and random stream. Field names are part
of the checkpoint format (`gdiff.checkpoints.locate.load_params` reads `params` and `ema_params`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """Args/fields:
    step: int32 [] — optimisation steps taken so far (skipped non-finite steps included).
    params: the trained parameters (float32 pytree).
    ema_params: dict rate string ("0.9999") -> parameter pytree; {} when no EMA is kept.
    opt_state: the optax state (its learning rate is injected from `step` every step).
    rng: uint32 [2] raw key data of the run's base key; step keys are `fold_in(rng, step)`, so the
      stream is a pure function of (seed, step) and survives a restart.
    sampler_state: the timestep sampler's arrays (loss history for loss-second-moment; {} for
      uniform), updated from the global batch every step.
    num_skipped: int32 [] — updates skipped because the loss or gradients were not finite.
    nonfinite_streak: int32 [] — consecutive skipped updates (the loop stops when it grows long).
    """

    step: jax.Array
    params: Any
    ema_params: dict[str, Any]
    opt_state: Any
    rng: jax.Array
    sampler_state: Any = flax.struct.field(default_factory=dict)
    num_skipped: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros([], jnp.int32))
    nonfinite_streak: jax.Array = flax.struct.field(
        default_factory=lambda: jnp.zeros([], jnp.int32)
    )

    def step_key(self, *tags: int) -> jax.Array:
        """The typed PRNG key of this step (optionally folded further with `tags`)."""
        key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
        for tag in tags:
            key = jax.random.fold_in(key, tag)
        return key


def parse_ema_rates(text: str) -> list[str]:
    """ "0.9999,0.999" -> ["0.9999", "0.999"] (strings are the checkpoint keys); "" -> []."""
    rates = [r.strip() for r in str(text).split(",") if r.strip()]
    for r in rates:
        value = float(r)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"train.ema_rates entries must lie in [0, 1); got {r!r}")
    if len(set(rates)) != len(rates):
        raise ValueError(f"train.ema_rates has duplicates: {text!r}")
    return rates


def create(
    params: Any, tx, *, rng: jax.Array, ema_rates: list[str], sampler_state: Any = None
) -> TrainState:
    """A fresh state at step 0; every EMA copy starts equal to `params` (as in the reference)."""
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        ema_params={rate: jax.tree.map(jnp.copy, params) for rate in ema_rates},
        opt_state=tx.init(params),
        rng=jax.random.key_data(rng),
        sampler_state={} if sampler_state is None else sampler_state,
    )
