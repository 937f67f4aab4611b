"""The input iterator's state beside each training checkpoint step: one small JSON per process.

`<checkpoints>/input_state/<step>.process_<i>-of-<n>.json` holds what the input engine's
`Batches.get_state()` returned when step `<step>` was saved (gdiff/data/input_engine.py); a
resumed run hands it back to `pipeline.local_batches(input_state=...)`.

Why a file beside the orbax step rather than an item inside it: the step folders hold one
`StandardSave` item (`default`), which the store's verified restore, its newest-intact fallback and
`locate` read and check; bundling the iterator (orbax's Composite with grain's checkpoint handler)
would change that layout for every existing checkpoint. The state is a few bytes per process, and
random access makes it a shortcut, not a necessity: a missing or foreign one (an older checkpoint,
a save killed between the two writes, another process count) falls back to the position the step
implies, which gives the same batches. Each file is written atomically (gdiff/atomic.py) by its own
process, so processes never race on a file.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import jax

from gdiff import atomic

DIRNAME = "input_state"
_NAME = re.compile(r"^(\d+)\.process_(\d+)-of-(\d+)\.json$")


def path(directory: str | os.PathLike, step: int) -> pathlib.Path:
    """This process's state file of checkpoint step `step` in checkpoint `directory`."""
    name = f"{int(step)}.process_{jax.process_index()}-of-{jax.process_count()}.json"
    return pathlib.Path(directory) / DIRNAME / name


def save(
    directory: str | os.PathLike, step: int, state: dict[str, Any], *, oldest_kept: int
) -> None:
    """Writes this process's `state` for `step` atomically and removes its files of steps older
    than `oldest_kept` (the oldest step orbax still keeps)."""
    atomic.write_text(path(directory, step), json.dumps(state, sort_keys=True))
    folder = pathlib.Path(directory) / DIRNAME
    suffix = f".process_{jax.process_index()}-of-{jax.process_count()}.json"
    for old in folder.iterdir():
        match = _NAME.match(old.name)
        if match and old.name.endswith(suffix) and int(match.group(1)) < oldest_kept:
            old.unlink(missing_ok=True)


def load(directory: str | os.PathLike, step: int) -> dict[str, Any] | None:
    """This process's saved state of `step`, or None (none saved, or unreadable: the caller
    computes the position from the step instead)."""
    try:
        return json.loads(path(directory, step).read_text())
    except (OSError, ValueError):
        return None
