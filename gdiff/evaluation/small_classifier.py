"""A small CNN trained on clean images: the feature network for data sets too small for Inception.

On 8x8 digits an ImageNet Inception sees blurred blobs; a classifier trained on the data itself
gives features in which FID / precision / recall separate good samples from bad ones. Layout:
three 3x3 convs (GroupNorm + ReLU, the last two stride 2) -> global mean -> dense (the "pool"
feature) -> logits. The first conv map, flattened, is the "spatial" feature.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class SmallClassifier(nn.Module):
    """uint8 or float images [N, H, W, C] in 0..255 -> logits [N, num_classes].

    With `features=True` returns dict(pool [N, feature_dim], spatial [N, H*W*spatial_channels],
    logits [N, num_classes]).
    """

    num_classes: int
    width: int = 32
    feature_dim: int = 64
    spatial_channels: int = 4

    @nn.compact
    def __call__(self, images, features: bool = False):
        x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        h = nn.relu(nn.GroupNorm(8, name="norm_0")(nn.Conv(self.width, (3, 3), name="conv_0")(x)))
        # A few channels of the first map keep `spatial` small (sFID's covariance is D2 x D2).
        spatial = h[..., : self.spatial_channels]
        for i, mult in enumerate((2, 4), start=1):
            h = nn.Conv(self.width * mult, (3, 3), strides=(2, 2), name=f"conv_{i}")(h)
            h = nn.relu(nn.GroupNorm(8, name=f"norm_{i}")(h))
        pool = nn.relu(nn.Dense(self.feature_dim, name="dense")(jnp.mean(h, axis=(1, 2))))
        logits = nn.Dense(self.num_classes, name="head")(pool)
        if not features:
            return logits
        return {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1), "logits": logits}


def _check(images, labels, num_classes):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [N] = [{images.shape[0]}]; got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return images, labels.astype(np.int32)


def train_small_classifier(
    images_uint8,
    labels,
    *,
    num_classes: int,
    steps: int = 300,
    batch_size: int = 128,
    seed: int = 0,
    learning_rate: float = 3e-3,
    width: int = 32,
):
    """Trains `SmallClassifier` with Adam on clean images (cross-entropy, random minibatches).

    Args:
      images_uint8: [N, H, W, C] uint8.
      labels: [N] ints in 0..num_classes-1.

    Returns:
      (module, variables) with variables = {"params": ...}.
    """
    images, labels = _check(images_uint8, labels, num_classes)
    module = SmallClassifier(num_classes=num_classes, width=width)
    rng = jax.random.key(seed)
    variables = module.init(rng, jnp.zeros((1, *images.shape[1:]), jnp.float32))
    tx = optax.adam(learning_rate)
    params = variables["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = module.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    sampler = np.random.default_rng(seed)
    batch_size = min(batch_size, len(images))
    for _ in range(steps):
        idx = sampler.choice(len(images), batch_size, replace=False)
        params, opt_state, _ = step(params, opt_state, images[idx], labels[idx])
    return module, {"params": params}


def classifier_accuracy(module, variables, images_uint8, labels, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `module` on [N, H, W, C] images with [N] labels."""
    images, labels = _check(images_uint8, labels, module.num_classes)
    apply = jax.jit(module.apply)
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = np.asarray(apply(variables, images[start : start + batch_size]))
        correct += int(np.sum(np.argmax(logits, -1) == labels[start : start + batch_size]))
    return correct / max(len(images), 1)
