"""scikit-learn's handwritten digits (8x8, 17 grey levels 0..16, 10 classes) as an image source.

Small enough to live in memory and to train on a CPU in minutes: the test/CI dataset. Images are
upsampled by pixel repetition to `image_size` (a power of two >= 8, so the grey levels stay exact),
grey is repeated to 3 channels, and pixels map to [-1, 1].

The 1,797 examples split deterministically: every fifth example (index % 5 == 0) is held out as the
"validation"/"test" split, the rest is "train".
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from sklearn import datasets

from gdiff.data import preprocess

NUM_CLASSES = 10
SPLITS = ("train", "validation", "test")


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
    digits = datasets.load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int32)


def _split_indices(split: str, n: int) -> np.ndarray:
    held_out = np.arange(n) % 5 == 0
    if split == "train":
        return np.flatnonzero(~held_out)
    if split in ("validation", "test"):
        return np.flatnonzero(held_out)
    raise ValueError(f"digits has splits {SPLITS}; got {split!r}")


class DigitsSource:
    """Random-access digits: `load(i, rng)` -> (float32 [S, S, 3] in [-1, 1], label)."""

    def __init__(
        self, split: str, image_size: int, *, random_crop: bool = False, random_flip: bool = False
    ):
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(
                f"digits needs data.image_size to be a power of two >= 8 (got {image_size})"
            )
        images, labels = _load()
        self.indices = _split_indices(split, len(images))
        self._images = images
        self._labels = labels
        self.image_size = image_size
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.num_examples = len(self.indices)

    def load(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Example `i` of the split (0 <= i < num_examples) with its own augmentation rng."""
        j = int(self.indices[i])
        factor = self.image_size // 8
        grey = np.repeat(np.repeat(self._images[j], factor, axis=0), factor, axis=1)  # 0..16
        if self.random_crop:
            # Float ("F") PIL images keep the 17 levels through the bicubic resize.
            grey = preprocess.random_crop_arr(Image.fromarray(grey, mode="F"), self.image_size, rng)
        if rng.random() < 0.5 and self.random_flip:
            grey = grey[:, ::-1]
        pixels = np.clip(grey / 8.0 - 1.0, -1.0, 1.0).astype(np.float32)
        return np.repeat(pixels[..., None], 3, axis=-1), int(self._labels[j])
