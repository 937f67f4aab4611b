"""The reference's image preprocessing (guided-diffusion `image_datasets.py`), as pure functions.

Downsampling mirrors what the released ImageNet models were trained on: halve with a BOX filter
while the short side is at least twice the target (PIL's old stand-in for `reducing_gap`), then one
BICUBIC resize to the target short side, then a centre crop. The classifier's augmentation picks
a random short side in [size, size / 0.8] and crops at a random place. LSUN is different: the
reference trained on folders that its `datasets/lsun_bedroom.py` exported, each image resized ONCE
with a BOX filter to the target short side and centre-cropped (`resize="lsun"`); reading those
folders back changed nothing (the images already had the target size). Pixels map to [-1, 1].

Randomness comes from an explicit `numpy.random.Generator`, so a batch is a pure function of its
seed (exact resume).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

RESIZES = ("imagenet", "lsun")


def _shrink(image: Image.Image, short_side: int) -> Image.Image:
    """BOX-halves while still >= 2x `short_side`, then BICUBIC-resizes the short side to it."""
    while min(*image.size) >= 2 * short_side:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = short_side / min(*image.size)
    return image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)


def _center(arr: np.ndarray, image_size: int) -> np.ndarray:
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """Resizes the short side to `image_size`, crops the centre -> [image_size, image_size, C]."""
    return _center(np.asarray(_shrink(image, image_size)), image_size)


def lsun_export_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """The reference's LSUN export: one BOX resize of the short side to `image_size`, then a
    centre crop -> [image_size, image_size, C]."""
    scale = image_size / min(*image.size)
    size = tuple(round(x * scale) for x in image.size)
    return _center(np.asarray(image.resize(size, resample=Image.BOX)), image_size)


def random_crop_arr(
    image: Image.Image,
    image_size: int,
    rng: np.random.Generator,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
) -> np.ndarray:
    """The reference classifier's augmentation: random scale, then a random square crop."""
    lo = math.ceil(image_size / max_crop_frac)
    hi = math.ceil(image_size / min_crop_frac)
    arr = np.asarray(_shrink(image, int(rng.integers(lo, hi + 1))))
    top = int(rng.integers(0, arr.shape[0] - image_size + 1))
    left = int(rng.integers(0, arr.shape[1] - image_size + 1))
    return arr[top : top + image_size, left : left + image_size]


def to_unit_range(arr: np.ndarray) -> np.ndarray:
    """uint8 pixels [..., 0..255] -> float32 in [-1, 1] (the reference's `x / 127.5 - 1`)."""
    return arr.astype(np.float32) / 127.5 - 1.0


def ensure_rgb(arr: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 1] or [H, W, 3/4] -> [H, W, 3] (grey repeated, alpha dropped)."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def preprocess_image(
    arr: np.ndarray,
    image_size: int,
    *,
    rng: np.random.Generator,
    random_crop: bool = False,
    random_flip: bool = True,
    resize: str = "imagenet",
) -> np.ndarray:
    """One decoded image (uint8 [H, W, C], C in 1/3/4) -> float32 [image_size, image_size, 3].

    Args:
      arr: the decoded pixels.
      image_size: the target square size.
      rng: the example's own generator (crop position/scale and flip coin).
      random_crop: the classifier's random-scale crop instead of the centre crop.
      random_flip: mirror horizontally with probability 1/2.
      resize: "imagenet" (BOX halving, BICUBIC, centre crop: the reference's data loader) or
        "lsun" (one BOX resize, centre crop: the reference's LSUN export); `random_crop` wins.
    """
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}; got {resize!r}")
    image = Image.fromarray(ensure_rgb(np.asarray(arr, np.uint8)))
    if random_crop:
        out = random_crop_arr(image, image_size, rng)
    elif resize == "lsun":
        out = lsun_export_arr(image, image_size)
    else:
        out = center_crop_arr(image, image_size)
    # The coin is drawn even when flipping is off, so turning it off does not shift the stream.
    if rng.random() < 0.5 and random_flip:
        out = out[:, ::-1]
    return to_unit_range(out)
