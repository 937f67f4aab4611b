"""The evaluate mode: Inception Score, FID, sFID, precision and recall of a sample batch.

Reads the same `.npz` files as the reference's `evaluations/evaluator.py` (reference batches with
`arr_0` images and optionally `mu`, `sigma`, `mu_s`, `sigma_s`; sample batches with `arr_0` uint8
NHWC) and prints the same five numbers, also written as JSON.

    python main.py --mode=evaluate --config=configs/<exp>.py \
        --config.eval.ref_batch=REF.npz --config.eval.sample_batch=SAMPLES.npz \
        --config.eval.inception_weights=classify_image_graph_def.pb
    python -m gdiff.evaluation.evaluator REF.npz SAMPLES.npz --weights PATH

Reference activations are cached next to the reference batch (or in the workdir when that folder
is read-only), keyed by a hash of the file's content and of the weights file; the cache is written
atomically, and a damaged one is computed again (with a warning). A missing or malformed batch
file is an `errors.InputError` / `errors.MissingInputError` naming it, raised before the Inception
weights are loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import zipfile
import zlib

import numpy as np
from absl import logging

from gdiff import atomic, errors
from gdiff.checkpoints.torch_file import load_torch_state_dict
from gdiff.evaluation import features, inception_weights, metrics

METRIC_NAMES = ("inception_score", "fid", "sfid", "precision", "recall")
PRINT_NAMES = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
}

WEIGHTS_HELP = (
    "FID Inception weights are needed: download either pytorch-fid's pt_inception-2015-12-05 "
    "state dict (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth) or the ADM evaluator's classify_image_graph_def.pb "
    "(https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
    "classify_image_graph_def.pb) and pass its path with --config.eval.inception_weights=PATH "
    "(or --weights PATH for `python -m gdiff.evaluation.evaluator`)"
)


# ----------------------------------------------------------------------------- the five numbers


def evaluate_samples(
    extractor,
    ref_images_or_stats,
    sample_images,
    *,
    is_split_size: int = 5000,
    pr_row_batch: int = 10000,
    pr_col_batch: int = 10000,
) -> dict:
    """All five metrics of `sample_images` against a reference set.

    Args:
      extractor: a `FeatureExtractor` (images uint8 [N, H, W, 3] -> dict(pool, spatial, probs)).
      ref_images_or_stats: reference images uint8 [M, H, W, 3], or a dict holding any of
        `pool`/`spatial` (reference activations [M, D]/[M, D2]) and `mu`, `sigma`, `mu_s`,
        `sigma_s` (precomputed statistics, used in preference to the activations, as the
        reference evaluator does). Without `pool` activations precision/recall are NaN.
      sample_images: uint8 [N, H, W, 3].
      is_split_size, pr_row_batch, pr_col_batch: the reference's chunk sizes.

    Returns:
      dict(inception_score, fid, sfid, precision, recall) of floats.
    """
    if isinstance(ref_images_or_stats, dict):
        ref = dict(ref_images_or_stats)
    else:
        ref = extractor(ref_images_or_stats)
    sample = extractor(sample_images)
    return metrics_from_activations(
        ref,
        sample,
        is_split_size=is_split_size,
        pr_row_batch=pr_row_batch,
        pr_col_batch=pr_col_batch,
    )


def _stats(acts: dict, mean_key: str, cov_key: str, act_key: str):
    if mean_key in acts and cov_key in acts:
        return np.asarray(acts[mean_key]), np.asarray(acts[cov_key])
    if act_key not in acts:
        raise ValueError(f"reference has neither {mean_key}/{cov_key} nor {act_key} activations")
    return metrics.compute_statistics(acts[act_key])


def metrics_from_activations(
    ref: dict, sample: dict, *, is_split_size=5000, pr_row_batch=10000, pr_col_batch=10000
) -> dict:
    """The five metrics from extractor outputs (see `evaluate_samples` for `ref`'s keys)."""
    fid = metrics.frechet_distance(
        *_stats(sample, "mu", "sigma", "pool"), *_stats(ref, "mu", "sigma", "pool")
    )
    sfid = metrics.frechet_distance(
        *_stats(sample, "mu_s", "sigma_s", "spatial"), *_stats(ref, "mu_s", "sigma_s", "spatial")
    )
    if "pool" in ref:
        precision, recall = metrics.precision_recall(
            ref["pool"], sample["pool"], row_batch_size=pr_row_batch, col_batch_size=pr_col_batch
        )
    else:
        print("reference batch has no images: precision and recall are not computed")
        precision = recall = float("nan")
    return {
        "inception_score": metrics.inception_score(sample["probs"], is_split_size),
        "fid": fid,
        "sfid": sfid,
        "precision": precision,
        "recall": recall,
    }


# ----------------------------------------------------------------------------- files


# What np.load raises on a damaged or foreign .npz (a truncated member, a pickled object array).
_NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _npz_keys(path, what: str = "batch file") -> list[str]:
    errors.require_file(path, what, "give the path of an .npz file written by np.savez")
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise errors.InputError(
            f"{what} {path} is not an .npz file (np.savez output), or is truncated: {e}"
        ) from e


def _read_arrays(path, keys, what: str) -> dict[str, np.ndarray]:
    """The arrays `keys` of an .npz, as a one-line InputError when the file cannot be read."""
    try:
        with np.load(path) as z:
            return {k: np.asarray(z[k]) for k in keys}
    except _NPZ_READ_ERRORS as e:
        raise errors.InputError(
            f"{what} {path} cannot be read ({type(e).__name__}: {e}): it is truncated, corrupt or "
            "holds pickled objects; write it again with np.savez"
        ) from e


def check_images(images: np.ndarray, path, what: str) -> np.ndarray:
    """Validates a batch's `arr_0`: uint8, NHWC, 3 channels, at least 2 images."""
    if images.dtype != np.uint8:
        rng = f"values {float(images.min()):.3g}..{float(images.max()):.3g}" if images.size else ""
        raise errors.InputError(
            f"{what} {path}: arr_0 must be uint8 images in 0..255 (NHWC); got dtype "
            f"{images.dtype} {rng}. Convert samples with ((x + 1) * 127.5).round().clip(0, 255)"
            ".astype(np.uint8) before saving"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        nchw = images.ndim == 4 and images.shape[1] == 3
        raise errors.InputError(
            f"{what} {path}: arr_0 must have shape [N, H, W, 3]; got {images.shape}"
            + (" (this looks NCHW: transpose to NHWC)" if nchw else "")
        )
    if images.shape[0] < 2:
        raise errors.InputError(
            f"{what} {path}: need at least 2 images for statistics; got {len(images)}"
        )
    return images


def read_sample_batch(path) -> np.ndarray:
    """`arr_0` of a sample batch, validated (uint8 [N, H, W, 3])."""
    keys = _npz_keys(path, "sample batch")
    if "arr_0" not in keys:
        raise errors.InputError(
            f"sample batch {path} has no arr_0 (keys: {keys}); sampling writes "
            "np.savez(path, arr_0=uint8 [N, H, W, 3], arr_1=labels)"
        )
    images = _read_arrays(path, ["arr_0"], "sample batch")["arr_0"]
    return check_images(images, path, "sample batch")


def read_reference_batch(path) -> tuple[np.ndarray | None, dict]:
    """(images or None, stats dict with any of mu/sigma/mu_s/sigma_s) of a reference batch."""
    keys = _npz_keys(path, "reference batch")
    wanted = [k for k in ("arr_0", "mu", "sigma", "mu_s", "sigma_s") if k in keys]
    stats = _read_arrays(path, wanted, "reference batch")
    images = stats.pop("arr_0", None)
    if images is not None:
        images = check_images(images, path, "reference batch")
    if stats and set(stats) != {"mu", "sigma", "mu_s", "sigma_s"}:
        raise errors.InputError(
            f"reference batch {path} has only {sorted(stats)} of mu, sigma, mu_s, sigma_s"
        )
    if images is None and not stats:
        raise errors.InputError(
            f"reference batch {path} has neither arr_0 images nor mu/sigma statistics "
            f"(keys: {keys}); a reference batch is np.savez(path, arr_0=uint8 [N, H, W, 3])"
        )
    if not stats:
        print(f"reference batch {path} has no mu/sigma: computing statistics from its images")
    return images, stats


def _file_hash(path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _cache_path(ref_path, weights_path, resize: str, workdir) -> pathlib.Path:
    key = hashlib.sha256(
        f"{_file_hash(ref_path)}|{_file_hash(weights_path)}|{resize}".encode()
    ).hexdigest()[:20]
    ref_path = pathlib.Path(ref_path)
    name = f"{ref_path.stem}.gdiff_acts_{key}.npz"
    if os.access(ref_path.parent, os.W_OK):
        return ref_path.parent / name
    return pathlib.Path(workdir or ".") / name


# ----------------------------------------------------------------------------- weights


def load_inception_variables(path) -> dict:
    """FID-Inception variables from `classify_image_graph_def.pb`, a pytorch-fid `.pth`, or an
    `.npz` of state-dict arrays."""
    if not path:
        raise errors.MissingInputError("config.eval.inception_weights is empty. " + WEIGHTS_HELP)
    if not os.path.exists(path):
        raise errors.MissingInputError(
            f"inception weights file {path} does not exist. " + WEIGHTS_HELP
        )
    if os.path.isdir(path):
        raise errors.MissingInputError(
            f"inception weights file {path} is a directory, not a weights file. " + WEIGHTS_HELP
        )
    if str(path).endswith(".pb"):
        return inception_weights.load_fid_inception_graph_def(path)
    if str(path).endswith(".npz"):
        with np.load(path) as z:
            state = {k: z[k] for k in z.files if k != "config_json"}
    else:
        state = load_torch_state_dict(path)
    return inception_weights.convert_fid_inception_state_dict(state)


# ----------------------------------------------------------------------------- entry points


def build_extractor(weights_path, *, batch_size: int = 64, resize: str = "legacy"):
    """The ADM evaluator's FID Inception-v3 from a weights file (`load_inception_variables`), run
    in batches of `batch_size` after resizing to 299 with `resize` ("legacy" | "halfpixel")."""
    return features.InceptionExtractor(
        load_inception_variables(weights_path), batch_size=batch_size, resize=resize
    )


def load_reference(
    ref_path, extractor, *, weights_path="", resize="legacy", workdir=None, batch=None
) -> dict:
    """What every sample batch is scored against: a reference batch's statistics and activations.

    The batch's own `mu`, `sigma`, `mu_s`, `sigma_s` (whole-dataset statistics) are kept, as the
    reference evaluator keeps them; its images' `pool` / `spatial` activations (precision/recall,
    and FID/sFID when the batch has no statistics) are computed once and cached next to the batch
    (`_cache_path`, keyed by the batch, the weights file and `resize`; no cache without a weights
    file).

    Returns:
      dict with any of mu, sigma, mu_s, sigma_s and pool [M, D], spatial [M, D2].

    `batch` is `read_reference_batch(ref_path)` when the caller has already read (validated) it.
    """
    ref_images, ref_stats = batch if batch is not None else read_reference_batch(ref_path)
    ref = dict(ref_stats)
    if ref_images is None:
        return ref
    cache = _cache_path(ref_path, weights_path, resize, workdir) if weights_path else None
    if cache is not None and cache.exists():
        cached = _read_cache(cache, len(ref_images))
        if cached is not None:
            print(f"reading cached reference activations {cache}")
            ref.update(cached)
            return ref
    print("computing reference batch activations...")
    acts = extractor(ref_images)
    ref.update(pool=acts["pool"], spatial=acts["spatial"])
    if cache is not None:
        # Atomic: a run killed mid-write leaves no truncated cache for the next one to trust.
        atomic.savez(cache, pool=acts["pool"], spatial=acts["spatial"])
    return ref


def _read_cache(cache: pathlib.Path, num_images: int) -> dict | None:
    """The cached `pool` / `spatial` activations of `num_images` reference images, or None (with
    a warning) when the cache file is damaged (truncated, unreadable, missing an array, or of the
    wrong length): the caller then computes them again and replaces the file."""
    try:
        with np.load(cache) as z:
            acts = {k: np.asarray(z[k]) for k in ("pool", "spatial")}
        bad = [f"{k}: shape {v.shape}" for k, v in acts.items() if v.shape[:1] != (num_images,)]
        damaged = "; ".join(bad) or None
    except _NPZ_READ_ERRORS as e:
        damaged = f"{type(e).__name__}: {e}"
    if damaged is None:
        return acts
    logging.warning(
        "cached reference activations %s are damaged (%s; %d reference images): computing them "
        "again and replacing the file",
        cache,
        damaged,
        num_images,
    )
    return None


def evaluate_files(
    ref_path,
    sample_path,
    weights_path,
    *,
    batch_size: int = 64,
    resize: str = "legacy",
    workdir=None,
    output=None,
    is_split_size: int = 5000,
    extractor=None,
) -> dict:
    """Evaluates a sample batch file against a reference batch file; prints and writes the JSON.

    Returns:
      dict(inception_score, fid, sfid, precision, recall).
    """
    # Validate both files before the (slow) network is built.
    ref_batch = read_reference_batch(ref_path)
    sample_images = read_sample_batch(sample_path)
    if extractor is None:
        extractor = build_extractor(weights_path, batch_size=batch_size, resize=resize)
    ref = load_reference(
        ref_path,
        extractor,
        weights_path=weights_path,
        resize=resize,
        workdir=workdir,
        batch=ref_batch,
    )
    print("computing sample batch activations...")
    sample = extractor(sample_images)
    print("computing evaluations...")
    results = metrics_from_activations(ref, sample, is_split_size=is_split_size)
    for key in METRIC_NAMES:
        print(f"{PRINT_NAMES[key]}: {results[key]}")
    _write_record(results, ref_path, sample_path, output, workdir)
    return results


def _write_record(results: dict, ref_path, sample_path, output, workdir) -> None:
    """The metrics JSON: `output`, else next to the sample batch (else in the workdir)."""
    if output is None:
        sample_path = pathlib.Path(sample_path)
        output = sample_path.with_name(sample_path.stem + "_metrics.json")
        if not os.access(output.parent, os.W_OK):
            output = pathlib.Path(workdir or ".") / output.name
    output = pathlib.Path(output)
    record = dict(results, ref_batch=str(ref_path), sample_batch=str(sample_path))
    # Replaces the name (a symlink planted there included), never writes through it.
    atomic.write_text(output, json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


def run(config, workdir) -> dict:
    """`--mode=evaluate`: reads `config.eval` (ref_batch, sample_batch, inception_weights,
    batch_size, output; optional resize, is_split_size) and evaluates."""
    ev = config.eval
    if not ev.ref_batch or not ev.sample_batch:
        raise errors.ConfigError(
            "--mode=evaluate needs --config.eval.ref_batch=REF.npz and "
            "--config.eval.sample_batch=SAMPLES.npz"
        )
    return evaluate_files(
        ev.ref_batch,
        ev.sample_batch,
        ev.inception_weights,
        batch_size=int(ev.batch_size),
        resize=str(ev.resize),
        workdir=workdir,
        output=ev.output or None,
        is_split_size=int(ev.is_split_size),
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ref_batch", help="reference batch .npz (arr_0 images, optional mu/sigma)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0 uint8 NHWC)")
    parser.add_argument(
        "--weights",
        default=os.environ.get("GDIFF_INCEPTION_WEIGHTS", ""),
        help="classify_image_graph_def.pb or pt_inception-2015-12-05 .pth",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--resize", default="legacy", choices=("legacy", "halfpixel"))
    parser.add_argument("--output", default=None, help="metrics JSON path")
    args = parser.parse_args(argv)
    return evaluate_files(
        args.ref_batch,
        args.sample_batch,
        args.weights,
        batch_size=args.batch_size,
        resize=args.resize,
        output=args.output,
    )


def _command() -> None:
    """`python -m gdiff.evaluation.evaluator`: a GdiffError ends in one line, as `gdiff` does."""
    try:
        main()
    except errors.GdiffError as e:
        print(f"gdiff: {e}", file=sys.stderr)
        sys.exit(e.exit_status)


if __name__ == "__main__":
    _command()
