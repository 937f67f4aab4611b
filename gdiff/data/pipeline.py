"""Input dispatch: config.data -> per-process numpy batches -> global, sharded jax.Arrays.

Every process reads only its own shard of the data and produces `global_batch / process_count`
examples per step; `gdiff.distributed.global_batch` stitches those into one global array sharded
over the "data" mesh axis (`jax.make_array_from_process_local_data`).

For the in-memory and folder sources a batch is a pure function of (seed, process, step): the
example order is a seeded permutation per epoch and every example's augmentation has its own seeded
generator. Resuming at step N therefore reproduces exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import numpy as np

from gdiff import distributed
from gdiff.data import digits, folder_source, tfds_source

SOURCES = ("digits", "tfds", "folder")


class IndexedSource(Protocol):
    """Random access to a finite dataset: `num_examples` and `load(index, rng)`."""

    num_examples: int

    def load(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, int]: ...


def _epoch_order(shard: np.ndarray, seed: int, process: int, epoch: int, shuffle: bool):
    if not shuffle:
        return shard
    return np.random.default_rng([abs(seed), process, epoch, 7]).permutation(shard)


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
    """The example indices process `process_index` reads at `step` -> int64 [local_batch].

    Process p owns examples p, p + P, p + 2P, ... (the reference's `image_paths[shard::num_shards]`)
    and walks through a fresh seeded permutation of them every epoch.
    """
    shard = np.arange(process_index, num_examples, process_count)
    if len(shard) == 0:
        raise ValueError(f"process {process_index} has no data: {num_examples} examples")
    positions = step * local_batch + np.arange(local_batch)
    epochs, offsets = np.divmod(positions, len(shard))
    out = np.empty(local_batch, np.int64)
    for epoch in np.unique(epochs):
        order = _epoch_order(shard, seed, process_index, int(epoch), shuffle)
        mask = epochs == epoch
        out[mask] = order[offsets[mask]]
    return out


def indexed_batches(
    source: IndexedSource,
    *,
    local_batch: int,
    seed: int,
    start_step: int = 0,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    num_threads: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields dict(image float32 [b, S, S, 3], label int32 [b], id int64 [b]) from `start_step` on.

    `id` is the example's index in the split, so callers (and tests) can tell which shard a process
    read. Batches are assembled by a background thread, `prefetch` ahead.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    pool = concurrent.futures.ThreadPoolExecutor(num_threads)
    order = functools.partial(batch_indices, source.num_examples, local_batch=local_batch)

    def make(step: int) -> dict[str, np.ndarray]:
        ids = order(step=step, seed=seed, process_index=pi, process_count=pc, shuffle=shuffle)
        rngs = [np.random.default_rng([abs(seed), pi, step, j, 11]) for j in range(local_batch)]
        loaded = list(pool.map(source.load, ids.tolist(), rngs))
        return {
            "image": np.stack([x for x, _ in loaded]).astype(np.float32),
            "label": np.asarray([y for _, y in loaded], np.int32),
            "id": ids,
        }

    yield from _prefetched((make(s) for s in _count(start_step)), prefetch)


def _count(start: int):
    while True:
        yield start
        start += 1


def _prefetched(iterator: Iterator[Any], size: int) -> Iterator[Any]:
    """Runs `iterator` in a daemon thread, `size` items ahead (errors re-raised in the caller)."""
    if size <= 0:
        yield from iterator
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


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
    seed: int | None = None,
    random_crop: bool | None = None,
    random_flip: bool | None = None,
    train: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches for `config.data`: dict(image [b, S, S, 3] float32, label [b] int32).

    Args:
      config: the experiment config (uses the `data` group and `seed`).
      global_batch_size: examples per step over all devices of all processes; must divide by the
        mesh size (ValueError otherwise).
      mesh: the data mesh; this process feeds its addressable devices' share.
      split: defaults to `data.train_split` (train) or `data.eval_split` (not train).
      start_step: first step to produce (exact resume).
      seed: defaults to `config.seed`.
      random_crop, random_flip: augmentation (defaults from `config.data`; off when not train).
      train: shuffled, augmented, endless. Evaluation streams are fixed (same examples each time).
    """
    check_data_config(config)
    data = config.data
    b = distributed.local_batch_size(global_batch_size, mesh)
    seed = config.seed if seed is None else seed
    split = split or (data.train_split if train else data.eval_split)
    crop = (data.random_crop if train else False) if random_crop is None else random_crop
    flip = (data.random_flip if train else False) if random_flip is None else random_flip
    if data.source == "tfds":
        return tfds_source.tfds_batches(
            data.name,
            split=split,
            local_batch=b,
            image_size=data.image_size,
            seed=seed,
            start_step=start_step,
            class_cond=data.class_cond,
            random_crop=crop,
            random_flip=flip,
            shuffle_buffer=data.shuffle_buffer,
            prefetch=data.prefetch,
            data_dir=data.data_dir,
            repeat=train,
        )
    src = _indexed_source(data, split, train=train, random_crop=crop, random_flip=flip)
    return indexed_batches(
        src,
        local_batch=b,
        seed=seed,
        start_step=start_step,
        shuffle=train,
        prefetch=data.prefetch,
    )


def _indexed_source(data, split: str, *, train: bool, random_crop: bool, random_flip: bool):
    """The in-memory / on-disk sources that `indexed_batches` reads by example index."""
    if data.source == "digits":
        return digits.DigitsSource(
            split, data.image_size, random_crop=random_crop, random_flip=random_flip
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
