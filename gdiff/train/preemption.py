"""Clean preemption: SIGTERM becomes a flag the training loop polls, so it saves and exits."""

from __future__ import annotations

import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
    """Turns SIGTERM (preemption, `kill`) into a flag the loop polls: save, then exit cleanly.

    On several processes the flag is agreed on collectively (every process must take part in the
    final save), at `sync_every` step boundaries.
    """

    def __init__(self, sync_every: int = 1):
        self.requested = False
        self.sync_every = max(int(sync_every), 1)
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            self._previous = None

    def _handle(self, signum, frame) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint, then stopping")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % self.sync_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
