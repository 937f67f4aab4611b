"""What a run was made with: `run.json`, its digest, and the checks that keep two runs apart.

A run's output directory holds `run.json`, the manifest: every setting that decides what lands in
which shard (seed, batch layout, the job's settings, the weights' pins). A rerun whose manifest
differs is refused with the differing keys (`check_run_manifest`), or, when the user asked for it,
the old directory is moved aside. Every shard carries the digest of the manifest it was made under
(`run_digest`, checked when shards are gathered), and a finished output carries it in a `<file>.run`
side file (`write_side_digest` / `check_side_digest`), so a deleted or edited run.json cannot mix
runs either.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import uuid
from typing import Any

from absl import logging

from gdiff import atomic, distributed, errors, treediff

RUN_FILE = "run.json"
# The array of a shard holding its run digest.
RUN_KEY = "gdiff_run"
# Manifest keys recorded for the record but not compared: where the checkpoints were named and
# found (the weights' pins decide whether they are the same; a step folder may name what a
# workdir did, a copied checkpoint holds the same weights).
INFO_KEYS = (
    "model_checkpoint",
    "classifier_checkpoint",
    "model_located",
    "classifier_located",
    "guide_checkpoint",
    "guide_located",
    "guidance_rows",
)


# Keys recorded as they are but compared and digested at a fixed value: the process count that
# began a run (a run resumes under any count: gdiff/engine/runs.py). Fixed at 1, runs of earlier
# versions, which compared it, keep their digests.
COMPARED_AS = {"process_count": 1}


def run_digest(manifest: dict[str, Any]) -> str:
    """A short digest of the compared part of a manifest: equal digests, same run."""
    text = json.dumps(_compared(manifest), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compared(manifest: dict[str, Any]) -> dict[str, Any]:
    compared = {k: v for k, v in manifest.items() if k not in INFO_KEYS}
    compared.update({k: v for k, v in COMPARED_AS.items() if k in compared})
    return compared


def read(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest recorded in `out_dir` (None when there is none yet)."""
    path = pathlib.Path(out_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_run_manifest(
    out_dir,
    manifest: dict[str, Any],
    *,
    write: bool,
    setting: str,
    restart_setting: str | None = None,
    restart: bool = False,
    hint: str = "",
) -> None:
    """Refuses to resume into `out_dir` when its shards were made with other settings.

    Args:
      out_dir: the run's output directory.
      manifest: JSON-able settings that decide what lands in which shard.
      write: whether this process records the manifest when the directory has none (process 0).
      setting: the config key that chooses `out_dir` (named in the error).
      restart_setting: the config key that allows `restart` (named in the error), if any.
      restart: on a difference, move the old directory aside (`<out_dir>.replaced-<time>`,
        nothing deleted) and start afresh instead of refusing.
      hint: a sentence added to the refusal (e.g. how to finish the old run).

    Raises:
      errors.ConfigMismatchError: the directory holds a run with other settings, naming each
        differing key.
    """
    path = pathlib.Path(out_dir) / RUN_FILE
    manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
    if path.exists():
        old = _compared(json.loads(path.read_text()))
        diff = [
            f"{k}: {a!r} -> {b!r}" for k, a, b in treediff.changed_keys(old, _compared(manifest))
        ]
        if not diff:
            return
        if not restart:
            how = f"another {setting}"
            if restart_setting:
                how += f", or {restart_setting}=true to move these samples aside and start afresh"
            raise errors.ConfigMismatchError(
                f"{out_dir} holds samples of another run ({'; '.join(diff[:8])}); refusing to "
                f"mix them with this one. {hint}To start afresh use {how}"
            )
        if write:
            _move_aside(pathlib.Path(out_dir), diff)
        distributed.barrier("gdiff_run_moved_aside")
    if write:
        atomic.write_text(path, json.dumps(manifest, indent=1, sort_keys=True))


def start_afresh(out_dir, manifest: dict[str, Any], *, why: str, write: bool) -> None:
    """Moves `out_dir` aside (`<out_dir>.replaced-<time>`, nothing deleted) and records
    `manifest` in the fresh directory: what a restart setting does when the outputs on disk were
    made under another run although run.json matches (it was deleted or edited).

    Args:
      why: what was found, for the log line.
      write: whether this process moves and writes (process 0); every process must call it.
    """
    out_dir = pathlib.Path(out_dir)
    if write:
        _move_aside(out_dir, [why])
    distributed.barrier("gdiff_run_started_afresh")
    if write:
        manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
        atomic.write_text(out_dir / RUN_FILE, json.dumps(manifest, indent=1, sort_keys=True))
    distributed.barrier("gdiff_run_started_afresh_manifest")


def _move_aside(out_dir: pathlib.Path, diff: list[str]) -> None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{stamp}")
    while aside.exists():
        aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:6]}")
    os.replace(out_dir, aside)
    out_dir.mkdir(parents=True)
    logging.warning("%s held another run (%s); moved it to %s", out_dir, "; ".join(diff), aside)


def side_digest_path(path: str | os.PathLike) -> pathlib.Path:
    """Where a finished output records the run digest it was made under."""
    return pathlib.Path(f"{path}.run")


def write_side_digest(path: str | os.PathLike, run: str) -> None:
    """Records `run` for the output `path`; written BEFORE the output, so a finished output never
    exists without its digest."""
    atomic.write_text(side_digest_path(path), run + "\n")


def check_side_digest(
    path, run: str, *, setting: str = "sample.output_dir", restart_setting: str = "sample.restart"
) -> None:
    """Checks that a finished output was made under run digest `run`.

    Raises:
      errors.ConfigMismatchError: it was made under another run (or before digests existed).
        With `restart_setting` true the run engine then moves the output directory aside and
        draws afresh (`start_afresh`).
    """
    side = side_digest_path(path)
    made = side.read_text().strip() if side.exists() else None
    if made != run:
        raise errors.ConfigMismatchError(
            f"{path} was merged from another run (run {made or 'unrecorded'}, this one {run}); "
            f"refusing to report it as this run's samples. Use another {setting}, or "
            f"{restart_setting}=true to move the old samples aside and draw afresh"
        )
