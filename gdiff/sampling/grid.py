"""Preview grids of samples as PNG files."""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image

from gdiff import atomic


def make_grid(images: np.ndarray, ncols: int, *, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] row by row into one [rows*(H+pad)+pad, ...] image.

    Missing cells of the last row stay `fill`-coloured.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n)) if n else 1
    nrows = max(1, -(-n // ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def class_grid(
    images: np.ndarray, labels: np.ndarray, *, max_classes: int = 16, per_class: int = 8
) -> np.ndarray:
    """One row per class (the classes present, in order), up to `per_class` samples each.

    Rows of classes with fewer samples are padded with blank cells so that columns line up.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    classes = np.unique(labels)[:max_classes]
    blank = np.full(images.shape[1:], 255, np.uint8)
    cells = []
    for k in classes:
        row = list(images[labels == k][:per_class])
        row += [blank] * (per_class - len(row))
        cells.extend(row)
    return make_grid(np.stack(cells), per_class)


def save_png(path: str | os.PathLike, image: np.ndarray) -> pathlib.Path:
    """Writes a uint8 [H, W, C] image as PNG, atomically (temporary file + os.replace)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(image)
    if image.shape[-1] == 1:
        image = image[..., 0]
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")
    return path


def save_sample_grid(
    path, images: np.ndarray, labels: np.ndarray | None = None, *, by_class: bool = False
) -> pathlib.Path:
    """The preview of a run: rows = classes when `by_class` (balanced labels), else 8 per row."""
    if by_class and labels is not None:
        return save_png(path, class_grid(images, labels))
    return save_png(path, make_grid(np.asarray(images)[:64], 8))
