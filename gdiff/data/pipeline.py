"""Input dispatch: config.data -> an indexed source -> this process's batches (the grain input
engine, `gdiff/data/input_engine.py`) -> global, sharded jax.Arrays.

Every source (digits, image folders, TFDS ArrayRecord files) is read by example index; every
process reads only its part of each global batch and produces `global_batch / process_count`
examples per step; `gdiff.distributed.global_batch` stitches those into one global array sharded
over the "data" mesh axis (`jax.make_array_from_process_local_data`).

A batch is a pure function of (seed, step, process layout): the order is a seeded index shuffle
per epoch, every example's augmentation is keyed by its index and epoch, and a resume jumps to its
step (from the iterator state saved with the checkpoint, or by arithmetic) without reading the
records before it. A global batch does not depend on the process count.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging

from gdiff import distributed
from gdiff.data import digits, folder_source, input_engine, tfds_source

SOURCES = ("digits", "tfds", "folder")


def batch_indices(
    num_examples: int,
    *,
    step: int,
    local_batch: int,
    seed: int,
    process_index: int,
    process_count: int,
    shuffle: bool = True,
) -> np.ndarray:
    """The example indices process `process_index` reads at `step` -> int64 [local_batch]: rows
    process_index * local_batch .. of global batch `step` of the seeded stream (what the engine's
    batch holds as `id`)."""
    order = input_engine.example_order(num_examples, seed=seed, shuffle=shuffle)
    k = step * local_batch + np.arange(local_batch)
    positions = input_engine.stream_position(
        k, local_batch=local_batch, process_index=process_index, process_count=process_count
    )
    return np.asarray([order[int(p)] for p in positions], np.int64)


def check_data_config(config) -> None:
    """Raises ValueError for an unknown source or dataset name, before anything is built."""
    source = config.data.source
    if source not in SOURCES:
        raise ValueError(f"unknown data.source={source!r}; supported: {', '.join(SOURCES)}")
    if source == "tfds":
        tfds_source.check_name(config.data.name)


def local_batches(
    config,
    *,
    global_batch_size: int,
    mesh: jax.sharding.Mesh,
    split: str | None = None,
    start_step: int = 0,
    input_state: dict[str, Any] | None = None,
    seed: int | None = None,
    random_crop: bool | None = None,
    random_flip: bool | None = None,
    train: bool = True,
) -> input_engine.Batches:
    """This process's batches for `config.data`: dict(image [b, S, S, 3] float32, label [b] int32,
    id [b] int64, the example indices), an endless iterator with `get_state` (input_engine).

    Args:
      config: the experiment config (uses the `data` group and `seed`).
      global_batch_size: examples per step over all devices of all processes; must divide by the
        mesh size (ValueError otherwise).
      mesh: the data mesh; this process feeds its addressable devices' share.
      split: defaults to `data.train_split` (train) or `data.eval_split` (not train).
      start_step: first step to produce (exact resume), reached without reading earlier records.
      input_state: the iterator state saved with the checkpoint of `start_step` (None: an old
        checkpoint without one); used when it describes this stream, else the position follows
        from `start_step`.
      seed: defaults to `config.seed`.
      random_crop, random_flip: augmentation (defaults from `config.data`; off when not train).
      train: shuffled and augmented. Evaluation streams are in index order (examples 0, 1, ...
        of the split, then again from the start).
    """
    check_data_config(config)
    data = config.data
    b = distributed.local_batch_size(global_batch_size, mesh)
    seed = config.seed if seed is None else seed
    split = split or (data.train_split if train else data.eval_split)
    crop = (data.random_crop if train else False) if random_crop is None else random_crop
    flip = (data.random_flip if train else False) if random_flip is None else random_flip
    source = _indexed_source(data, split, train=train, random_crop=crop, random_flip=flip)
    # This process's rank among the mesh's processes: its rows of every global batch.
    processes = sorted({d.process_index for d in mesh.devices.flat})
    stream = input_engine.batches(
        source,
        local_batch=b,
        seed=seed,
        process_index=processes.index(jax.process_index()),
        process_count=len(processes),
        shuffle=train,
        prefetch=data.prefetch,
    )
    _resume(stream, start_step, input_state)
    return stream


def _resume(stream: input_engine.Batches, step: int, saved: dict[str, Any] | None) -> None:
    """Positions `stream` at batch `step`: from the saved iterator state when it is this
    stream's, else by arithmetic (an old checkpoint, or another batch size or process count).
    Both are random access: constant time at any step."""
    if stream.matches(saved):
        stream.set_state(saved)
        how = "the saved input state"
    else:
        stream.seek(step)
        how = "the step (no input state of this stream was saved)" if step else ""
    if step and jax.process_index() == 0:
        logging.info("input: resuming at step %d from %s", step, how)


def _indexed_source(data, split: str, *, train: bool, random_crop: bool, random_flip: bool):
    """The source of `data.source`, read by example index: digits in memory, an image folder,
    or a TFDS dataset's ArrayRecord files."""
    if data.source == "digits":
        return digits.DigitsSource(
            split, data.image_size, random_crop=random_crop, random_flip=random_flip
        )
    if data.source == "tfds":
        return tfds_source.open_source(
            data.name,
            split=split,
            data_dir=data.data_dir,
            image_size=data.image_size,
            class_cond=data.class_cond,
            random_crop=random_crop,
            random_flip=random_flip,
        )
    folder = data.folder if train else data.eval_folder
    if not folder:
        raise ValueError(
            "no held-out folder: set data.eval_folder for evaluation with data.source=folder"
        )
    return folder_source.FolderSource(
        folder,
        data.image_size,
        class_cond=data.class_cond,
        num_classes=data.num_classes,
        random_crop=random_crop,
        random_flip=random_flip,
    )


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Local numpy batch -> global arrays sharded on the batch axis (image and label only)."""
    return distributed.global_batch({"image": batch["image"], "label": batch["label"]}, mesh)
