"""The TFDS path gives the reference's pixels: PIL decoding + the reference's preprocessing.

Real encoded bytes are made here with PIL (JPEGs with every chroma subsampling, progressive, grey,
low quality; PNGs with alpha and a palette). The oracle is what the reference does with such a file:
`PIL.Image.open(...).convert("RGB")`, then its data loader's `center_crop_arr` (ImageNet and
every folder), or for LSUN its `datasets/lsun_bedroom.py` export (one BOX resize, centre crop, PNG)
read back through the data loader; then `x / 127.5 - 1` and the flip.
"""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from gdiff.data import folder_source, preprocess, tfds_source


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like uint8 [H, W, 3]: smooth colour gradients, edges and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    base += (x > 0.4)[..., None] * 0.5 - (y > 0.6)[..., None] * 0.3
    base += rng.normal(0, 0.08, base.shape)
    return np.clip((base + 1) * 110, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt, **kw)
    return buf.getvalue()


# name -> encoded bytes: the kinds of files ImageNet, LSUN and people's folders hold.
FILES = {
    "jpeg_420_q95": _encode(_picture(75, 113, 0), "JPEG", quality=95, subsampling=2),
    "jpeg_422_q90": _encode(_picture(120, 90, 1), "JPEG", quality=90, subsampling=1),
    "jpeg_444_q75": _encode(_picture(64, 64, 2), "JPEG", quality=75, subsampling=0),
    "jpeg_progressive": _encode(_picture(97, 131, 3), "JPEG", quality=85, progressive=True),
    "jpeg_q20_optimized": _encode(_picture(50, 70, 4), "JPEG", quality=20, optimize=True),
    "jpeg_grey": _encode(_picture(66, 80, 5), "JPEG", mode="L", quality=90),
    "jpeg_imagenet_size": _encode(_picture(375, 500, 6), "JPEG", quality=90),
    "png_rgba": _encode(_picture(40, 56, 7), "PNG", mode="RGBA"),
    "png_palette": _encode(_picture(48, 36, 8), "PNG", mode="P"),
}


def _pil_rgb(data: bytes) -> Image.Image:
    """The reference's decoding (image_datasets.py): open, load, convert("RGB")."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def _reference_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The reference data loader's center_crop_arr, re-typed as the oracle."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def _reference_lsun(image: Image.Image, size: int) -> np.ndarray:
    """The reference's LSUN export (one BOX resize, centre crop, saved as PNG), then its data
    loader reading that PNG back."""
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize(
        (int(round(scale * width)), int(round(scale * height))), resample=Image.BOX
    )
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    exported = _encode(arr[top : top + size, left : left + size], "PNG")
    return _reference_center_crop(_pil_rgb(exported), size)


@pytest.mark.parametrize("name", sorted(FILES))
def test_decoding_equals_pil(name):
    got = tfds_source.decode_image(tf, tf.constant(FILES[name])).numpy()
    want = np.asarray(_pil_rgb(FILES[name]))
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def _tfds_path(dataset: str, files: list[bytes], size: int, seed: int) -> np.ndarray:
    """The TFDS stream's per-example map over `files` as positions 0.. -> [N, S, S, 3]."""
    example_fn = tfds_source.make_example_fn(
        tf, dataset, image_size=size, seed=seed, random_crop=False, random_flip=True
    )
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": tf.constant(files), "label": tf.zeros(len(files), tf.int64)}
    )
    return np.stack([ex["image"] for ex in ds.enumerate().map(example_fn).as_numpy_iterator()])


@pytest.mark.parametrize(
    ("dataset", "oracle"),
    [("imagenet2012", _reference_center_crop), ("lsun/bedroom", _reference_lsun)],
)
def test_tfds_pixels_equal_the_references(dataset, oracle):
    names = sorted(FILES)
    seed, size = 3, 32
    got = _tfds_path(dataset, [FILES[n] for n in names], size, seed)
    flips = []
    for position, name in enumerate(names):
        want = oracle(_pil_rgb(FILES[name]), size)
        # The reference's flip: a coin per example (here the example's own seeded generator).
        flip = np.random.default_rng([seed, position]).random() < 0.5
        want = want[:, ::-1] if flip else want
        np.testing.assert_array_equal(got[position], want.astype(np.float32) / 127.5 - 1, name)
        flips.append(flip)
    assert any(flips) and not all(flips)


def test_lsun_export_resize_differs_from_the_imagenet_resize():
    image = _pil_rgb(FILES["jpeg_imagenet_size"])
    lsun = preprocess.lsun_export_arr(image, 64).astype(int)
    imagenet = preprocess.center_crop_arr(image, 64).astype(int)
    np.testing.assert_array_equal(lsun, _reference_lsun(image, 64))
    assert np.abs(lsun - imagenet).max() > 2
    assert tfds_source.resize_method("lsun/cat:3.1.0") == "lsun"
    assert tfds_source.resize_method("imagenet2012") == "imagenet"
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocess.preprocess_image(
            np.zeros((8, 8, 3)), 8, rng=np.random.default_rng(0), resize="x"
        )


def test_folder_path_stays_exact_and_agrees_with_tfds(tmp_path):
    names = sorted(FILES)
    for name in names:
        suffix = "jpg" if name.startswith("jpeg") else "png"
        (tmp_path / f"{name}.{suffix}").write_bytes(FILES[name])
    src = folder_source.FolderSource(str(tmp_path), 16, class_cond=False, random_flip=False)
    tfds_images = _tfds_path("imagenet2012", [FILES[n] for n in names], 16, seed=0)
    for i, path in enumerate(src.files):
        name = os.path.basename(path).rsplit(".", 1)[0]
        x, _ = src.load(i, np.random.default_rng(0))
        want = _reference_center_crop(_pil_rgb(FILES[name]), 16).astype(np.float32) / 127.5 - 1
        np.testing.assert_array_equal(x, want, name)
        flipped = np.random.default_rng([0, names.index(name)]).random() < 0.5
        np.testing.assert_array_equal(
            tfds_images[names.index(name)], want[:, ::-1] if flipped else want
        )
