"""The one input engine (grain): random-access sources -> this process's batches, resumable in
constant time from a saved iterator state.

Every source (digits, image folders, TFDS ArrayRecord files) is an `IndexedSource`: random access
to example `i` (`load(i, rng)`). On top of it one grain `MapDataset` describes the whole stream:

* Order: stream position -> example index, a seeded index shuffle of the split that changes every
  epoch (grain's `shuffle(seed).repeat()`: epoch e is shuffled with seed + e, so position p is
  computed without looking at positions before it); unshuffled for evaluation.
* Each host its own part: global batch s holds stream positions s*G .. s*G + G - 1 (G = the
  global batch) and process p reads positions s*G + p*b .. s*G + p*b + b - 1 (b = its local
  batch), the rows its devices hold in the global array (`distributed.global_batch`). A global
  batch is therefore the same for every process count.
* Decode and augmentation are keyed by (seed, example index, epoch): an example's pixels depend on
  which example and which pass over the data it is, never on how far an iterator ran, the batch
  size or the process count.
* Batches of b examples, read by grain's thread pool `prefetch` batches ahead.

Resume: the iterator's state (grain's `get_state`, which for this random-access stream is the
next stream element) is saved beside each training checkpoint and `set_state` jumps there
directly; without a saved state the same position follows from the step (`seek`). Either way a
resume at step 500,000 reads exactly the examples of its first batch, as a resume at step 0 does.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Protocol

import grain
import numpy as np

# Version of the saved state's layout (`Batches.get_state`); a state of another version is not
# trusted and the position is computed from the step instead.
STATE_VERSION = 1
_MASK64 = (1 << 64) - 1


class IndexedSource(Protocol):
    """Random access to a finite dataset: `num_examples` and `load(index, rng)`, which returns
    (float32 [S, S, 3] in [-1, 1], int label) for example `index`, augmented with `rng`."""

    num_examples: int

    def load(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, int]: ...


def order_seed(seed: int) -> int:
    """The grain shuffle seed of config seed `seed` (any int) -> [0, 2**32).

    Hashed rather than used as is: grain shuffles epoch e with seed + e, so runs with seeds s and
    s + 1 would otherwise share all but one epoch's order.
    """
    return int(np.random.SeedSequence(seed & _MASK64).generate_state(1)[0])


def example_order(num_examples: int, *, seed: int, shuffle: bool) -> grain.MapDataset:
    """Stream position -> example index (an endless MapDataset): every epoch is one pass over the
    split, in a fresh seeded order per epoch when `shuffle`, in index order otherwise."""
    if num_examples <= 0:
        raise ValueError(f"the split has no examples ({num_examples})")
    order = grain.MapDataset.range(num_examples)
    if shuffle:
        order = order.shuffle(seed=order_seed(seed))
    return order.repeat()


def stream_position(k, *, local_batch: int, process_index: int, process_count: int):
    """The stream position of element `k` (int or int array) of process `process_index`'s part:
    its share of global batch k // local_batch, at row process_index * local_batch + k % b."""
    step, row = np.divmod(k, local_batch)
    return (step * process_count + process_index) * local_batch + row


class _ProcessPart(grain.MapDataset):
    """Element k of this process's part -> (stream position, example index)."""

    def __init__(self, order: grain.MapDataset, *, local_batch: int, process: tuple[int, int]):
        super().__init__(order)
        self._position = functools.partial(
            stream_position,
            local_batch=local_batch,
            process_index=process[0],
            process_count=process[1],
        )

    def __len__(self) -> int:
        return sys.maxsize  # endless, as the order it reads

    def __str__(self) -> str:
        return "ProcessPart"

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        position = int(self._position(k))
        return position, int(self.parents[0][position])


def augmentation_rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    """The generator of example `index`'s crop and flip in pass `epoch` over the split."""
    return np.random.default_rng([seed & _MASK64, index, epoch])


def _load(source: IndexedSource, seed: int, item: tuple[int, int]) -> dict[str, Any]:
    """(stream position, example index) -> one example, augmented by its own key."""
    position, index = item
    epoch = position // source.num_examples
    image, label = source.load(index, augmentation_rng(seed, index, epoch))
    return {
        "image": np.asarray(image, np.float32),
        "label": np.int32(label),
        "id": np.int64(index),
    }


def _read_threads() -> int:
    """Decoding threads per process: PIL releases the GIL while it decodes and resizes."""
    return max(4, min(32, os.cpu_count() or 4))


class Batches:
    """This process's batches: dict(image float32 [b, S, S, 3], label int32 [b], id int64 [b]),
    endless, with a JSON-able iterator state (`get_state` / `set_state`) and `seek(step)`.

    `stream` describes what the state is a position in (source size, seed, order, local batch,
    process layout); a saved state is only applied to the same stream.
    """

    def __init__(self, dataset: grain.IterDataset, stream: dict[str, Any]):
        self._iterator = iter(dataset)
        self.stream = stream

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position after the batches returned so far (not those read ahead)."""
        return {
            "version": STATE_VERSION,
            "stream": self.stream,
            "grain": self._iterator.get_state(),
        }

    def matches(self, state: dict[str, Any] | None) -> bool:
        """Whether `state` (from `get_state`, possibly of an older run) positions this stream."""
        return (
            isinstance(state, dict)
            and state.get("version") == STATE_VERSION
            and state.get("stream") == self.stream
            and isinstance(state.get("grain"), dict)
        )

    def set_state(self, state: dict[str, Any]) -> None:
        """Jumps to a position `get_state` returned; ValueError for another stream's state."""
        if not self.matches(state):
            raise ValueError(f"an input state of another stream: {state!r} vs {self.stream!r}")
        self._iterator.set_state(state["grain"])

    def seek(self, step: int) -> None:
        """Jumps to batch `step` by arithmetic: element step * b of this process's part (what
        `get_state` holds after `step` batches; random access, so no record is read)."""
        self._iterator.set_state({"next_index": int(step) * int(self.stream["local_batch"])})

    def close(self) -> None:
        """Stops the read-ahead threads."""
        self._iterator.close()


def batches(
    source: IndexedSource,
    *,
    local_batch: int,
    seed: int,
    process_index: int,
    process_count: int,
    shuffle: bool = True,
    prefetch: int = 2,
) -> Batches:
    """The engine over `source`: this process's endless batches from step 0 (`seek` or
    `set_state` to resume). `prefetch` batches are read ahead (0: read on demand)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process {process_index} of {process_count}")
    part = _ProcessPart(
        example_order(source.num_examples, seed=seed, shuffle=shuffle),
        local_batch=local_batch,
        process=(process_index, process_count),
    )
    examples = part.map(functools.partial(_load, source, seed))
    ahead = max(0, int(prefetch)) * local_batch
    read = grain.ReadOptions(
        num_threads=_read_threads() if ahead else 0, prefetch_buffer_size=ahead
    )
    dataset = examples.to_iter_dataset(read).batch(local_batch, drop_remainder=True)
    stream = {
        "num_examples": int(source.num_examples),
        "seed": int(seed),
        "shuffle": bool(shuffle),
        "local_batch": int(local_batch),
        "process_index": int(process_index),
        "process_count": int(process_count),
    }
    return Batches(dataset, stream)
