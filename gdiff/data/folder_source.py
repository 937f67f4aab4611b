"""The reference's image-folder layout: every image below a directory, class = file-name prefix.

As in guided-diffusion's `image_datasets.py`: files with extension jpg/jpeg/png/gif/webp anywhere
below `data.folder`, sorted; with `class_cond` the label is the part of the file name before the
first "_" (e.g. `n01440764_10026.JPEG` -> class "n01440764"), classes numbered in sorted order.
Decoding and resizing use PIL (no TensorFlow needed).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image

from gdiff.data import preprocess

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp")


def list_image_files(directory: str | os.PathLike) -> list[str]:
    """Every image file below `directory`, in sorted (deterministic) order."""
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"data.folder={str(directory)!r} is not a directory")
    out = []
    for entry in sorted(os.listdir(root)):
        path = root / entry
        if "." in entry and entry.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            out.append(str(path))
        elif path.is_dir():
            out.extend(list_image_files(path))
    return out


def class_name(path: str) -> str:
    return os.path.basename(path).split("_")[0]


class FolderSource:
    """Random-access image folder: `load(i, rng)` -> (float32 [S, S, 3] in [-1, 1], label)."""

    def __init__(
        self,
        directory: str,
        image_size: int,
        *,
        class_cond: bool,
        num_classes: int | None = None,
        random_crop: bool = False,
        random_flip: bool = True,
    ):
        if not directory:
            raise ValueError("data.source=folder needs data.folder (a directory of images)")
        self.files = list_image_files(directory)
        if not self.files:
            raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images below {directory!r}")
        names = [class_name(f) for f in self.files]
        self.classes = sorted(set(names))
        if class_cond and num_classes is not None and len(self.classes) > num_classes:
            raise ValueError(
                f"{directory!r} has {len(self.classes)} classes (file-name prefixes before '_'), "
                f"more than data.num_classes={num_classes}"
            )
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.asarray([index[n] for n in names] if class_cond else [0] * len(names))
        self.image_size = image_size
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.num_examples = len(self.files)

    def load(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        with Image.open(self.files[i]) as image:
            arr = np.asarray(image.convert("RGB"))
        out = preprocess.preprocess_image(
            arr,
            self.image_size,
            rng=rng,
            random_crop=self.random_crop,
            random_flip=self.random_flip,
        )
        return out, int(self.labels[i])
