"""`--mode=pipeline`: the whole method on scikit-learn's digits, start to finish, on a CPU.

Five stages, each writing into the workdir and each skipped when its output is already there, so
an interrupted run resumes and one stage can be swapped by hand:

  1. diffusion   train the class-conditional diffusion model     -> checkpoints/
  2. classifier  train the noise-aware guidance classifier        -> classifier_checkpoints/
  3. eval_net    train a clean-image classifier on the training
                 digits: the feature network of the metrics       -> eval_classifier/
  4. sample      sample every `sample.classifier_scale` over
                 shared noise and balanced labels (gdiff/sampling) -> samples/scale_<s>/
  5. evaluate    per scale: FID, precision, recall (evaluation features vs held-out real
                 digits), accuracy at the requested labels, the guidance classifier's
                 log p(y|x)  -> results.md, results.csv, results.json, scale_sweep.png,
                 sweep_grid.png, grids/scale_<s>.png

Swapping a stage: point `sample.model_checkpoint` (or `sample.classifier_checkpoint`) at another
checkpoint, or drop one into `<workdir>/model_params` / `<workdir>/classifier_params`
(`gdiff.checkpointing.save_params`); the training stage is then skipped. Delete `samples/` and
`results.csv` to sample and evaluate again with it (samples are never silently overwritten).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gdiff import checkpointing, distributed, factory
from gdiff.data import digits as digits_data
from gdiff.evaluation import features, metrics, small_classifier
from gdiff.pipeline import report
from gdiff.sampling import grid as grid_lib
from gdiff.sampling import labels as labels_lib
from gdiff.sampling import run as sample_run
from gdiff.sampling import shards
from gdiff.train import classifier_trainer, diffusion_trainer

EVAL_CLASSIFIER_DIR = "eval_classifier"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
PLOT = "scale_sweep.png"
GRID_DIR = "grids"
SWEEP_FIGURE = "sweep_grid.png"
STAGES = ("diffusion", "classifier", "eval_net", "sample", "evaluate")


@dataclasses.dataclass
class StageLog:
    """Prints one line per stage (ran / skipped, with timing) and remembers what happened."""

    ran: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def skip(self, stage: str, why: str) -> None:
        self.skipped.append(stage)
        self._say(f"[{STAGES.index(stage) + 1}/{len(STAGES)}] {stage}: skipped ({why})")

    def start(self, stage: str, what: str) -> float:
        self._say(f"[{STAGES.index(stage) + 1}/{len(STAGES)}] {stage}: {what}")
        return time.perf_counter()

    def done(self, stage: str, t0: float) -> None:
        self.ran.append(stage)
        self.seconds[stage] = time.perf_counter() - t0
        self._say(f"    {stage} finished in {self.seconds[stage]:.0f}s")

    @staticmethod
    def _say(text: str) -> None:
        if jax.process_index() == 0:
            print(text, flush=True)
        logging.info(text)


# ----------------------------------------------------------------------------- helpers


def _trained_elsewhere(config, workdir: pathlib.Path, kind: str) -> str | None:
    """Why the training stage of `kind` ("model" | "classifier") need not run, or None: a
    checkpoint was named, or the workdir holds parameters or a training run that reached its
    `train` step count (what sampling will then load: checkpointing.locate finds both)."""
    explicit = config.sample[f"{kind}_checkpoint"]
    if explicit:
        return f"sample.{kind}_checkpoint={explicit}"
    try:
        found = checkpointing.locate(workdir, kind)
    except FileNotFoundError:
        return None
    if found.format == "params":
        return f"found parameters {found.path}"
    want = int(config.train.num_steps if kind == "model" else config.train.classifier_num_steps)
    return f"found step {found.step} in {found.path}" if found.step >= want else None


def _train(config, workdir: pathlib.Path, kind: str, mesh) -> None:
    """Runs (or resumes) the training of `kind`; `train.progress` shows its step bar."""
    trainer = diffusion_trainer if kind == "model" else classifier_trainer
    trainer.train(config, str(workdir), mesh=mesh)


def real_digits(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A digits split as the sampler writes images: uint8 [N, S, S, 3] and int32 labels [N]."""
    src = digits_data.DigitsSource(split, image_size)
    rng = np.random.default_rng(0)  # unused: no augmentation
    pairs = [src.load(i, rng) for i in range(src.num_examples)]
    images = np.stack([p[0] for p in pairs])
    labels = np.asarray([p[1] for p in pairs], np.int32)
    # The sampler's conversion (scale by 127.5, clamp, truncate), so real and generated digits
    # are quantised the same way.
    return np.clip((images + 1.0) * 127.5, 0, 255).astype(np.uint8), labels


def balanced_subset(
    labels: np.ndarray, n: int, num_classes: int, *, seed: int | None = None
) -> np.ndarray:
    """Indices of n examples labelled 0, 1, ..., K-1, 0, 1, ... (the sampler's balanced order).

    Without `seed` the first examples of each class are taken; with it, a seeded random choice
    within each class (the digits are stored writer by writer, so the first ones of each class
    come from a handful of writers and are not a representative sample).
    """
    by_class = [np.flatnonzero(labels == k) for k in range(num_classes)]
    if seed is not None:
        rng = np.random.default_rng(seed)
        by_class = [rng.permutation(idx) for idx in by_class]
    taken = [0] * num_classes
    out = []
    for i in range(n):
        k = i % num_classes
        if taken[k] >= len(by_class[k]):
            raise ValueError(f"the real digits have only {len(by_class[k])} examples of class {k}")
        out.append(by_class[k][taken[k]])
        taken[k] += 1
    return np.asarray(out)


def _check_config(config) -> None:
    if config.data.source != "digits":
        raise ValueError(
            f"the digits pipeline needs data.source='digits' (got {config.data.source!r}); use "
            "--mode=train / train_classifier / sweep for other data sets"
        )
    if not config.model.class_cond:
        raise ValueError("the digits pipeline samples given labels: set model.class_cond=True")
    if "pipeline" not in config:
        raise ValueError("config has no `pipeline` group; start from configs/digits.py")
    if int(config.sample.num_samples) < 2:
        raise ValueError("sample.num_samples must be at least 2 to measure FID and recall")


# ----------------------------------------------------------------------------- stages


def _eval_network(config, workdir: pathlib.Path, log: StageLog):
    """Stage 3: the clean-image evaluation classifier (trained once, then loaded)."""
    p = config.pipeline
    num_classes = int(config.data.num_classes)
    directory = workdir / EVAL_CLASSIFIER_DIR
    if (directory / checkpointing.METADATA_FILE).exists():
        meta = checkpointing.read_metadata(directory)
        log.skip("eval_net", f"found {directory}")
        module = small_classifier.SmallClassifier(
            num_classes=int(meta["num_classes"]), width=int(meta["width"])
        )
        return module, {"params": checkpointing.load_params(directory)}, meta
    t0 = log.start(
        "eval_net", f"train the clean-image evaluation classifier ({p.eval_classifier_steps} steps)"
    )
    images, labels = real_digits(config.data.train_split, int(config.data.image_size))
    # Hold back a balanced set of training digits (as many as samples per scale): the real-data
    # row of the table. Digits the feature network was fitted on would score unrealistically
    # well (confident, spread-out features), so that row must be unseen by it.
    held_back = balanced_subset(
        labels, int(config.sample.num_samples), num_classes, seed=int(config.seed)
    )
    fit = np.setdiff1d(np.arange(len(labels)), held_back)
    module, variables = small_classifier.train_small_classifier(
        images[fit],
        labels[fit],
        num_classes=num_classes,
        steps=int(p.eval_classifier_steps),
        batch_size=int(p.eval_classifier_batch_size),
        seed=int(config.seed),
        learning_rate=float(p.eval_classifier_lr),
        width=int(p.eval_classifier_width),
    )
    test_images, test_labels = real_digits(config.data.eval_split, int(config.data.image_size))
    accuracy = small_classifier.classifier_accuracy(module, variables, test_images, test_labels)
    meta = {
        "num_classes": num_classes,
        "width": int(p.eval_classifier_width),
        "steps": int(p.eval_classifier_steps),
        "held_out_accuracy": float(accuracy),
        # Training-split indices of the real-data row, never shown to this network.
        "held_back": [int(i) for i in held_back],
    }
    checkpointing.save_params(directory, variables["params"], metadata=meta, overwrite=True)
    StageLog._say(f"    evaluation classifier: {accuracy:.3f} accuracy on held-out real digits")
    log.done("eval_net", t0)
    return module, variables, meta


def _guidance_log_prob(config, workdir: pathlib.Path):
    """fn(images uint8, labels) -> (mean log p(y|x, t=0), accuracy); None without a classifier."""
    ckpt = config.sample.classifier_checkpoint or str(workdir)
    try:
        params = checkpointing.load_params(ckpt, kind="classifier")
    except FileNotFoundError:
        return None
    classifier = factory.build_classifier(config)
    variables = sample_run._as_variables(params)

    @jax.jit
    def logp(x_uint8, y):
        x = x_uint8.astype(jnp.float32) / 127.5 - 1.0
        logits = classifier.apply(variables, x, jnp.zeros((x.shape[0],), jnp.int32))
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0], jnp.argmax(lp, -1) == y

    def fn(images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        lps, hits = [], []
        for s in range(0, len(images), 256):
            lp, hit = logp(jnp.asarray(images[s : s + 256]), jnp.asarray(labels[s : s + 256]))
            lps.append(np.asarray(lp))
            hits.append(np.asarray(hit))
        return float(np.mean(np.concatenate(lps))), float(np.mean(np.concatenate(hits)))

    return fn


def _score(extractor, ref_acts, logp_fn, images, labels) -> dict[str, float]:
    """One row's metrics (without the scale) for uint8 images [N, S, S, 3] drawn for `labels`."""
    acts = extractor(images)  # one pass of the evaluation network: features and class probs
    # FID, precision/recall and IS only: sFID's [N, H*W*C] spatial covariance is rank-deficient
    # with a hundred samples and its matrix square root alone would take minutes on a CPU.
    fid = metrics.frechet_distance(
        *metrics.compute_statistics(acts["pool"]), *metrics.compute_statistics(ref_acts["pool"])
    )
    precision, recall = metrics.precision_recall(ref_acts["pool"], acts["pool"])
    log_prob = logp_fn(images, labels)[0] if logp_fn is not None else float("nan")
    return {
        "accuracy": float(np.mean(np.argmax(acts["probs"], axis=-1) == labels)),
        "log_prob": log_prob,
        "fid": float(fid),
        "precision": float(precision),
        "recall": float(recall),
        "inception_score": float(metrics.inception_score(acts["probs"], len(images))),
    }


def _grid(images: np.ndarray, labels: np.ndarray, per_class: int, zoom: int) -> np.ndarray:
    grid = grid_lib.class_grid(images, labels, per_class=per_class)
    return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)


def _stored_results(workdir: pathlib.Path, sample_paths) -> dict[str, Any] | None:
    """An earlier evaluation's results when they are newer than every input and cover the same
    scales, else None."""
    csv_path, json_path = workdir / RESULTS_CSV, workdir / RESULTS_JSON
    inputs = [*sample_paths.values(), workdir / EVAL_CLASSIFIER_DIR / checkpointing.METADATA_FILE]
    newest_input = max(p.stat().st_mtime for p in inputs if p.exists())
    if not (csv_path.exists() and json_path.exists() and csv_path.stat().st_mtime >= newest_input):
        return None
    rows = report.read_csv(csv_path)
    if sorted(r["scale"] for r in rows) != sorted(sample_paths):
        return None
    stored = json.loads(json_path.read_text())
    return {"rows": rows, "baseline": stored.get("baseline"), "summary": stored["summary"]}


def _score_scales(config, workdir: pathlib.Path, sample_paths, score) -> tuple[list, dict]:
    """Per scale, ascending: the metrics row (`score(images, labels)`) and the samples grid.

    Returns:
      (rows, {scale: (uint8 images [N, S, S, 3], int32 labels [N])})
    """
    per_class, zoom = int(config.pipeline.grid_per_class), int(config.pipeline.grid_zoom)
    rows, samples = [], {}
    for scale in sorted(sample_paths):
        images, labels = shards.read_sample_file(sample_paths[scale])
        if labels is None:
            raise ValueError(f"{sample_paths[scale]} has no labels (arr_1); cannot score accuracy")
        labels = np.asarray(labels, np.int32)
        samples[scale] = images, labels
        row = {"scale": float(scale), **score(images, labels)}
        rows.append(row)
        grid_lib.save_png(_grid_path(workdir, scale), _grid(images, labels, per_class, zoom))
        logging.info("scale %s: %s", report.format_scale(scale), row)
    return rows, samples


def _held_back_digits(config, workdir: pathlib.Path, meta, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The real-data row's digits: the training digits the evaluation network never saw (as many
    as samples per scale, same label balance), so the row shows what real data scores."""
    train_images, train_labels = real_digits(config.data.train_split, int(config.data.image_size))
    idx = np.asarray(meta.get("held_back", []), np.int64)
    if len(idx) == 0:
        raise ValueError(
            f"{workdir / EVAL_CLASSIFIER_DIR} records no held-back digits; delete it so the "
            "evaluation network is trained again"
        )
    if len(idx) != n:
        logging.warning(
            "the evaluation network held back %d real digits, not %d (samples per scale): the "
            "real-digit row uses those %d",
            len(idx),
            n,
            len(idx),
        )
    return train_images[idx], train_labels[idx]


def _evaluate(config, workdir, sample_paths, eval_net, log: StageLog, timings) -> dict[str, Any]:
    """Stage 5: the table, plot, grids and summary (skipped when results.csv is up to date)."""
    stored = _stored_results(workdir, sample_paths)
    if stored is not None:
        log.skip("evaluate", f"found {workdir / RESULTS_CSV}")
        return stored
    scales = sorted(sample_paths)
    t0 = log.start("evaluate", f"score {len(scales)} scale(s) against held-out real digits")
    module, variables, meta = eval_net
    extractor = features.ClassifierExtractor(module, variables)
    ref_images, _ = real_digits(config.data.eval_split, int(config.data.image_size))
    ref_acts = extractor(ref_images)
    logp_fn = _guidance_log_prob(config, workdir)

    def score(images, labels):
        return _score(extractor, ref_acts, logp_fn, images, labels)

    rows, samples = _score_scales(config, workdir, sample_paths, score)
    n = len(samples[scales[0]][0])
    baseline = score(*_held_back_digits(config, workdir, meta, n))
    results = {
        "rows": rows,
        "baseline": baseline,
        "summary": report.summarize(rows, baseline=baseline),
    }
    details = _details(config, workdir, n, len(ref_images), meta, timings)
    _write_results(config, workdir, results, samples, details)
    log.done("evaluate", t0)
    return results


def _details(config, workdir: pathlib.Path, n: int, num_ref: int, meta, timings) -> dict:
    """The set-up lines of results.md."""
    s = config.sample
    return {
        "command": f"python main.py --mode=pipeline --config configs/digits.py --workdir {workdir}",
        "image size": f"{config.data.image_size}x{config.data.image_size}",
        "diffusion training": f"{config.train.num_steps} steps x batch {config.train.batch_size}",
        "classifier training": (
            f"{config.train.classifier_num_steps} steps x batch "
            f"{config.train.classifier_batch_size}"
        ),
        "sampling": (
            f"{'DDIM' if s.use_ddim else 'ancestral'}, respacing "
            f"{s.timestep_respacing or config.diffusion.timestep_respacing or 'none'}, "
            f"{n} samples per scale, labels {s.labels}, seed {s.seed}"
        ),
        "reference set": f"{num_ref} held-out real digits (split {config.data.eval_split})",
        "evaluation network held-out accuracy": _fmt_opt(meta.get("held_out_accuracy")),
        "stage times (s)": ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) or "n/a",
    }


def _write_results(config, workdir: pathlib.Path, results, samples, details) -> None:
    """results.csv / .json / .md, the metrics-vs-scale plot and the sweep figure."""
    rows, baseline = results["rows"], results["baseline"]
    per_class, zoom = int(config.pipeline.grid_per_class), int(config.pipeline.grid_zoom)
    report.plot(rows, workdir / PLOT, baseline=baseline)
    report.save_sweep_figure(
        {s: _grid(*samples[s], min(per_class, 5), 1) for s in sorted(samples)},
        workdir / SWEEP_FIGURE,
        zoom=zoom,
    )
    report.write_csv(rows, workdir / RESULTS_CSV)
    (workdir / RESULTS_JSON).write_text(json.dumps(results, indent=1))
    report.write_markdown(
        rows,
        workdir / RESULTS_MD,
        baseline=baseline,
        summary=results["summary"],
        details=details,
        images=[PLOT, SWEEP_FIGURE],
    )


def _grid_path(workdir: pathlib.Path, scale: float) -> pathlib.Path:
    return workdir / GRID_DIR / f"scale_{report.format_scale(scale)}.png"


def _fmt_opt(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


# ----------------------------------------------------------------------------- entry point


def _train_networks(config, workdir: pathlib.Path, mesh, guided: bool, log: StageLog) -> None:
    """Stages 1 and 2: the two networks the paper trains (each skipped when found)."""
    for stage, kind, steps in (
        ("diffusion", "model", config.train.num_steps),
        ("classifier", "classifier", config.train.classifier_num_steps),
    ):
        if kind == "classifier" and not guided:
            log.skip(stage, "every classifier scale is 0: no guidance")
            continue
        why = _trained_elsewhere(config, workdir, kind)
        if why:
            log.skip(stage, why)
            continue
        what = "diffusion model" if kind == "model" else "noise-aware classifier"
        t0 = log.start(stage, f"train the {what} ({steps} steps)")
        _train(config, workdir, kind, mesh)
        log.done(stage, t0)


def _sample(config, workdir: pathlib.Path, mesh, scales, log: StageLog) -> dict:
    """Stage 4: every scale in one compiled program over the same noise and labels."""
    out = sample_run.output_dir(config, str(workdir))
    n = int(config.sample.num_samples)
    size = int(config.model.image_size)
    expected = {s: shards.merged_path(out, s, (n, size, size, 3)) for s in scales}
    if all(p.exists() for p in expected.values()):
        log.skip("sample", f"found {len(expected)} merged sample file(s) under {out}")
        return expected
    t0 = log.start(
        "sample", f"{n} samples x {len(scales)} scale(s) ({config.sample.classifier_scale})"
    )
    sample_paths = sample_run.run(config, str(workdir), mesh=mesh)
    log.done("sample", t0)
    return sample_paths


def _output_paths(workdir: pathlib.Path, scales, sample_paths) -> dict[str, Any]:
    return {
        "csv": workdir / RESULTS_CSV,
        "markdown": workdir / RESULTS_MD,
        "plot": workdir / PLOT,
        "sweep_figure": workdir / SWEEP_FIGURE,
        "grids": {s: _grid_path(workdir, s) for s in scales},
        "samples": sample_paths,
    }


def run(config, workdir: str, *, mesh=None) -> dict[str, Any]:
    """Trains, guides and measures on digits; see the module docstring for the stages.

    Args:
      config: configs/digits.py (or a variant of it with a `pipeline` group).
      workdir: where every stage reads and writes; finished stages are skipped on a rerun.
      mesh: the device mesh for training and sampling (default: every device).

    Returns:
      dict(rows=[per-scale dicts with report.COLUMNS], baseline=the real-digit row,
      summary=str, ran=[stages run], skipped=[stages skipped], paths=dict of output files).
    """
    _check_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = distributed.data_mesh() if mesh is None else mesh
    scales = labels_lib.parse_scales(config.sample.classifier_scale)
    log = StageLog()
    _train_networks(config, workdir, mesh, any(s != 0 for s in scales), log)
    # 3: the evaluation network (before sampling: a misconfiguration fails in seconds).
    eval_net = _eval_network(config, workdir, log)
    sample_paths = _sample(config, workdir, mesh, scales, log)
    # 5: measure and report.
    results = {}
    if distributed.is_main_process():
        results = _evaluate(config, workdir, sample_paths, eval_net, log, dict(log.seconds))
        print("\n" + results["summary"], flush=True)
        print(
            f"\nResults: {workdir / RESULTS_MD} (table), {workdir / RESULTS_CSV}, "
            f"{workdir / PLOT} (metrics vs scale), {workdir / SWEEP_FIGURE} and "
            f"{workdir / GRID_DIR}/ (samples per scale, one row per digit).",
            flush=True,
        )
    return {
        **results,
        "ran": log.ran,
        "skipped": log.skipped,
        "paths": _output_paths(workdir, scales, sample_paths),
    }
