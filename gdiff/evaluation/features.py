"""Feature networks for the sample-quality metrics, behind one small interface.

A `FeatureExtractor` maps uint8 images [N, H, W, 3] to dict(pool [N, D], spatial [N, D2],
probs [N, K]): `pool` feeds FID and precision/recall, `spatial` sFID, `probs` the Inception Score.
`InceptionExtractor` is the ADM evaluator's network; `ClassifierExtractor` wraps a small CNN
trained on clean images (`small_classifier.py`) for data sets too small for Inception to mean
anything (8x8 digits). Both run batched and sharded over every local device on a one-axis mesh;
the last batch is padded and the padding dropped.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gdiff import progress
from gdiff.evaluation import inception
from gdiff.evaluation import resize as resize_lib

INCEPTION_SIZE = 299
MESH_AXIS = "data"


def preprocess_for_inception(images, resize: str = "legacy"):
    """What the evaluator's graph does to its input: float32 0..255 -> bilinear to 299x299 ->
    (x - 128) * 0.0078125 (NOT pytorch-fid's 2x/255 - 1).

    Args:
      images: [N, H, W, 3] uint8 (or float 0..255).
      resize: "legacy" (TF1, the ADM evaluator) or "halfpixel" (pytorch-fid).

    Returns:
      [N, 299, 299, 3] float32.
    """
    if resize not in resize_lib.RESIZERS:
        raise ValueError(f"resize must be one of {sorted(resize_lib.RESIZERS)}; got {resize!r}")
    x = jnp.asarray(images).astype(jnp.float32)
    x = resize_lib.RESIZERS[resize](x, (INCEPTION_SIZE, INCEPTION_SIZE))
    return (x - np.float32(128.0)) * np.float32(0.0078125)


def _inception_forward_impl(module, variables, images, resize="legacy", preprocessed=False):
    x = images if preprocessed else preprocess_for_inception(images, resize)
    out = module.apply(variables, x)
    return {"pool_3": out["pool_3"], "spatial": out["spatial"], "logits": out["logits_nobias"]}


_inception_forward = jax.jit(
    _inception_forward_impl, static_argnames=("module", "resize", "preprocessed")
)


def _check_images(images, rgb: bool = True) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or (rgb and images.shape[-1] != 3):
        want = "[N, H, W, 3]" if rgb else "[N, H, W, C]"
        raise ValueError(f"images must be NHWC {want}; got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in 0..255; got dtype {images.dtype}")
    return images


def fid_inception_features(module, variables, images_uint8, resize: str = "legacy") -> dict:
    """FID-Inception features of one batch, as the reference evaluator computes them.

    Args:
      module: `create_fid_inception()`.
      variables: its {"params", "batch_stats"}.
      images_uint8: [N, H, W, 3] uint8.
      resize: "legacy" (ADM parity) or "halfpixel".

    Returns:
      dict(pool_3 [N, 2048], spatial [N, 2023], logits [N, 1008]) float32, where logits are
      pool_3 @ fc kernel WITHOUT the bias (what the evaluator's softmax sees).
    """
    images = _check_images(images_uint8)
    if resize not in resize_lib.RESIZERS:
        raise ValueError(f"resize must be one of {sorted(resize_lib.RESIZERS)}; got {resize!r}")
    return _inception_forward(module, variables, jnp.asarray(images), resize=resize)


class FeatureExtractor(Protocol):
    """images uint8 [N, H, W, 3] -> dict(pool [N, D], spatial [N, D2], probs [N, K]) (numpy)."""

    def __call__(self, images_uint8) -> dict: ...


def _local_mesh():
    # Evaluation reads its files on every host independently, so the mesh is this host's devices.
    if jax.process_count() == 1:
        return jax.make_mesh((jax.device_count(),), (MESH_AXIS,))
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), (MESH_AXIS,))


class _ShardedExtractor:
    """Runs `self._features(variables, images) -> dict(pool, spatial, logits)` compiled once, over
    fixed-size batches sharded over the local devices, and returns pool, spatial and the softmax
    probabilities. Subclasses implement `_features`."""

    rgb = True  # Inception needs 3 channels; a small classifier takes what it was trained on

    def __init__(self, variables, batch_size: int):
        self.mesh = _local_mesh()
        n_dev = self.mesh.devices.size
        # One compiled shape: the batch rounded up to a multiple of the device count.
        self.batch_size = max(n_dev, -(-int(batch_size) // n_dev) * n_dev)
        self._data = NamedSharding(self.mesh, P(MESH_AXIS))
        self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))
        self._forward = jax.jit(self._compute, out_shardings=self._data)

    def _features(self, variables, images) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compute(self, variables, images):
        out = self._features(variables, images)
        return {
            "pool": out["pool"],
            "spatial": out["spatial"],
            "probs": jax.nn.softmax(out["logits"], axis=-1),
        }

    def __call__(self, images_uint8) -> dict:
        images = _check_images(images_uint8, self.rgb)
        n = images.shape[0]
        outs: dict[str, list] = {}
        # Reference batches (10k-50k images) take minutes on one device: show a bar for them.
        bar = progress.bar(n, desc="features", unit="img") if n > self.batch_size else None
        for start in range(0, n, self.batch_size):
            batch = images[start : start + self.batch_size]
            valid = batch.shape[0]
            if valid < self.batch_size:
                pad = np.zeros((self.batch_size - valid, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            result = self._forward(self.variables, jax.device_put(batch, self._data))
            for key, value in result.items():
                outs.setdefault(key, []).append(np.asarray(value)[:valid])
            if bar is not None:
                bar.update(valid)
        if bar is not None:
            bar.close()
        if not outs:
            raise ValueError("no images to extract features from")
        return {key: np.concatenate(value) for key, value in outs.items()}


class InceptionExtractor(_ShardedExtractor):
    """The ADM evaluator's features: pool = pool_3 [N, 2048], spatial = mixed_6/conv[..., :7]
    [N, 2023], probs = softmax(pool_3 @ fc kernel) [N, 1008] (no bias)."""

    def __init__(self, variables, *, batch_size: int = 64, resize: str = "legacy", module=None):
        if resize not in resize_lib.RESIZERS:
            raise ValueError(f"resize must be one of {sorted(resize_lib.RESIZERS)}; got {resize!r}")
        self.module = module or inception.create_fid_inception()
        self.resize = resize
        super().__init__(variables, batch_size)

    def _features(self, variables, images):
        out = _inception_forward_impl(self.module, variables, images, resize=self.resize)
        return {"pool": out["pool_3"], "spatial": out["spatial"], "logits": out["logits"]}


class ClassifierExtractor(_ShardedExtractor):
    """Features of a small classifier (`small_classifier.SmallClassifier`): pool = penultimate
    dense features, spatial = flattened early conv map, probs = softmax of the logits."""

    rgb = False

    def __init__(self, module, variables, *, batch_size: int = 256):
        self.module = module
        super().__init__(variables, batch_size)

    def _features(self, variables, images):
        return self.module.apply(variables, images, features=True)
