"""Timestep samplers for training (the reference's `resample.py`), as pure functions of array state.

A sampler draws t [B] with importance weights [B] (the loss is multiplied by the weights, so the
objective's expectation does not change). The loss-aware sampler keeps a per-timestep loss history
as arrays: `update` takes the GLOBAL batch (timesteps and losses all-gathered over devices and
hosts), so every replica computes the same new state, and everything has fixed shapes, so it runs
inside a jitted train step.
"""

import jax
import jax.numpy as jnp


class UniformSampler:
    """t ~ Uniform{0..T-1}, every weight 1. Its state is an empty dict."""

    def __init__(self, diffusion):
        self.num_timesteps = int(diffusion.num_timesteps)

    def init_state(self) -> dict:
        return {}

    def weights(self, state: dict) -> jnp.ndarray:
        """Unnormalised sampling weights [T]."""
        del state
        return jnp.ones((self.num_timesteps,), jnp.float32)

    def sample(self, state: dict, rng, batch_size: int):
        """Returns (t int32 [B], weights float32 [B])."""
        return self.from_uniform(state, jax.random.uniform(rng, (batch_size,)))

    def from_uniform(self, state: dict, u):
        """t = floor(u * T) for u [B] uniform in [0, 1): (t int32 [B], weights float32 [B] = 1)."""
        del state
        t = jnp.clip(jnp.floor(u * self.num_timesteps), 0, self.num_timesteps - 1)
        return t.astype(jnp.int32), jnp.ones(u.shape, jnp.float32)

    def importance_weights(self, state: dict, t):
        """The loss weights [B] of given timesteps t [B]: all 1."""
        del state
        return jnp.ones(jnp.shape(t), jnp.float32)

    def update(self, state: dict, t, losses) -> dict:
        del t, losses
        return state


class LossSecondMomentResampler:
    """Samples t proportionally to sqrt(E[loss_t^2]) over the last `history_per_term` losses of
    each timestep, mixed with `uniform_prob` of uniform mass (Nichol & Dhariwal 2021, sec. 3.3).

    Until every timestep has a full history it samples uniformly (the warm-up).
    State: dict(history float32 [T, history_per_term], counts int32 [T]).
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = int(diffusion.num_timesteps)
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)

    def init_state(self) -> dict:
        return {
            "history": jnp.zeros((self.num_timesteps, self.history_per_term), jnp.float32),
            "counts": jnp.zeros((self.num_timesteps,), jnp.int32),
        }

    def weights(self, state: dict) -> jnp.ndarray:
        """Sampling weights [T] (normalised once warmed up, all ones before)."""
        w = jnp.sqrt(jnp.mean(jnp.square(state["history"]), axis=-1))
        w = w / jnp.sum(w)
        w = w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        warmed_up = jnp.all(state["counts"] == self.history_per_term)
        return jnp.where(warmed_up, w, jnp.ones_like(w))

    def sample(self, state: dict, rng, batch_size: int):
        """Importance-samples (t int32 [B], weights float32 [B] = 1 / (T p_t))."""
        return self.from_uniform(state, jax.random.uniform(rng, (batch_size,)))

    def from_uniform(self, state: dict, u):
        """Inverse-CDF sampling: t = the first timestep whose cumulative probability exceeds u.

        Args:
          u: float [B], uniform in [0, 1) (drawn once per step for the whole batch, so a batch
            split into micro-batches, each sampling from the state its predecessors updated, uses
            the same random numbers as the unsplit batch).

        Returns:
          (t int32 [B], weights float32 [B] = 1 / (T p_t)).
        """
        p = self._probabilities(state)
        cdf = jnp.cumsum(p)
        t = jnp.searchsorted(cdf, u * cdf[-1], side="right")
        t = jnp.clip(t, 0, self.num_timesteps - 1).astype(jnp.int32)
        return t, self.importance_weights(state, t)

    def importance_weights(self, state: dict, t):
        """The loss weights [B] = 1 / (T p_t) of given timesteps t [B] (a replayed draw)."""
        p = self._probabilities(state)
        return (1.0 / (self.num_timesteps * p[t])).astype(jnp.float32)

    def _probabilities(self, state: dict) -> jnp.ndarray:
        w = self.weights(state)
        return w / jnp.sum(w)

    def update(self, state: dict, t, losses) -> dict:
        """Appends each (t_j, loss_j) of the GLOBAL batch to t_j's history, in batch order.

        Equivalent to the reference's loop (append while a history is short, else shift out the
        oldest): the new history of a timestep is the last `history_per_term` entries of its old
        entries followed by this batch's losses for it, in order. Done as one scatter: the j-th
        example lands at position counts[t_j] + (its rank among earlier equal t's), minus the
        number of entries that overflow that timestep's window.

        Args:
          t: int [N] timesteps; losses: [N] (detached) per-example losses.
        """
        t = jnp.asarray(t, jnp.int32).reshape(-1)
        losses = jnp.asarray(losses, jnp.float32).reshape(-1)
        if t.shape != losses.shape:
            raise ValueError(f"t {t.shape} and losses {losses.shape} must have one length")
        hist_len, num_t = self.history_per_term, self.num_timesteps
        history, counts = state["history"], state["counts"]

        same = t[:, None] == t[None, :]
        # rank[j] = how many earlier examples of the batch share t[j]: its order of arrival.
        rank = jnp.sum(jnp.tril(same, k=-1), axis=1)
        new_per_t = jnp.zeros((num_t,), jnp.int32).at[t].add(1)
        total = counts + new_per_t  # entries ever seen, old + new
        shift = jnp.maximum(total - hist_len, 0)  # how many fall out of the window per timestep

        # Old entries move left by `shift`; slots past the surviving old entries are refilled below.
        slots = jnp.arange(hist_len)[None, :]
        src = slots + shift[:, None]
        keep_old = src < counts[:, None]
        shifted = jnp.take_along_axis(history, jnp.minimum(src, hist_len - 1), axis=1)
        history = jnp.where(keep_old, shifted, history)

        pos = counts[t] + rank - shift[t]
        # Entries shifted out by later ones in this same batch are dropped (index out of range).
        pos = jnp.where(pos >= 0, pos, hist_len)
        history = history.at[t, pos].set(losses, mode="drop")
        return {"history": history, "counts": jnp.minimum(total, hist_len).astype(jnp.int32)}


def create_named_schedule_sampler(name: str, diffusion):
    """ "uniform" -> UniformSampler; "loss-second-moment" -> LossSecondMomentResampler."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(
        f"unknown schedule sampler: {name!r} (expected 'uniform' or 'loss-second-moment')"
    )
