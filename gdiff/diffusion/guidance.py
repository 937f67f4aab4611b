"""Guidance for the diffusion samplers.

Classifier guidance (Dhariwal & Nichol 2021): the gradient of a noise-aware classifier's
log-probability of the target label, as a `cond_fn`. Below it, the guidance kinds that came after
the paper, which guide the network's output instead, and guidance intervals for both.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def classifier_cond_fn(
    classifier_apply: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray], y, scale
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """Builds cond_fn(x, ts) = scale * d/dx sum_i log_softmax(classifier_apply(x, ts))[i, y_i].

    Args:
      classifier_apply: (x [B, H, W, C], ts [B]) -> logits [B, K] (closes over its params).
      y: int labels [B].
      scale: a scalar or a per-example [B] array (so that one compiled run can sweep scales).
    Returns:
      cond_fn(x, ts) -> [B, H, W, C] float32. Examples are independent in the classifier, so the
      gradient of the summed log-probabilities gives each example its own gradient.
    """
    y = jnp.asarray(y, jnp.int32)

    def cond_fn(x, ts):
        x = jnp.asarray(x)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels y have shape {y.shape}, expected [B] = ({x.shape[0]},)")

        def selected_log_prob(x_in):
            logits = classifier_apply(x_in, ts)
            # Float32 softmax even for a bfloat16 classifier: guidance gradients are small.
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

        grad = jax.grad(selected_log_prob)(x).astype(jnp.float32)
        s = jnp.asarray(scale, jnp.float32)
        if s.ndim == 1:
            if s.shape[0] != x.shape[0]:
                raise ValueError(f"scale has shape {s.shape}, expected a scalar or [B]")
            s = s.reshape((-1,) + (1,) * (x.ndim - 1))
        elif s.ndim != 0:
            raise ValueError(f"scale has shape {s.shape}, expected a scalar or [B]")
        return s * grad

    return cond_fn


# ----------------------------------------------------------------- guidance beyond the classifier
#
# Classifier-free guidance (Ho & Salimans 2022), two-network guidance (EDM2's unconditional
# guide), autoguidance (Karras et al. 2024) and guidance intervals (Kynkaanniemi et al. 2024) act
# on the network's OUTPUT, not on a gradient: a guided prediction extrapolates from a "guide"
# prediction u (the null label of the same network, or a second network) towards the model's
# conditional prediction c with weight w:
#
#     guided = u + w (c - u)        w = 1: c alone (no guidance); w = 0: u alone
#
# (EDM2's convention; Ho & Salimans' weight is w - 1.) The functions below are pure and per row,
# so that rows of one batch can carry different kinds, weights and intervals in one program.

# What a row's guide prediction u is (`guide_kinds` of a sampling batch).
GUIDE_NONE = 0  # no output guidance (classifier guidance alone, or none)
GUIDE_NULL_LABEL = 1  # classifier-free: the same network given the null label
GUIDE_NETWORK = 2  # a second network: an unconditional model, or a weaker one (autoguidance)


def _rows(a: jax.Array, like: jax.Array) -> jax.Array:
    """A per-row [B] array broadcast against [B, ...] `like`."""
    return jnp.reshape(a, (-1,) + (1,) * (like.ndim - 1))


def lerp_exact(u: jax.Array, c: jax.Array, w: jax.Array) -> jax.Array:
    """u + w (c - u), per row w [B], computed so that w = 0 gives u, w = 1 gives c and u == c
    gives c bit for bit (std::lerp's two-sided form: the end nearer to w is the base)."""
    w = _rows(w.astype(jnp.float32), c)
    d = c - u
    return jnp.where(w < 0.5, u + w * d, c + (w - 1.0) * d)


def combine_outputs(cond: jax.Array, guide: jax.Array, w: jax.Array, channels: int) -> jax.Array:
    """A guided raw network output from the conditional and the guide outputs [B, H, W, C'].

    The first `channels` (the noise, or x_0 for an x_0-predicting model: the two are affine in
    each other at fixed x_t, so guiding either is the same) are extrapolated with w [B]. Learned
    variance channels (C' = 2 * channels) are interpolated with w clipped to [0, 1]: the guide's
    at w <= 0, the conditional's at w >= 1 (GLIDE keeps the conditional's there), never
    extrapolated past either network's own variance.
    """
    cond, guide = cond.astype(jnp.float32), guide.astype(jnp.float32)
    mean = lerp_exact(guide[..., :channels], cond[..., :channels], w)
    if cond.shape[-1] == channels:
        return mean
    var = lerp_exact(guide[..., channels:], cond[..., channels:], jnp.clip(w, 0.0, 1.0))
    return jnp.concatenate([mean, var], axis=-1)


def noise_level_fn(diffusion) -> Callable[[jax.Array], jax.Array]:
    """sigma(ts) [B] float32: the noise level sqrt((1 - abar) / abar) at the model timesteps ts.

    `ts` as the network sees them (CONTRACT.md section 4: original steps, rescaled to 0..1000
    with `rescale_timesteps`; the DPM-Solver's are fractional). log(abar) is interpolated
    linearly between the chain's steps, which is the solver's own discrete schedule (linear in
    log alpha) and exact at the steps themselves. This is EDM's sigma, the unit in which guidance
    intervals are published (Kynkaanniemi et al. 2024), whatever the sampler.
    """
    steps = np.asarray(getattr(diffusion, "timestep_map", np.arange(diffusion.num_timesteps)))
    original = int(getattr(diffusion, "original_num_steps", diffusion.num_timesteps))
    log_abar = np.log(np.asarray(diffusion.alphas_cumprod, np.float64))
    xp, fp = jnp.asarray(steps, jnp.float32), jnp.asarray(log_abar, jnp.float32)
    per_step = np.float32(original / 1000.0) if diffusion.rescale_timesteps else None

    def sigma(ts):
        k = jnp.asarray(ts, jnp.float32)
        if per_step is not None:
            k = k * per_step
        return jnp.sqrt(jnp.expm1(-jnp.interp(k, xp, fp)))

    return sigma


def in_interval(sigma: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """bool [B]: whether each row's noise level lies in its guidance interval (lo, hi]."""
    return (sigma > lo) & (sigma <= hi)


class IntervalCondFn:
    """A classifier-guidance cond_fn applied only inside each row's noise-level interval.

    Calling it gives the scaled gradient where `active(ts)` holds and 0 elsewhere; the gradient
    is not computed at all (a `lax.cond`) when no row needs it, so a step outside every interval
    costs an unguided step. `active` lets the DDIM step keep an inactive row's unguided
    prediction exactly (`GaussianDiffusion._guided_prediction`), where a zero gradient would
    still re-derive x_0 through the noise.
    """

    def __init__(self, cond_fn, active, scales):
        """Args:
        cond_fn: cond_fn(x, ts) -> scaled gradient [B, H, W, C] (`classifier_cond_fn`).
        active: active(ts [B]) -> bool [B], whether each row is guided at ts.
        scales: [B] each row's classifier scale (0: no gradient needed).
        """
        self._cond_fn, self.active, self._scales = cond_fn, active, scales

    def __call__(self, x, ts):
        active = self.active(ts)
        needed = jnp.any(active & (self._scales != 0))
        gradient = jax.lax.cond(
            needed,
            lambda: self._cond_fn(x, ts).astype(jnp.float32),
            lambda: jnp.zeros(x.shape, jnp.float32),
        )
        return jnp.where(_rows(active, gradient), gradient, 0.0)


def guided_model_fn(model_fn, guides: dict, rows: dict, active, channels: int):
    """model_fn(x, ts) with output guidance per row (`combine_outputs`).

    Args:
      model_fn: the conditional network, model_fn(x [B,H,W,C], ts [B]) -> raw output.
      guides: {GUIDE_NULL_LABEL or GUIDE_NETWORK: fn(x, ts) -> raw output} the program has.
      rows: per-row arrays `guide_kinds` int32 [B] and `guide_scales` float32 [B] (w).
      active: active(ts) -> bool [B] (the rows' guidance intervals), or None (every step).
      channels: image channels C.

    A guide network is evaluated only when some row needs it at this step (a `lax.cond`): rows
    of other kinds, rows at w = 1 and rows outside their interval take the conditional output
    unchanged, bit for bit.
    """
    kinds, w = rows["guide_kinds"], rows["guide_scales"]

    def fn(x, ts):
        cond = model_fn(x, ts).astype(jnp.float32)
        use = (kinds != GUIDE_NONE) & (w != 1.0)
        if active is not None:
            use = use & active(ts)
        guide = cond
        for kind, guide_fn in guides.items():
            out = jax.lax.cond(
                jnp.any(use & (kinds == kind)),
                lambda g=guide_fn: g(x, ts).astype(jnp.float32),
                lambda: cond,
            )
            guide = jnp.where(_rows(use & (kinds == kind), out), out, guide)
        return combine_outputs(cond, guide, jnp.where(use, w, 1.0), channels)

    return fn
