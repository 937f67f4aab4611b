"""Sample files on disk: resumable per-batch shards, atomic writes, and the merged result.

Layout of one run's output directory:

    <out>/run.json                               what the shards were drawn with (resume guard)
    <out>/scale_<s>/shard_<process>_<batch>.npz  one per batch and process, the rows it sampled
    <out>/scale_<s>/samples_<N>x<H>x<W>x3.npz    the merged run, in the reference's format
    <out>/scale_<s>/grid.png                     a preview grid

Every file is written to a temporary name in the same directory and `os.replace`d into place, so a
killed run leaves either a complete file or none; a file that exists is finished and is never
rewritten.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import uuid
from typing import Any

import numpy as np

from gdiff.sampling import labels as labels_lib

RUN_FILE = "run.json"
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_sample_file(path, images: np.ndarray, labels: np.ndarray | None) -> pathlib.Path:
    """Writes the reference format: arr_0 = uint8 [N, H, W, 3], arr_1 = int labels [N] (if any)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
        arrays["arr_1"] = labels
    return atomic_savez(path, **arrays)


def read_sample_file(path) -> tuple[np.ndarray, np.ndarray | None]:
    """(arr_0 uint8 [N,H,W,C], arr_1 labels [N] or None) of a reference-format .npz."""
    with np.load(path) as z:
        images = z["arr_0"]
        labels = z["arr_1"] if "arr_1" in z.files else None
    return images, labels


def check_run_manifest(
    out_dir, manifest: dict[str, Any], *, write: bool, setting: str = "sample.output_dir"
) -> None:
    """Refuses to resume into `out_dir` when its shards were drawn with other settings.

    Args:
      out_dir: the run's output directory.
      manifest: JSON-able settings that decide which sample lands in which shard (seed, labels,
        batch layout, sampler flags, checkpoints, ...).
      write: whether this process records the manifest when the directory has none (process 0).
      setting: the config key that chooses `out_dir` (named in the error).
    """
    path = pathlib.Path(out_dir) / RUN_FILE
    manifest = json.loads(json.dumps(manifest, sort_keys=True))
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {manifest.get(k)!r}" for k in diff)
            raise ValueError(
                f"{out_dir} holds shards made with other settings ({details}); resume with the "
                f"same settings or choose another {setting}"
            )
        return
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, path)


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
    directory, num_samples: int, out_path, *, num_batches: int, num_processes: int
) -> pathlib.Path:
    """Concatenates a scale's shards in (batch, process) order into one reference-format file.

    That order is the global example order, so row i of the result is example i of the run. A
    finished merged file is left untouched.

    Raises:
      FileNotFoundError: a shard is missing (the run is not finished).
      ValueError: the shards hold a different number of samples than `num_samples`.
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
    return write_sample_file(out_path, all_images, all_labels)
