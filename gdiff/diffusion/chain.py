"""The one loop over a diffusion chain, and the per-step noise streams the loops replay.

Every whole-chain computation is this loop with a different step: ancestral and DDIM sampling
(`GaussianDiffusion.p_sample_loop`, `ddim_sample_loop`, the compiled sampler's
`sampling.sampler.sample_chain`), DDIM inversion (`ddim_reverse_sample_loop`, t = 0 .. T-1) and the
variational bound (`calc_bpd_loop`). Where the randomness comes from is the caller's choice, passed
as `noise_fn(index)`: keys split up front (the public loops), a replayed stream, or per-example
keys folded with the index (the sampler), so the loop itself never touches an rng.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

# step(x [B, ...], t [B] int32, noise [B, ...] or None) -> dict(sample [B, ...], ...).
Step = Callable[[jax.Array, jax.Array, jax.Array | None], dict[str, jax.Array]]
# noise_fn(index: scalar int32 chain index) -> the noise [B, ...] that step `index` draws.
NoiseFn = Callable[[jax.Array], jax.Array]

# What the sampling loops stack with return_trajectory.
TRAJECTORY = ("sample", "pred_xstart")


def scan_chain(
    step: Step,
    x_init: jax.Array,
    num_steps: int,
    noise_fn: NoiseFn | None = None,
    *,
    reverse: bool = True,
    collect: Sequence[str] = (),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs `step` once per chain index as a single `jax.lax.scan`, carrying x.

    Args:
      step: step(x [B, ...], t [B] int32, noise) -> dict with `sample`, the next x, and whatever
        else the caller collects.
      x_init: [B, ...] the first step's x: x_T when reverse, x_0 for DDIM inversion.
      num_steps: T, the (respaced) chain length.
      noise_fn: noise_fn(index) -> the noise [B, ...] step `index` uses (index is the scalar int32
        chain index, as passed to every example's t); None for a deterministic chain (step gets
        None).
      reverse: t = T-1 .. 0 (sampling, the bound) or t = 0 .. T-1 (DDIM inversion).
      collect: names of step outputs to stack over the steps.

    Returns:
      (x_final [B, ...] float32, {name: [T, ...] float32}), the stacks in step order.
    """
    x_init = jnp.asarray(x_init, jnp.float32)
    batch = x_init.shape[0]
    if reverse:
        indices = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
    else:
        indices = jnp.arange(num_steps, dtype=jnp.int32)

    def body(x, index):
        t = jnp.full((batch,), index, jnp.int32)
        out = step(x, t, None if noise_fn is None else noise_fn(index))
        # float32 carry and outputs whatever the model computes in: the scan's carry type is fixed.
        return out["sample"].astype(jnp.float32), {k: out[k].astype(jnp.float32) for k in collect}

    return jax.lax.scan(body, x_init, indices)


def step_noise_fn(
    shape: Sequence[int],
    num_steps: int,
    *,
    key: jax.Array | None = None,
    stream=None,
    name: str = "step_noise",
    hint: str = "",
) -> NoiseFn:
    """The noise_fn of a reverse chain (t = T-1 .. 0): drawn from `key` or replayed from `stream`.

    Args:
      shape: [B, ...] the shape of one step's noise.
      num_steps: T.
      key: a `jax.random.key`, split into T keys up front (step k draws from key k, so a draw never
        depends on earlier ones); used when `stream` is None.
      stream: [T, B, ...] one draw per step, in call order (the first is used at t = T-1).
      name, hint: how an error message names `stream`, and what it adds.

    Returns:
      noise_fn(index) -> float32 [B, ...] for chain index `index`.
    """
    shape = tuple(shape)
    if stream is not None:
        per_step = jnp.asarray(stream, jnp.float32)
        if per_step.shape != (num_steps, *shape):
            raise ValueError(
                f"{name} has shape {per_step.shape}, expected {(num_steps, *shape)}{hint}"
            )
        return lambda index: per_step[num_steps - 1 - index]
    keys = jax.random.split(key, num_steps)
    return lambda index: jax.random.normal(keys[num_steps - 1 - index], shape, jnp.float32)
