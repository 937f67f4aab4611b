"""TFDS input: per-host shard, shuffle, repeat, reference preprocessing, batch, prefetch.

TensorFlow is imported here only, lazily, and never sees an accelerator (JAX owns them).
Images are read as encoded bytes (`SkipDecoding`) so that skipping ahead on resume costs no
decoding; each example is then decoded and preprocessed with the reference's PIL pipeline (BOX
halving, BICUBIC, centre or random crop, flip), seeded by its position in the stream.

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
    labelled = has_labels(name)

    def _numpy_preprocess(encoded_pixels, position):
        rng = np.random.default_rng([abs(seed), int(position)])
        return preprocess.preprocess_image(
            encoded_pixels,
            image_size,
            rng=rng,
            random_crop=random_crop,
            random_flip=random_flip,
        )

    def _map(position, example):
        pixels = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
        image = tf.numpy_function(_numpy_preprocess, [pixels, position], tf.float32)
        image.set_shape([image_size, image_size, 3])
        label = tf.cast(example["label"], tf.int32) if labelled else tf.zeros([], tf.int32)
        return {"image": image, "label": label}

    ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(prefetch)
    yield from tfds.as_numpy(ds)
