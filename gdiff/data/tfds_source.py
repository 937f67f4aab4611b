"""TFDS input: per-host shard, shuffle, repeat, reference preprocessing, batch, prefetch.

TensorFlow is imported here only, lazily, and never sees an accelerator (JAX owns them).
Images are read as encoded bytes (`SkipDecoding`) so that skipping ahead on resume costs no
decoding; each example is then decoded and preprocessed with the reference's PIL pipeline (BOX
halving, BICUBIC, centre or random crop, flip), seeded by its position in the stream.

Pixels equal the reference's, which decodes with PIL: JPEGs are decoded with the accurate integer
inverse DCT (`dct_method="INTEGER_ACCURATE"`, libjpeg's JDCT_ISLOW, PIL's default) instead of TF's
default fast one (up to 5 levels apart), other formats with `decode_image`. LSUN images get the
reference's LSUN export resize (one BOX resize, see gdiff/data/preprocess.py), everything else the
reference data loader's BOX-halving + BICUBIC resize.

Resume: the stream is deterministic for a given seed and process count (seeded file order and
shuffle, deterministic maps), and `start_step` skips `start_step * local_batch` encoded examples,
so a resumed run sees the batches an uninterrupted run would have seen. The skip still reads those
records (O(steps) I/O, no decoding); with a different number of hosts the stream differs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

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


def tfds_batches(
    name: str,
    *,
    split: str,
    local_batch: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    class_cond: bool = True,
    random_crop: bool = False,
    random_flip: bool = True,
    shuffle_buffer: int = 10_000,
    prefetch: int = 2,
    data_dir: str | None = None,
    repeat: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's batches: dict(image float32 [b, S, S, 3] in [-1, 1], label int32 [b]).

    Args:
      name: a TFDS name from `SUPPORTED`.
      split: a TFDS split ("train", "validation", "test", or slicing syntax); each process reads
        `tfds.split_for_jax_process(split)`, its own disjoint part.
      local_batch: examples per process and step (global batch / process count).
      start_step: batches to skip (resume).
    """
    check_name(name)
    if class_cond and not has_labels(name):
        raise ValueError(f"{name} has no class labels; set data.class_cond=False")
    tf = _import_tf()
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16)
    ds = tfds.load(
        name,
        split=tfds.split_for_jax_process(split, drop_remainder=True),
        data_dir=data_dir,
        shuffle_files=repeat,
        read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    if repeat:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    # Skip encoded records (cheap) before decoding; positions keep counting from the skip point.
    ds = ds.skip(start_step * local_batch)
    ds = ds.enumerate(start=start_step * local_batch)
    example_fn = make_example_fn(
        tf,
        name,
        image_size=image_size,
        seed=seed,
        random_crop=random_crop,
        random_flip=random_flip,
    )
    ds = ds.map(example_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(prefetch)
    yield from tfds.as_numpy(ds)
