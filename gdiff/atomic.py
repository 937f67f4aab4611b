"""Atomic file writes: a finished file is complete or absent, never half written.

Every file gdiff finishes (sample shards and merged files, grids, manifests, config fingerprints)
is written to a temporary sibling and `os.replace`d onto its name, which is atomic on POSIX
filesystems: a run killed mid-write leaves the previous file (or none), and a reader never sees a
partial one.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import uuid
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path` to write; when the block ends without an error it
    replaces `path`, otherwise it is removed. Creates the parent directory."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes `text` to `path` atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return pathlib.Path(path)


def savez(path: str | os.PathLike, **arrays: np.ndarray) -> pathlib.Path:
    """`np.savez(path, **arrays)` atomically, synced to disk before it takes the name."""
    path = pathlib.Path(path)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    return path
