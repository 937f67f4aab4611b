"""`--mode=sweep`: the classifier-scale ablation (the paper's Fig. 4 / Table 4).

Samples every scale of `sample.classifier_scale` in one compiled program over shared noise and
labels (gdiff/sampling/run.py), evaluates each scale's samples against `eval.ref_batch`, and writes
to the workdir:

    scale_sweep.csv   scale, fid, sfid, inception_score, precision, recall, classifier_accuracy
    scale_sweep.md    the same as a markdown table
    scale_sweep.png   each metric against the scale (matplotlib, Agg backend)

Metrics come from any `gdiff.evaluation.FeatureExtractor` (the FID Inception-v3 for ImageNet
configs, built from `eval.inception_weights`); `classifier_accuracy` is the top-1 accuracy of the
guidance classifier (at t = 0) on the samples at the labels they were drawn for.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from matplotlib import figure

from gdiff import checkpointing, distributed, factory
from gdiff.evaluation import evaluator, features
from gdiff.sampling import labels as labels_lib
from gdiff.sampling import run as sample_run
from gdiff.sampling import shards

COLUMNS = ("scale", "fid", "sfid", "inception_score", "precision", "recall", "classifier_accuracy")
METRICS = COLUMNS[1:]


def compute_metrics(extractor, ref, images: np.ndarray) -> dict[str, float]:
    """FID, sFID, IS, precision, recall of uint8 `images` [N, H, W, 3] against `ref`.

    Args:
      extractor: any `gdiff.evaluation.FeatureExtractor` (images -> dict(pool, spatial, probs)).
      ref: reference images uint8 [M, H, W, 3] or a dict of reference activations / statistics
        (what `gdiff.evaluation.evaluate_samples` accepts).
    """
    out = evaluator.evaluate_samples(
        extractor, ref, images, is_split_size=min(5000, max(1, len(images)))
    )
    return {k: float(out[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall")}


def guidance_accuracy(classifier, variables, images: np.ndarray, labels, batch_size: int = 256):
    """Top-1 accuracy of the noise-aware classifier at t = 0 on uint8 samples [N, H, W, 3]."""
    apply = jax.jit(
        lambda v, x: classifier.apply(
            v, x.astype(jnp.float32) / 127.5 - 1.0, jnp.zeros((x.shape[0],), jnp.int32)
        )
    )
    labels = np.asarray(labels)
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = np.asarray(apply(variables, images[start : start + batch_size]))
        correct += int(np.sum(np.argmax(logits, -1) == labels[start : start + batch_size]))
    return correct / max(len(images), 1)


def _reference(config, extractor):
    """Checks the evaluation inputs BEFORE hours of sampling; returns (extractor, ref)."""
    ev = config.eval
    if not ev.ref_batch:
        raise ValueError(
            "the scale sweep evaluates every scale against a reference batch: set "
            "--config.eval.ref_batch=REF.npz (e.g. VIRTUAL_imagenet64_labeled.npz)"
        )
    if not os.path.exists(ev.ref_batch):
        raise FileNotFoundError(f"eval.ref_batch={ev.ref_batch} does not exist")
    ref_images, ref_stats = evaluator.read_reference_batch(ev.ref_batch)
    if extractor is None:
        # Raises FileNotFoundError with download instructions when the weights are missing.
        variables = evaluator.load_inception_variables(ev.inception_weights)
        extractor = features.InceptionExtractor(variables, batch_size=int(ev.batch_size))
    if ref_images is None:
        return extractor, dict(ref_stats)
    return extractor, ref_images


def write_table(rows: list[dict[str, Any]], directory) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `scale_sweep.csv` and `scale_sweep.md` (one row per scale, COLUMNS)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = directory / "scale_sweep.csv", directory / "scale_sweep.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [labels_lib.format_scale(row["scale"])]
        cells += [_fmt(row[k]) for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _fmt(value: float) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.4g}")
    )


def plot(rows: list[dict[str, Any]], path) -> pathlib.Path:
    """scale_sweep.png: one panel per metric against the guidance scale."""
    scales = [r["scale"] for r in rows]
    fig = figure.Figure(figsize=(3.2 * len(METRICS), 3.0))
    axes = fig.subplots(1, len(METRICS))
    for ax, key in zip(axes, METRICS, strict=True):
        ax.plot(scales, [r[key] for r in rows], marker="o")
        ax.set_xlabel("classifier scale")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    return path


def run(config, workdir: str, *, extractor=None, mesh=None) -> list[dict[str, Any]]:
    """Samples every scale, evaluates each, and writes the table and the plot to `workdir`.

    Args:
      config: a gdiff config whose `sample.classifier_scale` lists the scales.
      workdir: checkpoints (defaults) and outputs.
      extractor: the feature extractor for the metrics; default the FID Inception-v3 from
        `eval.inception_weights` (a clear error when that or `eval.ref_batch` is missing).
      mesh: the sampling device mesh (default: all devices).

    Returns:
      The table rows: dicts with COLUMNS.
    """
    scales = labels_lib.parse_scales(config.sample.classifier_scale)
    extractor, ref = _reference(config, extractor)
    paths = sample_run.run(config, workdir, mesh=mesh)

    classifier = classifier_vars = None
    if any(s != 0 for s in scales):
        classifier = factory.build_classifier(config)
        ckpt = config.sample.classifier_checkpoint or workdir
        classifier_vars = sample_run._as_variables(
            checkpointing.load_params(ckpt, kind="classifier")
        )
    rows = []
    for scale in scales:
        images, labels = shards.read_sample_file(paths[scale])
        row = {"scale": float(scale), **compute_metrics(extractor, ref, images)}
        row["classifier_accuracy"] = (
            guidance_accuracy(classifier, classifier_vars, images, labels)
            if classifier is not None and labels is not None
            else float("nan")
        )
        logging.info("scale %s: %s", labels_lib.format_scale(scale), row)
        rows.append(row)
    if distributed.is_main_process():
        write_table(rows, workdir)
        plot(rows, pathlib.Path(workdir) / "scale_sweep.png")
    return rows
