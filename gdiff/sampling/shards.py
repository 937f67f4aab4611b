"""Sample files on disk: resumable per-batch shards, atomic writes, and the merged result.

Layout of one run's output directory:

    <out>/run.json                               what the shards were drawn with (resume guard)
    <out>/scale_<s>/shard_<process>_<batch>.npz  one per batch and process, the rows it sampled
    <out>/scale_<s>/samples_<N>x<H>x<W>x3.npz    the merged run, in the reference's format
    <out>/scale_<s>/samples_<N>x<H>x<W>x3.npz.run  the run digest the merged file was made under
    <out>/scale_<s>/grid.png                     a preview grid

Every file is written to a temporary name in the same directory and `os.replace`d into place, so a
killed run leaves either a complete file or none; a file that exists is finished and is never
rewritten.

Nothing from two runs is ever mixed: run.json pins what was sampled (the weights' step and content
fingerprint, the model, diffusion and sampling settings), a rerun whose manifest differs is refused
with the differing keys (`check_run_manifest`), and every shard and merged file carries the digest
of the manifest it was drawn under (`run_digest`), checked again when shards are merged and when a
finished run is found on disk.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import re
import uuid
from typing import Any

import numpy as np
from absl import logging

from gdiff import atomic, checkpointing, distributed, errors
from gdiff.sampling import labels as labels_lib

RUN_FILE = "run.json"
# The array of a shard holding its run digest (shards are gdiff's own files; merged files keep
# the reference's format and carry the digest in a `<file>.run` side file instead).
RUN_KEY = "gdiff_run"
# Manifest keys recorded for the record but not compared: where the checkpoints were named and
# found (the weights' pins decide whether they are the same; a step folder may name what a
# workdir did, a copied checkpoint holds the same weights).
INFO_KEYS = ("model_checkpoint", "classifier_checkpoint", "model_located", "classifier_located")
_SHARD_RE = re.compile(r"^shard_(\d+)_(\d+)\.npz$")


def scale_dir(out_dir: str | os.PathLike, scale: float) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"scale_{labels_lib.format_scale(scale)}"


def shard_path(out_dir, scale: float, process: int, batch: int) -> pathlib.Path:
    return scale_dir(out_dir, scale) / f"shard_{process}_{batch}.npz"


def merged_name(num_samples: int, height: int, width: int, channels: int = 3) -> str:
    """The reference's file name for N samples: samples_<N>x<H>x<W>x3.npz."""
    return f"samples_{num_samples}x{height}x{width}x{channels}.npz"


def merged_path(out_dir, scale: float, shape: tuple[int, int, int, int]) -> pathlib.Path:
    return scale_dir(out_dir, scale) / merged_name(*shape)


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> pathlib.Path:
    """`np.savez(path, **arrays)` through a temporary file and `os.replace` (atomic on POSIX)."""
    path = pathlib.Path(path)
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    return path


def write_sample_file(
    path, images: np.ndarray, labels: np.ndarray | None, *, run: str | None = None
) -> pathlib.Path:
    """Writes the reference format: arr_0 = uint8 [N, H, W, 3], arr_1 = int labels [N] (if any);
    plus RUN_KEY = the run digest when `run` is given (shards)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
        arrays["arr_1"] = labels
    if run is not None:
        arrays[RUN_KEY] = np.asarray(run)
    return atomic_savez(path, **arrays)


def read_sample_file(path) -> tuple[np.ndarray, np.ndarray | None]:
    """(arr_0 uint8 [N,H,W,C], arr_1 labels [N] or None) of a reference-format .npz."""
    with np.load(path) as z:
        images = z["arr_0"]
        labels = z["arr_1"] if "arr_1" in z.files else None
    return images, labels


def read_run_digest(path) -> str | None:
    """The run digest a shard was written under (None for a file without one)."""
    with np.load(path) as z:
        return str(z[RUN_KEY]) if RUN_KEY in z.files else None


def run_digest(manifest: dict[str, Any]) -> str:
    """A short digest of the compared part of a manifest: equal digests, same run."""
    text = json.dumps(_compared(manifest), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compared(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k not in INFO_KEYS}


def check_run_manifest(
    out_dir,
    manifest: dict[str, Any],
    *,
    write: bool,
    setting: str = "sample.output_dir",
    restart_setting: str | None = None,
    restart: bool = False,
    hint: str = "",
) -> None:
    """Refuses to resume into `out_dir` when its shards were drawn with other settings.

    Args:
      out_dir: the run's output directory.
      manifest: JSON-able settings that decide what lands in which shard (seed, labels, batch
        layout, sampler flags, the weights' pins, ...).
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
            f"{k}: {a!r} -> {b!r}"
            for k, a, b in checkpointing.changed_keys(old, _compared(manifest))
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


def _move_aside(out_dir: pathlib.Path, diff: list[str]) -> None:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{stamp}")
    while aside.exists():
        aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:6]}")
    os.replace(out_dir, aside)
    out_dir.mkdir(parents=True)
    logging.warning("%s held another run (%s); moved it to %s", out_dir, "; ".join(diff), aside)


def check_merged(path, run: str, *, restart_setting: str = "sample.restart") -> None:
    """Checks that a finished merged file was made under run digest `run`.

    Raises:
      errors.ConfigMismatchError: it was made under another run (or before digests existed).
    """
    side = pathlib.Path(f"{path}.run")
    made = side.read_text().strip() if side.exists() else None
    if made != run:
        raise errors.ConfigMismatchError(
            f"{path} was merged from another run (run {made or 'unrecorded'}, this one {run}); "
            f"refusing to report it as this run's samples. Use another sample.output_dir, or "
            f"{restart_setting}=true to move the old samples aside and draw afresh"
        )


def list_shards(directory) -> dict[tuple[int, int], pathlib.Path]:
    """{(batch, process): path} of the finished shards in one scale directory."""
    found = {}
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return found
    for p in directory.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            found[(int(m.group(2)), int(m.group(1)))] = p
    return found


def merge_shards(
    directory,
    num_samples: int,
    out_path,
    *,
    num_batches: int,
    num_processes: int,
    run: str | None = None,
) -> pathlib.Path:
    """Concatenates a scale's shards in (batch, process) order into one reference-format file.

    That order is the global example order, so row i of the result is example i of the run. A
    finished merged file is left untouched. With `run`, every shard must carry that run digest,
    and the merged file's `.run` side file records it.

    Raises:
      FileNotFoundError: a shard is missing (the run is not finished).
      ValueError: the shards hold a different number of samples than `num_samples`.
      errors.ConfigMismatchError: a shard was drawn under another run.
    """
    out_path = pathlib.Path(out_path)
    if out_path.exists():
        return out_path
    found = list_shards(directory)
    images, labels = [], []
    for b in range(num_batches):
        for p in range(num_processes):
            if (b, p) not in found:
                raise FileNotFoundError(
                    f"cannot merge {directory}: shard_{p}_{b}.npz is missing (rerun to finish it)"
                )
            if run is not None and (made := read_run_digest(found[(b, p)])) != run:
                raise errors.ConfigMismatchError(
                    f"{found[(b, p)]} was drawn under another run ({made or 'unrecorded'}, this "
                    f"one {run}); refusing to merge it. Delete it to redraw it, or start afresh "
                    "with another sample.output_dir"
                )
            img, lab = read_sample_file(found[(b, p)])
            images.append(img)
            labels.append(lab)
    all_images = np.concatenate(images, axis=0)
    if all_images.shape[0] != num_samples:
        raise ValueError(
            f"{directory}: shards hold {all_images.shape[0]} samples, expected {num_samples}"
        )
    has_labels = [lab is not None for lab in labels]
    if any(has_labels) and not all(has_labels):
        raise ValueError(f"{directory}: some shards have labels (arr_1) and some do not")
    all_labels = np.concatenate(labels, axis=0) if all(has_labels) and labels else None
    if run is not None:  # the side file first: a merged file never exists without its digest
        atomic.write_text(f"{out_path}.run", run + "\n")
    return write_sample_file(out_path, all_images, all_labels)
