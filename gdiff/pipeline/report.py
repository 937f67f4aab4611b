"""The digits pipeline's outputs: results table (CSV + markdown), the metrics-vs-scale plot, grids,
and a plain-language summary derived from the measured numbers.

Every number written here comes from the rows the pipeline measured; nothing is hard-coded.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import figure

# Per-scale columns of results.csv, in order.
COLUMNS = ("scale", "accuracy", "log_prob", "fid", "precision", "recall", "inception_score")
METRICS = COLUMNS[1:]
DESCRIPTIONS = {
    "accuracy": "the evaluation network's top-1 accuracy at the requested labels (class fidelity)",
    "log_prob": "mean log p(requested label | sample, t=0) under the noise-aware guidance "
    "classifier",
    "fid": "Frechet distance to held-out real digits in the evaluation network's features (lower "
    "is better)",
    "precision": "fraction of samples inside the real digits' k=3 feature manifold (fidelity)",
    "recall": "fraction of real digits inside the samples' k=3 feature manifold (diversity)",
    "inception_score": "Inception Score computed with the evaluation network's class probabilities",
}
TITLES = {
    "accuracy": "accuracy at requested label",
    "log_prob": "guidance classifier log p(y|x)",
    "fid": "FID (eval features)",
    "precision": "precision",
    "recall": "recall",
    "inception_score": "IS (eval network)",
}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def format_scale(scale: float) -> str:
    return f"{float(scale):g}"


def write_csv(rows: Sequence[Mapping[str, float]], path: str | os.PathLike) -> pathlib.Path:
    """results.csv: one row per guidance scale with COLUMNS (floats)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: repr(float(row[k])) for k in COLUMNS})
    os.replace(tmp, path)  # a half-written table never looks finished to a rerun
    return path


def read_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a results.csv written by `write_csv` (ValueError when columns are missing)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}; delete it to re-evaluate")
        return [{k: float(r[k]) for k in COLUMNS} for r in reader]


def write_markdown(
    rows: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    *,
    baseline: Mapping[str, float] | None = None,
    summary: str = "",
    details: Mapping[str, Any] | None = None,
    images: Sequence[str] = (),
) -> pathlib.Path:
    """results.md: the table (plus a real-digits baseline row), column meanings, run details."""
    lines = ["# Classifier guidance on digits: the scale sweep", ""]
    header = "| scale | " + " | ".join(METRICS) + " |"
    lines += [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [format_scale(row["scale"])] + [_fmt(row[k]) for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    if baseline:
        cells = ["real digits"] + [_fmt(baseline.get(k)) for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if baseline:
        lines += [
            "The last row scores real training digits that the evaluation network never saw (as "
            "many as samples per scale, same label balance) the same way: the values real data "
            "reaches on this measuring stick.",
            "",
        ]
    lines += ["Columns:", ""]
    lines += [f"- `{k}`: {DESCRIPTIONS[k]}" for k in METRICS]
    lines.append("")
    if summary:
        lines += ["## What the table says", "", summary, ""]
    for image in images:
        lines += [f"![{image}]({image})", ""]
    if details:
        lines += ["## Run", ""]
        lines += [f"- {k}: {v}" for k, v in details.items()]
        lines.append("")
    path = pathlib.Path(path)
    path.write_text("\n".join(lines))
    return path


def plot(
    rows: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    *,
    baseline: Mapping[str, float] | None = None,
) -> pathlib.Path:
    """scale_sweep.png: one panel per metric against the guidance scale (the real-digit value as a
    dashed line). The x axis is symlog so scale 0 and the large scales share one plot."""
    scales = [r["scale"] for r in rows]
    fig = figure.Figure(figsize=(3.0 * len(METRICS), 2.9))
    axes = fig.subplots(1, len(METRICS))
    for ax, key in zip(axes, METRICS, strict=True):
        ax.plot(scales, [r[key] for r in rows], marker="o")
        if baseline and key in baseline and np.isfinite(baseline[key]):
            ax.axhline(baseline[key], color="grey", linestyle="--", linewidth=1, label="real")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xticks(scales, [format_scale(s) for s in scales], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("classifier scale")
        ax.set_title(TITLES[key], fontsize=9)
        ax.grid(alpha=0.3)
    if baseline:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    return path


def save_sweep_figure(
    grids: Mapping[float, np.ndarray], path: str | os.PathLike, *, zoom: int = 1
) -> pathlib.Path:
    """One picture of every scale's class grid side by side (uint8 [H, W, 3] each), titled."""
    scales = list(grids)
    first = np.asarray(grids[scales[0]])
    # Panels as wide as the grids' aspect needs (rows = classes makes them tall), plus a title.
    height, width = first.shape[0], first.shape[1]
    panel = max(1.2, width * zoom / 100.0)
    fig = figure.Figure(figsize=(panel * len(scales), panel * height / width + 0.4))
    axes = fig.subplots(1, len(scales))
    axes = np.atleast_1d(axes)
    for ax, scale in zip(axes, scales, strict=True):
        ax.imshow(np.asarray(grids[scale]), interpolation="nearest")
        ax.set_title(f"scale {format_scale(scale)}")
        ax.axis("off")
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    return path


def _trend(values: Sequence[float], scales: Sequence[float]) -> str:
    """'rises from X at scale a to Y at scale b' (or falls / stays), from first to last scale."""
    first, last = float(values[0]), float(values[-1])
    spread = max(abs(first), abs(last), 1e-12)
    if abs(last - first) <= 0.02 * spread:
        return (
            f"stays near {_fmt(first, 3)} ({_fmt(first, 3)} at scale {format_scale(scales[0])}, "
            f"{_fmt(last, 3)} at scale {format_scale(scales[-1])})"
        )
    verb = "rises" if last > first else "falls"
    return (
        f"{verb} from {_fmt(first, 3)} at scale {format_scale(scales[0])} to {_fmt(last, 3)} at "
        f"scale {format_scale(scales[-1])}"
    )


def summarize(
    rows: Sequence[Mapping[str, float]], *, baseline: Mapping[str, float] | None = None
) -> str:
    """A few plain sentences about the sweep, computed from the rows (sorted by scale)."""
    rows = sorted(rows, key=lambda r: r["scale"])
    if not rows:
        raise ValueError("no results to summarize")
    scales = [r["scale"] for r in rows]
    col = {k: [r[k] for r in rows] for k in METRICS}
    if len(rows) == 1:
        r = rows[0]
        return (
            f"Only scale {format_scale(r['scale'])} was sampled: accuracy "
            f"{_fmt(r['accuracy'], 3)}, FID {_fmt(r['fid'], 3)}, precision "
            f"{_fmt(r['precision'], 3)}, recall {_fmt(r['recall'], 3)}."
        )
    best_fid = int(np.nanargmin(col["fid"])) if np.any(np.isfinite(col["fid"])) else 0
    peak_acc = int(np.nanargmax(col["accuracy"]))
    parts = [
        f"Accuracy at the requested labels {_trend(col['accuracy'], scales)}"
        + (
            f" (highest, {_fmt(col['accuracy'][peak_acc], 3)}, at scale "
            f"{format_scale(scales[peak_acc])})."
            if col["accuracy"][peak_acc] > col["accuracy"][-1]
            else "."
        ),
        f"The guidance classifier's log-probability of the requested label "
        f"{_trend(col['log_prob'], scales)}.",
        f"Recall (diversity) {_trend(col['recall'], scales)}; precision (fidelity) "
        f"{_trend(col['precision'], scales)}.",
        f"FID {_trend(col['fid'], scales)}, lowest ({_fmt(col['fid'][best_fid], 3)}) at scale "
        f"{format_scale(scales[best_fid])}.",
    ]
    if baseline:
        parts.append(
            f"Real digits score accuracy {_fmt(baseline['accuracy'], 3)}, FID "
            f"{_fmt(baseline['fid'], 3)}, recall {_fmt(baseline['recall'], 3)} on the same "
            "measuring stick."
        )
    acc_up = col["accuracy"][-1] > col["accuracy"][0]
    # "Falls at large scales": the largest scale ends below the unguided (smallest-scale) recall.
    recall_down = col["recall"][-1] < col["recall"][0]
    if acc_up and recall_down:
        parts.append(
            "This is the paper's trade-off (Table 4, Fig. 4): a larger classifier scale buys "
            "class fidelity at the price of diversity."
        )
    else:
        missing = []
        if not acc_up:
            missing.append("accuracy does not rise with the scale")
        if not recall_down:
            missing.append("recall does not fall at large scales")
        parts.append(
            "Unlike the paper's ablation, " + " and ".join(missing) + " in this run; the models "
            "may be undertrained for this budget (raise train.num_steps and "
            "train.classifier_num_steps)."
        )
    return " ".join(parts)
