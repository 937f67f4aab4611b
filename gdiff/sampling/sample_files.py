"""The reference's sample files: `samples_<N>x<H>x<W>x3.npz` with arr_0 = uint8 images
[N, H, W, 3] and arr_1 = int labels [N] (when the run has labels), as guided-diffusion's
sampling scripts write them and its evaluator reads them."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from gdiff import atomic


def merged_name(num_samples: int, height: int, width: int, channels: int = 3) -> str:
    """The reference's file name for N samples: samples_<N>x<H>x<W>x3.npz."""
    return f"samples_{num_samples}x{height}x{width}x{channels}.npz"


def sample_arrays(images: np.ndarray, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """{"arr_0": images, "arr_1": labels} checked and typed (no arr_1 without labels)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
        arrays["arr_1"] = labels
    return arrays


def write_sample_file(
    path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None
) -> pathlib.Path:
    """Writes the reference format atomically: arr_0 = uint8 [N, H, W, 3], arr_1 = int labels
    [N] (if any)."""
    return atomic.savez(path, **sample_arrays(images, labels))


def read_sample_file(path) -> tuple[np.ndarray, np.ndarray | None]:
    """(arr_0 uint8 [N,H,W,C], arr_1 labels [N] or None) of a reference-format .npz."""
    with np.load(path) as z:
        images = z["arr_0"]
        labels = z["arr_1"] if "arr_1" in z.files else None
    return images, labels
