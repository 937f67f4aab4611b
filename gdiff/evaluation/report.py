"""The one report of sweeps: rows (model x scale) -> CSV, markdown table, plot, sample figure,
and a plain-language summary derived from the numbers. `--mode=sweep` and the digits pipeline
both write through it; a quality-against-cost sweep (rows of samplers x NFE, the digits job's
solver sweep) adds its plot against the NFE and its summary (`plot_against_nfe`,
`summarize_nfe`).

A row is a dict: `model` (str), `scale` (float), optionally `guidance` (str: the guidance kind
and interval, `GuidanceRow.method`; present when a table compares kinds), `step` (int, or None
for a parameter checkpoint: the training step of the checkpoint sampled; present when a table
compares checkpoints of one run), `sampler` (str) and `nfe` (int), and metric columns (floats,
NaN where a row has no value); which metric columns a table has is whatever
`gdiff.evaluation.scoring.Scorer` produced. A table over training steps plots and summarizes
each model's scales and guidance kinds at its newest step (`newest`), and each curve's metrics
against the step (`plot_against_step`, `summarize_steps`).
Every number written here comes from the rows; nothing is hard-coded.
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

from gdiff import atomic
from gdiff.sampling import labels as labels_lib

# Every column a table may have, in table order (the paper's Table 4 first, then the columns at
# the requested labels); a table has those its rows hold.
COLUMNS = (
    "model",
    "scale",
    "sampler",
    "nfe",
    "fid",
    "sfid",
    "inception_score",
    "precision",
    "recall",
    "eval_accuracy",
    "classifier_accuracy",
    "log_prob",
)
# The column of a table comparing guidance kinds (`series`), after `model`; tables of the
# classifier scale alone (the paper's Table 4) have only COLUMNS.
GUIDANCE = "guidance"
# The column of a table over a run's checkpoints (`--mode=sweep` with sample.checkpoint_steps),
# after `model` (and `guidance`).
STEP = "step"
DESCRIPTIONS = {
    "model": "the diffusion model sampled (all models share the noise, the labels and the "
    "guidance classifier)",
    "guidance": "how the row is guided: classifier (the gradient s * grad log p(y|x_t)), cfg "
    "(the model's null label as the guide u), two_network (an unconditional model as u), "
    "autoguidance (a weaker version of the model as u), +classifier s (a classifier gradient "
    "on top), and the noise levels sigma it is applied at (every step unless an interval is "
    "given)",
    "step": "the training step of the checkpoint sampled (n/a: a parameter checkpoint); the "
    "rows of a model at its newest step are its scale sweep, the others its training curve",
    "scale": "the classifier scale s of the guidance gradient s * grad log p(y|x_t); for cfg, "
    "two_network and autoguidance the weight w of u + w (c - u) (1: the model alone)",
    "sampler": "the sampler that drew the row (ancestral, DDIM, DPM-Solver++(2M): multistep "
    "DPM-Solver++ of order 2, ...), from the same noise as every other row",
    "nfe": "network evaluations per sample (sampler steps; guided, each also a classifier "
    "gradient)",
    "eval_accuracy": "the evaluation network's top-1 accuracy at the requested labels (an "
    "independent clean-image classifier: class fidelity)",
    "classifier_accuracy": "the guidance classifier's top-1 accuracy at the requested labels (t=0)",
    "log_prob": "mean log p(requested label | sample, t=0) under the guidance classifier",
    "fid": "Frechet distance to the reference in the feature network's pooled features (lower is "
    "better)",
    "sfid": "the same in its spatial features (lower is better)",
    "inception_score": "Inception Score from the feature network's class probabilities",
    "precision": "fraction of samples inside the reference's k=3 feature manifold (fidelity)",
    "recall": "fraction of the reference inside the samples' k=3 feature manifold (diversity)",
}
TITLES = {
    "eval_accuracy": "accuracy at requested label",
    "classifier_accuracy": "guidance classifier accuracy",
    "log_prob": "guidance classifier log p(y|x)",
    "fid": "FID",
    "sfid": "sFID",
    "inception_score": "IS",
    "precision": "precision",
    "recall": "recall",
}


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: 4 significant digits, scientific below 1e-3, n/a for None / NaN."""
    if value is None:
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The table's columns: those of COLUMNS that the rows hold, in COLUMNS order."""
    if not rows:
        raise ValueError("no rows to report")
    cols = [c for c in COLUMNS if c in rows[0]]
    # A table comparing guidance kinds names each row's kind, one over a run's checkpoints its
    # step, after its model.
    cols[1:1] = [c for c in (GUIDANCE, STEP) if c in rows[0]]
    return cols


# The columns that say what a row is (the rest are its measurements), and how each is typed.
ROW_COLUMNS = ("model", "guidance", "step", "scale", "sampler", "nfe")
_TEXT_COLUMNS = ("model", "guidance", "sampler")
_INT_COLUMNS = ("step", "nfe")


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [c for c in columns(rows) if c not in ROW_COLUMNS]


def _cell(key: str, value: Any) -> str:
    """A CSV cell: text as is, NFE and step as integers (no step: empty), floats as repr (every
    digit)."""
    if key in _TEXT_COLUMNS:
        return str(value)
    if key in _INT_COLUMNS:
        return "" if value is None else str(int(value))
    return repr(float(value))


def _parse(key: str, text: str) -> Any:
    if key in _TEXT_COLUMNS:
        return text
    if key in _INT_COLUMNS:
        return int(text) if text else None
    return float(text)


def _shown(key: str, value: Any) -> str:
    """A markdown cell of a column that says what a row is."""
    if key == "scale":
        return labels_lib.format_scale(value)
    return "n/a" if value is None else str(value)


def series(row: Mapping[str, Any]) -> str:
    """The curve a row lies on: its model, and its guidance when the table compares kinds."""
    return f"{row['model']}, {row['guidance']}" if row.get("guidance") else str(row["model"])


def models(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The series of the rows (`series`: models, or models and guidance), in order of first
    appearance."""
    return list(dict.fromkeys(series(r) for r in rows))


def unguided_scale(row: Mapping[str, Any]) -> float:
    """The scale at which a row's guidance does nothing: 0 for a classifier scale, 1 for the
    weight w of output guidance."""
    return 0.0 if str(row.get("guidance") or "classifier").startswith("classifier") else 1.0


# ----------------------------------------------------------------------------- CSV


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> pathlib.Path:
    """One row per (model, scale); floats as repr, so the file holds every digit computed."""
    path = pathlib.Path(path)
    cols = columns(rows)
    # Atomic: a half-written table never looks finished to a rerun.
    with atomic.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(k, row[k]) for k in cols})
    return path


def read_csv(path: str | os.PathLike, required: Sequence[str] = ("model", "scale")) -> list[dict]:
    """The rows of a table written by `write_csv` (ValueError when `required` columns are
    missing)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}; delete it to re-evaluate")
        return [{k: _parse(k, v) for k, v in r.items()} for r in reader]


# ----------------------------------------------------------------------------- markdown


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    baseline: Mapping[str, float] | None = None,
    baseline_name: str = "reference",
) -> list[str]:
    """The table's lines: one row per (model, scale), then the baseline row (no scale)."""
    cols, metrics = columns(rows), metric_columns(rows)
    names = [c for c in cols if c in ROW_COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [_shown(k, row[k]) for k in names]
        lines.append("| " + " | ".join(cells + [fmt(row[k]) for k in metrics]) + " |")
    if baseline:
        cells = [baseline_name] + [""] * (len(names) - 1) + [fmt(baseline.get(k)) for k in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str,
    baseline: Mapping[str, float] | None = None,
    baseline_name: str = "reference",
    notes: Sequence[str] = (),
    summary: str = "",
    details: Mapping[str, Any] | None = None,
    images: Sequence[str] = (),
) -> pathlib.Path:
    """The table, paragraphs of `notes`, the column meanings, the summary, images, run details."""
    lines = [f"# {title}", ""]
    lines += markdown_table(rows, baseline=baseline, baseline_name=baseline_name) + [""]
    for note in notes:
        lines += [note, ""]
    lines += ["Columns:", ""]
    lines += [f"- `{k}`: {DESCRIPTIONS[k]}" for k in columns(rows)]
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
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, "\n".join(lines))
    return path


# ----------------------------------------------------------------------------- figures


def plot(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    baseline: Mapping[str, float] | None = None,
    baseline_name: str = "reference",
) -> pathlib.Path:
    """One panel per metric against the classifier scale, one line per model (the baseline as a
    dashed line). The x axis is symlog so scale 0 and the large scales share one plot."""
    metrics = metric_columns(rows)
    scales = sorted({r["scale"] for r in rows})
    ncols = min(4, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig = figure.Figure(figsize=(3.2 * ncols, 2.8 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, key in zip(axes, metrics, strict=False):
        for model in models(rows):
            mine = [r for r in rows if series(r) == model]
            ax.plot([r["scale"] for r in mine], [r[key] for r in mine], marker="o", label=model)
        if baseline and np.isfinite(baseline.get(key, math.nan)):
            ax.axhline(baseline[key], color="grey", ls="--", lw=1, label=baseline_name)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xticks(scales, [labels_lib.format_scale(s) for s in scales], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("guidance scale" if "guidance" in rows[0] else "classifier scale")
        ax.set_title(TITLES[key], fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    return path


def save_sweep_figure(
    grids: Mapping[tuple[str, Any], np.ndarray], path: str | os.PathLike, *, zoom: int = 1
) -> pathlib.Path:
    """Every (model, scale)'s sample grid (uint8 [H, W, 3]) in one picture: a row per model, a
    column per scale (a number, or a title of its own: a guidance row's), titled."""
    names = list(dict.fromkeys(m for m, _ in grids))
    per_model = {m: [s for n, s in grids if n == m] for m in names}
    ncols = max(len(v) for v in per_model.values())
    height, width = np.asarray(next(iter(grids.values()))).shape[:2]
    panel = max(1.2, width * zoom / 100.0)
    fig = figure.Figure(figsize=(panel * ncols, (panel * height / width + 0.4) * len(names)))
    axes = np.asarray(fig.subplots(len(names), ncols, squeeze=False))
    for i, model in enumerate(names):
        for j in range(ncols):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(per_model[model]):
                scale = per_model[model][j]
                ax.imshow(np.asarray(grids[(model, scale)]), interpolation="nearest")
                title = (
                    scale if isinstance(scale, str) else f"scale {labels_lib.format_scale(scale)}"
                )
                ax.set_title(f"{model}, {title}" if len(names) > 1 else title, fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- summary


def _trend(values: Sequence[float], points: Sequence[float], unit: str = "scale") -> str:
    """'rises from X at scale a to Y at scale b' (or falls / stays), from the first point to the
    last (`unit`: "scale", or "step" for training steps)."""
    first, last = float(values[0]), float(values[-1])
    show = labels_lib.format_scale if unit == "scale" else (lambda p: str(int(p)))
    a, b = show(points[0]), show(points[-1])
    if abs(last - first) <= 0.02 * max(abs(first), abs(last), 1e-12):
        return f"stays near {fmt(first, 3)} ({fmt(first, 3)} at {unit} {a}, {fmt(last, 3)} at {b})"
    verb = "rises" if last > first else "falls"
    return f"{verb} from {fmt(first, 3)} at {unit} {a} to {fmt(last, 3)} at {unit} {b}"


def accuracy_key(rows) -> str | None:
    """The accuracy the summary speaks of: the independent evaluation network's when present."""
    for key in ("eval_accuracy", "classifier_accuracy"):
        if key in rows[0] and np.any(np.isfinite([r[key] for r in rows])):
            return key
    return None


def _model_sentences(rows: Sequence[Mapping[str, Any]], acc: str | None) -> list[str]:
    """The trend of each metric over one model's scales, and whether it is the paper's trade-off."""
    scales = [r["scale"] for r in rows]
    col = {k: [r[k] for r in rows] for k in metric_columns(rows)}
    parts = []
    if acc:
        parts.append(f"Accuracy at the requested labels {_trend(col[acc], scales)}.")
    if "log_prob" in col and np.all(np.isfinite(col["log_prob"])):
        parts.append(f"The guidance classifier's log p(y|x) {_trend(col['log_prob'], scales)}.")
    best_fid = int(np.nanargmin(col["fid"])) if np.any(np.isfinite(col["fid"])) else 0
    parts += [
        f"Recall (diversity) {_trend(col['recall'], scales)}; precision (fidelity) "
        f"{_trend(col['precision'], scales)}.",
        f"FID {_trend(col['fid'], scales)}, lowest ({fmt(col['fid'][best_fid], 3)}) at scale "
        f"{labels_lib.format_scale(scales[best_fid])}.",
    ]
    acc_up = acc is not None and col[acc][-1] > col[acc][0]
    recall_down = col["recall"][-1] < col["recall"][0]
    if acc_up and recall_down:
        parts.append(
            "This is the paper's trade-off (Table 4, Fig. 4): a larger guidance scale buys "
            "class fidelity at the price of diversity."
        )
        return parts
    missing = ["accuracy does not rise with the scale"] if not acc_up else []
    missing += ["recall does not fall at large scales"] if not recall_down else []
    parts.append(
        "Unlike the paper's ablation, " + " and ".join(missing) + " in this run; the models may "
        "be undertrained for this budget."
    )
    return parts


def _finite(value: float) -> float:
    """NaN as -inf, so the largest of a column is a number."""
    return -math.inf if math.isnan(value) else value


def _comparison(rows: Sequence[Mapping[str, Any]], acc: str, chance: float | None) -> str:
    """Across models: accuracy and FID unguided (scale 0) and at each model's most accurate
    scale, the comparison Table 4 makes."""

    def cell(r) -> str:
        return f"{series(r)} {fmt(r[acc], 3)} (FID {fmt(r['fid'], 3)})"

    names = models(rows)
    unguided = [r for r in rows if r["scale"] == unguided_scale(r)]
    best = [max((r for r in rows if series(r) == m), key=lambda r: _finite(r[acc])) for m in names]
    text = ""
    if unguided:
        which = "scale 0, or w = 1" if GUIDANCE in rows[0] else "scale 0"
        text = f"Unguided ({which}), accuracy at the requested labels is " + ", ".join(
            cell(r) for r in unguided
        )
        text += f" (chance: {fmt(chance, 3)}). " if chance else ". "
    return (
        text
        + "The most accurate scale of each model: "
        + ", ".join(f"{cell(r)} at scale {labels_lib.format_scale(r['scale'])}" for r in best)
        + "."
    )


def summarize(
    rows: Sequence[Mapping[str, Any]],
    *,
    baseline: Mapping[str, float] | None = None,
    baseline_name: str = "reference",
    chance: float | None = None,
) -> str:
    """A few plain sentences about the sweep, computed from the rows: per model, each metric's
    trend over the scale; across models, the unguided and best-accuracy rows."""
    if not rows:
        raise ValueError("no results to summarize")
    names = models(rows)
    acc = accuracy_key(rows)
    parts = []
    for model in names:
        mine = sorted((r for r in rows if series(r) == model), key=lambda r: r["scale"])
        lead = f"{model.capitalize()} model: " if len(names) > 1 else ""
        if len(mine) == 1:
            r = mine[0]
            parts.append(
                f"{lead}only scale {labels_lib.format_scale(r['scale'])} was sampled: FID "
                f"{fmt(r['fid'], 3)}, precision {fmt(r['precision'], 3)}, recall "
                f"{fmt(r['recall'], 3)}."
            )
            continue
        parts.append(lead + " ".join(_model_sentences(mine, acc)))
    if len(names) > 1 and acc:
        parts.append(_comparison(rows, acc, chance))
    if baseline:
        acc_text = f"accuracy {fmt(baseline.get(acc), 3)}, " if acc in baseline else ""
        parts.append(
            f"The {baseline_name} row, on the same measuring stick: {acc_text}FID "
            f"{fmt(baseline['fid'], 3)}, recall {fmt(baseline['recall'], 3)}."
        )
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- guidance frontier


def plot_frontier(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    accuracy: str,
    baseline: Mapping[str, float] | None = None,
    baseline_name: str = "reference",
) -> pathlib.Path:
    """FID against accuracy at the requested labels, one curve per series (model and guidance
    kind) through its scales, each point labelled with its scale: the trade-off frontier of the
    guidance kinds (lower right is better). Left every curve; right the curves that reach the
    median of the curves' best accuracies, zoomed to where they lie (a weaker model's curve,
    e.g. an unconditional one, would otherwise crowd them into a corner). The baseline, when
    given, is a grey star."""
    reach = {m: max(_finite(r[accuracy]) for r in rows if series(r) == m) for m in models(rows)}
    level = float(np.median(list(reach.values())))
    strong = [m for m in models(rows) if reach[m] >= level]
    fig = figure.Figure(figsize=(13.0, 5.2))
    axes = fig.subplots(1, 2)
    for ax, names in zip(axes, (models(rows), strong), strict=True):
        _frontier_panel(ax, rows, names, accuracy)
        if baseline and np.isfinite(baseline.get(accuracy, math.nan)):
            ax.plot([baseline[accuracy]], [baseline["fid"]], "*", color="grey", ms=10)
    zoom = [r for r in rows if series(r) in strong]
    xs = [r[accuracy] for r in zoom if np.isfinite(r[accuracy])]
    if xs:
        axes[1].set_xlim(min(xs) - 0.005, max(xs) + 0.003)
    axes[0].set_title("FID against accuracy: one curve per guidance kind (dashed: an interval)")
    axes[1].set_title(f"zoomed: the curves reaching accuracy {fmt(level, 3)}")
    axes[0].legend(fontsize=6, loc="upper left")
    axes[1].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    return path


def _frontier_panel(ax, rows, names, accuracy: str) -> None:
    """One frontier panel: `names`' curves (a colour per series, the same in every panel)."""
    colors = {m: f"C{k % 10}" for k, m in enumerate(models(rows))}
    for name in names:
        mine = sorted((r for r in rows if series(r) == name), key=lambda r: r["scale"])
        xs, ys = [r[accuracy] for r in mine], [r["fid"] for r in mine]
        style = "--" if "sigma in" in name else "-"
        ax.plot(xs, ys, style, marker="o", ms=4, color=colors[name], label=name)
        for r, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(
                labels_lib.format_scale(r["scale"]),
                (x, y),
                fontsize=6,
                color=colors[name],
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel(TITLES[accuracy])
    ax.set_ylabel("FID (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)


def best_at_accuracy(rows: Sequence[Mapping[str, Any]], accuracy: str, level: float) -> list[dict]:
    """Per series, its row of lowest FID among those reaching `level` accuracy, best first
    (series that never reach it are left out)."""
    best = []
    for name in models(rows):
        reached = [r for r in rows if series(r) == name and _finite(r[accuracy]) >= level]
        if reached:
            best.append(min(reached, key=lambda r: r["fid"]))
    return sorted(best, key=lambda r: r["fid"])


def summarize_frontier(rows: Sequence[Mapping[str, Any]], accuracy: str) -> str:
    """Which guidance gives the best FID at a given accuracy, from the rows: at the highest
    accuracy half of the series reach (their median), and at the highest any two reach."""
    reach = sorted(max(_finite(r[accuracy]) for r in rows if series(r) == m) for m in models(rows))
    if not reach:
        raise ValueError("no results to summarize")

    def sentence(level: float, what: str) -> str:
        ranked = best_at_accuracy(rows, accuracy, level)
        first, others = ranked[0], ranked[1:4]
        text = (
            f"At accuracy >= {fmt(level, 3)} ({what}), the lowest FID is {series(first)}: "
            f"{fmt(first['fid'], 3)} at scale {labels_lib.format_scale(first['scale'])} "
            f"(accuracy {fmt(first[accuracy], 3)})"
        )
        if others:
            text += "; then " + ", ".join(
                f"{series(r)} {fmt(r['fid'], 3)} (scale {labels_lib.format_scale(r['scale'])})"
                for r in others
            )
        return text + "."

    # Two levels: the highest accuracy half of the curves reach (curves of a weaker model, e.g.
    # an unconditional one, would otherwise set the bar), and the highest two curves reach.
    levels = [float(np.median(reach))]
    if len(reach) > 1 and reach[-2] > levels[0]:
        levels.append(reach[-2])
    whats = ["the highest accuracy half of the curves reach", "the highest two curves reach"]
    return " ".join(sentence(level, what) for level, what in zip(levels, whats, strict=False))


# ----------------------------------------------------------------------------- training steps


def newest(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of each model at its newest step (all rows of a table without a `step` column,
    and rows of a parameter checkpoint): the table's scale sweep and guidance comparison, which
    `plot`, `summarize` and the frontier read; the earlier steps are its training curves
    (`step_curves`)."""
    if not rows or STEP not in rows[0]:
        return list(rows)
    last = {}
    for r in rows:
        if r[STEP] is not None:
            last[r["model"]] = max(last.get(r["model"], r[STEP]), r[STEP])
    return [r for r in rows if r[STEP] is None or r[STEP] == last[r["model"]]]


def step_curves(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """{curve: its rows by step}: every (series, scale) sampled at more than one training step,
    in order of first appearance ({} for a table without a `step` column)."""
    if not rows or STEP not in rows[0]:
        return {}
    curves: dict[str, list] = {}
    for r in rows:
        if r[STEP] is not None:
            key = f"{series(r)}, scale {labels_lib.format_scale(r['scale'])}"
            curves.setdefault(key, []).append(r)
    return {
        k: sorted(v, key=lambda r: r[STEP])
        for k, v in curves.items()
        if len({r[STEP] for r in v}) > 1
    }


def plot_against_step(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    baseline: Mapping[str, float] | None = None,
    baseline_name: str = "reference",
) -> pathlib.Path:
    """Metrics against the training step (default FID, sFID, recall and the accuracy at the
    requested labels: `_step_metrics`), one line per curve of `step_curves`; the baseline as a
    dashed line."""
    curves = step_curves(rows)
    if not curves:
        raise ValueError("no model was sampled at more than one training step")
    if metrics is None:
        metrics = _step_metrics(rows)
    steps = sorted({r[STEP] for mine in curves.values() for r in mine})
    fig = figure.Figure(figsize=(4.2 * len(metrics), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(metrics))).ravel()
    for ax, key in zip(axes, metrics, strict=True):
        for name, mine in curves.items():
            ax.plot([r[STEP] for r in mine], [r[key] for r in mine], marker="o", label=name)
        if baseline and np.isfinite(baseline.get(key, math.nan)):
            ax.axhline(baseline[key], color="grey", ls="--", lw=1, label=baseline_name)
        values = [r[key] for mine in curves.values() for r in mine if r[key] > 0]
        if key in ("fid", "sfid") and values and max(values) > 5 * min(values):
            ax.set_yscale("log")  # early checkpoints far above the late ones
        ax.set_xticks(steps, [str(s) for s in steps], fontsize=7)
        ax.set_xlabel("training step")
        ax.set_title(TITLES[key], fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 3), 1, 1))
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    return path


def _step_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a training curve shows: FID, sFID and recall (where the table has them: the
    metrics that move with training first), then the accuracy at the requested labels."""
    acc = accuracy_key(rows)
    return [k for k in ("fid", "sfid", "recall") if k in rows[0]] + ([acc] if acc else [])


def summarize_steps(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per curve of `step_curves`, how FID moves over the training steps and the step of its
    lowest, then how sFID, recall and the accuracy at the requested labels move."""
    curves = step_curves(rows)
    if not curves:
        raise ValueError("no model was sampled at more than one training step")
    names = {"sfid": "sFID", "recall": "recall"}
    parts = []
    for name, mine in curves.items():
        steps, fids = [r[STEP] for r in mine], [r["fid"] for r in mine]
        best = int(np.nanargmin(fids)) if np.any(np.isfinite(fids)) else 0
        text = (
            f"{name}: FID {_trend(fids, steps, 'step')}, lowest ({fmt(fids[best], 3)}) at step "
            f"{steps[best]}"
        )
        for key in _step_metrics(rows)[1:]:
            values = [r[key] for r in mine]
            if np.all(np.isfinite(values)):
                text += f"; {names.get(key, 'accuracy')} {_trend(values, steps, 'step')}"
        parts.append(text + ".")
    return "Over training: " + " ".join(parts)


# ----------------------------------------------------------------------------- quality against cost


def samplers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The samplers of the rows (their `sampler` column), in order of first appearance."""
    return list(dict.fromkeys(r["sampler"] for r in rows))


def _reference_label(reference: Mapping[str, Any]) -> str:
    return f"{reference['sampler']} {int(reference['nfe'])} steps"


def plot_against_nfe(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    reference: Mapping[str, Any] | None = None,
    metrics: Sequence[str] | None = None,
) -> pathlib.Path:
    """Quality against cost: one panel per metric (default FID and the accuracy at the requested
    labels) against the NFE on a log axis, a line per sampler; `reference` (a row with `sampler`
    and `nfe`, e.g. the paper's 250 ancestral steps) as a dashed horizontal line."""
    if metrics is None:
        acc = accuracy_key(rows)
        metrics = ["fid"] + ([acc] if acc else [])
    nfes = sorted({int(r["nfe"]) for r in rows})
    fig = figure.Figure(figsize=(3.6 * len(metrics), 3.3))
    axes = np.atleast_1d(fig.subplots(1, len(metrics))).ravel()
    for ax, key in zip(axes, metrics, strict=True):
        for name in samplers(rows):
            mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in mine], [r[key] for r in mine], marker="o", label=name)
        if reference is not None and np.isfinite(reference.get(key, math.nan)):
            ax.axhline(
                reference[key], color="grey", ls="--", lw=1, label=_reference_label(reference)
            )
        ax.set_xscale("log")
        ax.set_xticks(nfes, [str(n) for n in nfes], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_title(TITLES[key], fontsize=9)
        ax.grid(alpha=0.3)
    # One legend under the panels, clear of every line.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    return path


def crossover(
    rows: Sequence[Mapping[str, Any]],
    reference: Mapping[str, Any],
    *,
    metric: str = "fid",
    tolerance: float = 0.05,
) -> dict[str, Mapping[str, Any] | None]:
    """Per sampler, its row of the smallest NFE whose `metric` comes within `tolerance` of the
    reference's, |value - reference| <= tolerance * reference (above or below it); None when no
    NFE of it gets there."""
    target = float(reference[metric])
    out = {}
    for name in samplers(rows):
        mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        out[name] = next(
            (r for r in mine if abs(float(r[metric]) - target) <= tolerance * abs(target)), None
        )
    return out


def _versus(value: float, reference: float) -> str:
    """'3.1% below' / '2% above': a value against the reference, in percent of it."""
    change = 100.0 * (float(value) - float(reference)) / abs(float(reference))
    return f"{fmt(abs(change), 2)}% {'above' if change > 0 else 'below'}"


def summarize_nfe(
    rows: Sequence[Mapping[str, Any]], reference: Mapping[str, Any], *, tolerance: float = 0.05
) -> str:
    """Plain sentences about a quality-against-cost sweep, from the rows: per sampler, the
    smallest NFE at which its FID comes within `tolerance` of the reference row's (or that it
    does not within its largest NFE), and where its FID lies beyond `tolerance` below the
    reference's at fewer steps; then the accuracy at the requested labels."""
    if not rows:
        raise ValueError("no results to summarize")
    ref_name, pct = _reference_label(reference), f"{100 * tolerance:g}%"
    ref_fid = float(reference["fid"])
    found = crossover(rows, reference, tolerance=tolerance)
    parts = []
    for name, row in found.items():
        mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        if row is not None:
            text = (
                f"{name} at NFE {int(row['nfe'])} (FID {fmt(row['fid'], 3)}, "
                f"{_versus(row['fid'], ref_fid)})"
            )
        else:
            text = (
                f"{name} does not within NFE {int(mine[-1]['nfe'])} (FID "
                f"{fmt(mine[-1]['fid'], 3)} there, {_versus(mine[-1]['fid'], ref_fid)})"
            )
        below = [
            r
            for r in mine
            if (row is None or r["nfe"] < row["nfe"]) and r["fid"] < (1 - tolerance) * ref_fid
        ]
        if below:
            text += (
                "; at NFE "
                + ", ".join(str(int(r["nfe"])) for r in below)
                + f" its FID is more than {pct} below the reference's "
                + f"({fmt(below[0]['fid'], 3)} at NFE {int(below[0]['nfe'])})"
            )
        parts.append(text)
    text = (
        f"Within {pct} of the FID of the {ref_name} row ({fmt(ref_fid, 3)}), the smallest NFE: "
        + ". ".join(parts)
        + "."
    )
    acc = accuracy_key(rows)
    if acc and np.isfinite(reference.get(acc, math.nan)):
        spans = []
        for name in samplers(rows):
            mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
            spans.append(
                f"{name} {fmt(mine[0][acc], 3)} at NFE {int(mine[0]['nfe'])} to "
                f"{fmt(mine[-1][acc], 3)} at NFE {int(mine[-1]['nfe'])}"
            )
        text += (
            f" Accuracy at the requested labels: {'; '.join(spans)} ({ref_name}: "
            f"{fmt(reference[acc], 3)})."
        )
    return text
