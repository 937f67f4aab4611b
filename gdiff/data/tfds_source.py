"""TFDS input: a dataset's ArrayRecord files read by example index (`tfds.data_source`), each
record decoded with PIL and preprocessed as the reference does.

TensorFlow is imported here only, lazily, and never sees an accelerator (JAX owns them). Records
are read as encoded bytes (`SkipDecoding`) and decoded by `RecordSource` with PIL, the reference's
own decoder (`Image.open(...).convert("RGB")`), so the pixels are the reference's by construction.
LSUN images get the reference's LSUN export resize (one BOX resize, see gdiff/data/preprocess.py),
everything else the reference data loader's BOX-halving + BICUBIC resize.

The dataset must be prepared with `file_format="array_record"` (README, "Input preparation for
ArrayRecord"): random access is what lets the input engine (gdiff/data/input_engine.py) order,
shard and resume by index, so a resume at any step reads only the records of its first batch.

`decode_image` and `make_example_fn` are the same decoding and preprocessing as TensorFlow ops for
a tf.data pipeline; tests/test_data_pixels.py holds them to the reference's pixels too.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from gdiff import errors
from gdiff.data import preprocess

# Dataset families gdiff knows how to read (name as given to tfds.load, without ":version").
SUPPORTED = (
    "imagenet2012",
    "imagenet_resized/8x8",
    "imagenet_resized/16x16",
    "imagenet_resized/32x32",
    "imagenet_resized/64x64",
    "lsun/<category>",
    "cifar10",
    "mnist",
)
# Which of them have class labels ("label" feature).
_UNLABELLED_PREFIXES = ("lsun/",)


def check_name(name: str) -> str:
    """Validates a TFDS name; returns it. Raises ValueError listing the supported ones."""
    base = name.split(":")[0]
    ok = base in SUPPORTED or (base.startswith("lsun/") and len(base) > len("lsun/"))
    if not ok:
        raise ValueError(
            f"unknown dataset data.name={name!r}; supported TFDS datasets: {', '.join(SUPPORTED)} "
            "(or data.source=digits / data.source=folder)"
        )
    return name


def has_labels(name: str) -> bool:
    return not name.split(":")[0].startswith(_UNLABELLED_PREFIXES)


def resize_method(name: str) -> str:
    """How images of dataset `name` reach the target size (`preprocess.RESIZES`): LSUN as the
    reference's LSUN exporter, everything else as the reference's data loader."""
    return "lsun" if name.split(":")[0].startswith("lsun/") else "imagenet"


def decode_image(tf, encoded):
    """Encoded image bytes (a scalar tf.string) -> uint8 [H, W, 3], the pixels PIL decodes.

    JPEGs go through libjpeg's accurate integer inverse DCT, as in PIL; grey images come out
    repeated to RGB and alpha is dropped, as PIL's `convert("RGB")` does.
    """
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )


def make_example_fn(
    tf, name: str, *, image_size: int, seed: int, random_crop: bool, random_flip: bool
):
    """The per-example map of dataset `name`'s stream: (position, {"image": encoded bytes,
    "label"}) -> dict(image float32 [S, S, 3] in [-1, 1], label int32 []).

    The example's augmentation (crop, flip) is seeded by (seed, position), its position in the
    stream, so a resumed stream augments every example as an uninterrupted one does.
    """
    labelled = has_labels(name)
    resize = resize_method(name)

    def numpy_preprocess(pixels, position):
        return preprocess.preprocess_image(
            pixels,
            image_size,
            rng=np.random.default_rng([abs(seed), int(position)]),
            random_crop=random_crop,
            random_flip=random_flip,
            resize=resize,
        )

    def example_fn(position, example):
        pixels = decode_image(tf, example["image"])
        image = tf.numpy_function(numpy_preprocess, [pixels, position], tf.float32)
        image.set_shape([image_size, image_size, 3])
        label = tf.cast(example["label"], tf.int32) if labelled else tf.zeros([], tf.int32)
        return {"image": image, "label": label}

    return example_fn


def _import_tf():
    import tensorflow as tf

    # JAX owns the accelerators; TF only decodes on the host.
    tf.config.set_visible_devices([], "GPU")
    return tf


class RecordSource:
    """Random access to encoded-image records: `load(i, rng)` -> (float32 [S, S, 3] in [-1, 1],
    label).

    Args:
      records: a random-access sequence (`len`, `[i]`) of dicts with "image" (encoded bytes, any
        format PIL reads) and, when `labelled`, "label" (int).
      image_size: the target square size.
      labelled: read "label" (else every label is 0).
      resize: "imagenet" or "lsun" (`preprocess.RESIZES`).
      random_crop, random_flip: the reference's augmentation, drawn from `load`'s rng.
    """

    def __init__(
        self,
        records,
        image_size: int,
        *,
        labelled: bool = True,
        resize: str = "imagenet",
        random_crop: bool = False,
        random_flip: bool = False,
    ):
        self.records = records
        self.image_size = image_size
        self.labelled = labelled
        self.resize = resize
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.num_examples = len(records)

    def load(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Record `i` (0 <= i < num_examples) decoded, preprocessed and augmented with `rng`."""
        record = self.records[i]
        out = preprocess.preprocess_image(
            decode_bytes(record["image"]),
            self.image_size,
            rng=rng,
            random_crop=self.random_crop,
            random_flip=self.random_flip,
            resize=self.resize,
        )
        return out, int(record["label"]) if self.labelled else 0


def decode_bytes(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3], decoded as the reference does (PIL, RGB)."""
    with Image.open(io.BytesIO(bytes(data))) as image:
        return np.asarray(image.convert("RGB"))


def open_source(
    name: str,
    *,
    split: str,
    image_size: int,
    data_dir: str | None = None,
    class_cond: bool = True,
    random_crop: bool = False,
    random_flip: bool = True,
) -> RecordSource:
    """Dataset `name`'s split as a `RecordSource` over its ArrayRecord files.

    Args:
      name: a TFDS name from `SUPPORTED` (with an optional ":version").
      split: a TFDS split ("train", "validation", "test", or slicing syntax), read whole: each
        process reads its rows of every global batch by index (gdiff/data/input_engine.py).
      data_dir: TFDS's data_dir (None: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets).
      class_cond: read labels; ValueError for a dataset without them (LSUN).

    Raises:
      errors.ConfigError: the dataset is prepared in a format without random access (TFRecord).
    """
    check_name(name)
    if class_cond and not has_labels(name):
        raise ValueError(f"{name} has no class labels; set data.class_cond=False")
    _import_tf()
    import tensorflow_datasets as tfds

    try:
        records = tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            decoders={"image": tfds.decode.SkipDecoding()},
            # Prepared on first use (the small datasets TFDS can download) as ArrayRecord.
            builder_kwargs={"file_format": "array_record"},
        )
    except (NotImplementedError, ValueError) as e:
        if "random access" not in str(e).lower() and "file format" not in str(e).lower():
            raise
        raise errors.ConfigError(
            f"data.name={name!r} in data.data_dir={data_dir!r} is not prepared as ArrayRecord, "
            "which gdiff's input reads by index; prepare it with --file_format=array_record "
            "(README, 'Input preparation for ArrayRecord')"
        ) from e
    return RecordSource(
        records,
        image_size,
        labelled=class_cond,
        resize=resize_method(name),
        random_crop=random_crop,
        random_flip=random_flip,
    )
