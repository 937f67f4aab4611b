"""Classifier guidance (Dhariwal & Nichol 2021): the gradient of a noise-aware classifier's
log-probability of the target label, as a `cond_fn` for the diffusion samplers."""

from collections.abc import Callable

import jax
import jax.numpy as jnp


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
