"""`--mode=pipeline`: the whole method on scikit-learn's digits, start to finish, on a CPU.

The paper's Table 4 on a toy scale: a class-conditional and an unconditional diffusion model
(`sweep.models`), one noise-aware classifier guiding both; then the guidance kinds after the
paper, and the conditional model's FID over its training steps. Stages, each writing into the
workdir:

  1. diffusion/<model>  train each diffusion model            -> <model>/checkpoints/
  2. classifier         train the noise-aware guidance classifier -> classifier_checkpoints/
  3. eval_net           train a clean-image classifier on the training
                        digits: the feature network of the metrics -> eval_classifier/
  4. sample             sample every entry at every guidance row (gdiff/sampling/guidance_rows.py:
                        classifier scales, cfg / two_network / autoguidance weights, intervals),
                        all over the same noise and balanced labels -> samples/<entry>/<row>/
                        (entries whose sample.model_checkpoint is "{workdir}/<other>" sample that
                        entry's model: the cfg, two_network and autoguidance entries sample the
                        conditional model and train nothing; the training entry samples its
                        earlier checkpoints, sample.checkpoint_steps -> samples/training/step_<s>/)
  5. evaluate           per (entry, row), through gdiff.evaluation.scoring (the evaluator's
                        five numbers in the evaluation network's features vs held-out real
                        digits; accuracy at the requested labels of the evaluation network and of
                        the guidance classifier; its log p(y|x)) and gdiff.evaluation.report
                        -> results.md, results.csv, results.json (rows: model x guidance x step x
                        scale, plus the real-digit row), guidance_frontier.png (FID against
                        accuracy, a curve per guidance kind), scale_sweep.png (one line per model
                        and kind; both at each model's newest step), training_steps.png (FID,
                        sFID, recall and accuracy against the training step, a line per scale
                        sampled at several steps), sweep_grid.png, grids/<entry>_<row>.png
  6. solver_sweep       quality against cost: `pipeline.solver_sweep_model` at its default guided
                        scale `pipeline.solver_sweep_scale`, sampled with DDIM and DPM-Solver++
                        (the model's `sample.dpm_solver_*` settings) at each NFE of
                        `pipeline.solver_sweep_nfe` and with `pipeline.solver_sweep_reference_steps`
                        ancestral steps (the paper's sampler), over the same noise and labels as
                        stage 4, scored by stage 5's scorer
                                                    -> samples/solver_sweep/<kind>_<NFE>/,
                        solver_sweep.md, solver_sweep.csv, solver_sweep.json (rows: sampler x
                        NFE), solver_sweep.png (FID and accuracy against NFE, a line per sampler,
                        the ancestral row dashed); the summary names the smallest NFE at which
                        each sampler's FID comes within 5% of the ancestral row's

A rerun skips a stage only when its outputs are complete and were made from the inputs it would
use now; otherwise the stage runs again (resuming where it can) and its log line says why. What
each stage pins:

  - diffusion/<model>, classifier: the training step reached (`train.num_steps`,
    `train.classifier_num_steps`); a checkpoint below it is resumed, a named checkpoint or
    dropped-in parameters are used as they are. The trainer checks a resume's settings itself.
  - eval_net: its settings (steps, batch, learning rate, width, seed, number of held-back
    digits), recorded in eval_classifier/metadata; other settings train it again.
  - sample: each model's sampling manifest (samples/<model>/run.json: the sampling settings and
    the model's and classifier's step, EMA copy and sha256). When the networks changed (retrained
    with more steps, another checkpoint) the old samples are moved aside
    (`<dir>.replaced-<time>`, nothing deleted; the sample job's `sample.restart`) and drawn
    afresh; an interrupted run resumes from its shards.
  - evaluate: what it scored, recorded in results.json, which is written last: the run digest of
    every merged samples file (`<merged>.npz.run`), the evaluation network's fingerprint and the
    scoring settings. It counts as done only when results.csv, results.md, results.json, both
    figures and every grid exist and that record matches; results.json is removed before an
    evaluation begins, so an interrupted one is redone.
  - solver_sweep: both of the above for its own rows: each row's sampling manifest
    (samples/solver_sweep/<kind>_<NFE>/run.json: its sampler and steps, the model's and
    classifier's weights; rows of other weights or settings are moved aside and drawn afresh),
    and solver_sweep.json, its record (the rows' run digests, the evaluation network, the
    scoring settings), written last and removed before scoring begins; it counts as done only
    when solver_sweep.csv, .md, .png and that record exist and the record matches.

A training stage stopped by a request (SIGTERM: the trainer saves, then returns) stops the job with
`errors.StoppedError` naming the stage (exit status 3 from the command line); rerunning the command
resumes that stage from its checkpoint.

Swapping a stage: point a model's `sample.model_checkpoint`
(`--config.sweep.models.<model>.sample.model_checkpoint`, or `sample.model_checkpoint` for a model
that does not override it) or `sample.classifier_checkpoint` at another checkpoint, or drop one
into `<workdir>/<model>/model_params` / `<workdir>/classifier_params`
(`gdiff.checkpoints.store.save_params`); the training stage is then skipped, and the samples and
results of the old networks are replaced on the next run (the old samples kept aside).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from gdiff import atomic, distributed, errors, treediff
from gdiff.checkpoints import fingerprints, locate, store
from gdiff.data import digits as digits_data
from gdiff.engine import manifest as manifest_lib
from gdiff.evaluation import features, report, scoring, small_classifier
from gdiff.jobs import sample as sample_job
from gdiff.jobs import sweep
from gdiff.jobs import train as train_job
from gdiff.sampling import grid as grid_lib
from gdiff.sampling import guidance_rows, sample_files
from gdiff.sampling import labels as labels_lib
from gdiff.sampling import plan as plan_lib
from gdiff.sampling import sampler as sampler_lib

EVAL_CLASSIFIER_DIR = "eval_classifier"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
PLOT = "scale_sweep.png"
FRONTIER_PLOT = "guidance_frontier.png"
STEPS_PLOT = "training_steps.png"
GRID_DIR = "grids"
SWEEP_FIGURE = "sweep_grid.png"
BASELINE = "real digits"
# The quality-against-cost stage: its table, plot and record, and its samples' folder (in the
# samples directory, next to the models' folders).
SOLVER_CSV = "solver_sweep.csv"
SOLVER_MD = "solver_sweep.md"
SOLVER_PLOT = "solver_sweep.png"
SOLVER_JSON = "solver_sweep.json"
SOLVER_SAMPLES = "solver_sweep"
# "Comes within" the reference row's FID: at most this fraction of it away (above or below).
SOLVER_TOLERANCE = 0.05
# The stages after training the diffusion models ("diffusion/<model>", one per model).
LATER_STAGES = ("classifier", "eval_net", "sample", "evaluate", "solver_sweep")


def trained(models: list[sweep.SweepModel]) -> list[sweep.SweepModel]:
    """The entries that train a diffusion model, once each (the others sample one of theirs
    with other guidance or at other steps: `SweepModel.label`)."""
    first = {}
    for m in models:
        if m.label == m.entry:
            first.setdefault(m.entry, m)
    return list(first.values())


def stages(models: list[sweep.SweepModel]) -> tuple[str, ...]:
    """The pipeline's stages for these diffusion models, in order."""
    return tuple(f"diffusion/{m.entry}" for m in trained(models)) + LATER_STAGES


@dataclasses.dataclass
class StageLog:
    """Prints one line per stage (ran / skipped / redone, with timing and why) and remembers what
    happened."""

    stages: tuple[str, ...]
    ran: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    # {stage: why} of the stages whose earlier outputs were out of date or incomplete.
    redone: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def skip(self, stage: str, why: str) -> None:
        self.skipped.append(stage)
        self._say(f"{self._counter(stage)} {stage}: skipped ({why})")

    def redo(self, stage: str, why: str) -> None:
        """Notes that `stage` runs again although it ran before, and why (before `start`)."""
        self.redone[stage] = why
        self._say(f"{self._counter(stage)} {stage}: redone ({why})")

    def start(self, stage: str, what: str) -> float:
        self._say(f"{self._counter(stage)} {stage}: {what}")
        return time.perf_counter()

    def done(self, stage: str, t0: float) -> None:
        self.ran.append(stage)
        self.seconds[stage] = time.perf_counter() - t0
        self._say(f"    {stage} finished in {self.seconds[stage]:.0f}s")

    def _counter(self, stage: str) -> str:
        return f"[{self.stages.index(stage) + 1}/{len(self.stages)}]"

    @staticmethod
    def _say(text: str) -> None:
        if jax.process_index() == 0:
            print(text, flush=True)
        logging.info(text)


# ----------------------------------------------------------------------------- helpers


def _trained_elsewhere(config, workdir: pathlib.Path, kind: str) -> tuple[str | None, str | None]:
    """(why the training stage of `kind` ("model" | "classifier") need not run, why it resumes
    an earlier run), each None when it does not apply. It need not run when a checkpoint was
    named, or the workdir holds parameters or a training run that reached its `train` step count
    (what sampling will then load: locate.locate finds both)."""
    explicit = config.sample[f"{kind}_checkpoint"]
    if explicit:
        return f"sample.{kind}_checkpoint={explicit}", None
    try:
        found = locate.locate(workdir, kind)
    except FileNotFoundError:
        return None, None
    if found.format == "params":
        return f"found parameters {found.path}", None
    want = int(config.train.num_steps if kind == "model" else config.train.classifier_num_steps)
    if found.step >= want:
        return f"found step {found.step} in {found.path}", None
    return None, f"found step {found.step} of {want} in {found.path}: resuming it"


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


def _check_config(config, models: list[sweep.SweepModel], workdir: pathlib.Path) -> None:
    if config.data.source != "digits":
        raise ValueError(
            f"the digits pipeline needs data.source='digits' (got {config.data.source!r}); use "
            "--mode=train / train_classifier / sweep for other data sets"
        )
    for m in models:
        rows = guidance_rows.parse_rows(m.config.sample)
        # cfg rows need a model with a null class: refused here, before hours of training.
        sampler_lib.null_label(sampler_lib.config_groups(m.config))
        if not (m.config.model.class_cond or guidance_rows.uses_classifier(rows)):
            raise ValueError(
                f"the digits pipeline scores samples at the labels they were drawn for, but model "
                f"{m.name!r} is unconditional and unguided: set its model.class_cond=True or give "
                "it a non-zero classifier scale"
            )
    if "pipeline" not in config:
        raise ValueError("config has no `pipeline` group; start from configs/digits.py")
    if int(config.sample.num_samples) < 2:
        raise ValueError("sample.num_samples must be at least 2 to measure FID and recall")
    # The solver sweep's rows, checked before hours of training (a DDIM step count the chain
    # cannot space, solver settings the sampler refuses).
    for m in solver_models(config, workdir, models):
        try:
            sampler_lib.nfe(m.config.sample, m.config.diffusion)
        except errors.ConfigError:
            raise
        except ValueError as e:
            raise errors.ConfigError(
                f"pipeline.solver_sweep: row {m.name} cannot be sampled ({e}); change "
                "pipeline.solver_sweep_nfe or pipeline.solver_sweep_reference_steps"
            ) from e


def _is_guided(models: list[sweep.SweepModel]) -> bool:
    """Whether any row of any model needs the classifier."""
    return any(
        guidance_rows.uses_classifier(guidance_rows.parse_rows(m.config.sample)) for m in models
    )


# ----------------------------------------------------------------------------- stages


def _eval_settings(config) -> dict[str, Any]:
    """What the evaluation network is trained with (its stage's pin, kept in its metadata)."""
    p = config.pipeline
    return {
        "steps": int(p.eval_classifier_steps),
        "batch_size": int(p.eval_classifier_batch_size),
        "learning_rate": float(p.eval_classifier_lr),
        "width": int(p.eval_classifier_width),
        "seed": int(config.seed),
        "num_classes": int(config.data.num_classes),
        "image_size": int(config.data.image_size),
        "train_split": str(config.data.train_split),
        # The real-data row: as many held-back training digits as samples per scale.
        "held_back_count": int(config.sample.num_samples),
    }


def _load_eval_network(directory: pathlib.Path, meta: dict):
    module = small_classifier.SmallClassifier(
        num_classes=int(meta["num_classes"]), width=int(meta["width"])
    )
    return module, {"params": locate.load_params(directory)}, meta


def _eval_network(config, workdir: pathlib.Path, log: StageLog):
    """Stage 3: the clean-image evaluation classifier (trained once, then loaded; trained again
    when its settings changed)."""
    p = config.pipeline
    num_classes = int(config.data.num_classes)
    directory = workdir / EVAL_CLASSIFIER_DIR
    settings = _eval_settings(config)
    if (directory / store.METADATA_FILE).exists():
        meta = store.read_metadata(directory)
        if meta.get("settings") == settings:
            log.skip("eval_net", f"found {directory}")
            return _load_eval_network(directory, meta)
        if "settings" in meta:
            changed = treediff.changed_keys(meta["settings"], settings)
            why = "its settings changed: " + ", ".join(f"{k} {a} -> {b}" for k, a, b in changed)
        else:
            why = f"{directory} records no settings (made by an older gdiff)"
        log.redo("eval_net", why)
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
        "settings": settings,
    }
    store.save_params(directory, variables["params"], metadata=meta, overwrite=True)
    StageLog._say(f"    evaluation classifier: {accuracy:.3f} accuracy on held-out real digits")
    log.done("eval_net", t0)
    return module, variables, meta


def _grid(images: np.ndarray, labels: np.ndarray, per_class: int, zoom: int) -> np.ndarray:
    grid = grid_lib.class_grid(images, labels, per_class=per_class)
    return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)


def _pairs(sample_paths) -> list[tuple[str, guidance_rows.GuidanceRow]]:
    """Every (model, guidance row) sampled, in a stable order."""
    return sorted((name, row) for name, paths in sample_paths.items() for row in paths)


def _scored(config, sample_paths, eval_net) -> dict[str, Any]:
    """What an evaluation scores (the evaluate stage's pin, recorded in results.json): the run
    digest of every merged samples file, the evaluation network's fingerprint, the scoring
    settings."""
    return {
        "samples": {
            f"{name}/{row.folder()}": _side_digest(sample_paths[name][row])
            for name, row in _pairs(sample_paths)
        },
        "eval_net": fingerprints.params_fingerprint(eval_net[1]["params"]),
        "settings": {
            "is_split_size": int(config.eval.is_split_size),
            "eval_split": str(config.data.eval_split),
            "image_size": int(config.data.image_size),
        },
    }


def _stored_results(
    workdir: pathlib.Path, sample_paths, scored, stepped: bool
) -> tuple[dict[str, Any] | None, str | None]:
    """(an earlier evaluation's results, None) when every output of the stage exists and
    results.json records that it scored `scored`; else (None, why it is redone), why being None
    when there is no earlier evaluation at all. `stepped`: whether the evaluation draws
    training_steps.png (`sweep.has_step_curves`)."""
    stored, why = _stored_record(
        workdir, _result_files(workdir, sample_paths, stepped), RESULTS_JSON, RESULTS_CSV, scored
    )
    if stored is None:
        return None, why
    return {
        "rows": stored["rows"],
        "baseline": stored.get("baseline"),
        "summary": stored["summary"],
    }, None


def _stored_record(
    workdir: pathlib.Path, outputs: list[pathlib.Path], record: str, table: str, scored
) -> tuple[dict[str, Any] | None, str | None]:
    """A scoring stage's earlier outputs: (its record `record` (JSON) with "rows" read back from
    `table` (CSV), None) when every one of `outputs` exists and the record says it scored
    `scored`; else (None, why the stage is redone), why being None when none of its outputs
    exist (a first run)."""
    missing = [p for p in outputs if not p.exists()]
    if len(missing) == len(outputs):
        return None, None
    json_path = workdir / record
    stored = json.loads(json_path.read_text()) if json_path.exists() else {}
    if "scored" in stored and stored["scored"] != scored:
        names = {"eval_net": "the evaluation network"}
        changes = [
            names.get(k, k.replace("samples.", "samples of ", 1))
            for k, _, _ in treediff.changed_keys(stored["scored"], scored)
        ]
        more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
        return None, "what it scored changed: " + ", ".join(changes[:4]) + more
    if missing:
        names = ", ".join(str(p.relative_to(workdir)) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return None, f"{names}{more} missing: an earlier evaluation did not finish"
    if "scored" not in stored:
        return None, f"{record} records no inputs (made by an older gdiff)"
    try:
        rows = report.read_csv(workdir / table)
    except ValueError as e:  # a table of an older layout: evaluate again
        return None, str(e)
    return {**stored, "rows": rows}, None


def _result_files(workdir: pathlib.Path, sample_paths, stepped: bool) -> list[pathlib.Path]:
    """Every output of the evaluate stage; results.json, its record, is written last."""
    files = [workdir / n for n in (RESULTS_CSV, RESULTS_MD, PLOT, SWEEP_FIGURE)]
    if sweep.compares_guidance(sample_paths):
        files.append(workdir / FRONTIER_PLOT)
    if stepped:
        files.append(workdir / STEPS_PLOT)
    files += [_grid_path(workdir, m, s) for m, s in _pairs(sample_paths)]
    return [*files, workdir / RESULTS_JSON]


def _save_grids(config, workdir: pathlib.Path, sample_paths) -> dict[tuple[str, float], tuple]:
    """grids/<model>_<row folder>.png (rows = classes); returns {(model, guidance row): (images,
    labels)}."""
    per_class, zoom = int(config.pipeline.grid_per_class), int(config.pipeline.grid_zoom)
    samples = {}
    for name, scale in _pairs(sample_paths):
        images, labels = sample_files.read_sample_file(sample_paths[name][scale])
        samples[(name, scale)] = images, np.asarray(labels, np.int32)
        grid_lib.save_png(
            _grid_path(workdir, name, scale), _grid(*samples[(name, scale)], per_class, zoom)
        )
    return samples


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


def _scorer(config, workdir: pathlib.Path, eval_net) -> tuple[scoring.Scorer, int]:
    """The sweep's scorer: evaluation-network features of held-out real digits as the reference,
    the guidance classifier's columns, the evaluator's IS chunk size. Returns (scorer, reference
    size)."""
    module, variables, _ = eval_net
    extractor = features.ClassifierExtractor(module, variables)
    ref_images, _ = real_digits(config.data.eval_split, int(config.data.image_size))
    scorer = scoring.Scorer(
        extractor,
        scoring.reference_from_images(extractor, ref_images),
        is_split_size=int(config.eval.is_split_size),
        guidance=sweep.load_guidance(config, workdir),
        eval_accuracy=True,
    )
    return scorer, len(ref_images)


def _evaluate(
    config, workdir, models, sampled, eval_net, get_scorer, log, timings
) -> dict[str, Any]:
    """Stage 5: the table, plot, grids and summary (skipped when every output exists and
    results.json records that these samples were scored with this evaluation network).
    `sampled`: (sample paths, each model's training step or None: `_sample`). `get_scorer()` ->
    (scorer, reference size): `_scorer`, built once for stages 5 and 6."""
    sample_paths, steps = sampled
    stepped = sweep.has_step_curves(models, sample_paths, steps)
    scored = _scored(config, sample_paths, eval_net)
    stored, why = _stored_results(workdir, sample_paths, scored, stepped)
    if stored is not None:
        log.skip("evaluate", f"found {workdir / RESULTS_JSON} of these samples")
        return stored
    if why:
        log.redo("evaluate", why)
    pairs = _pairs(sample_paths)
    t0 = log.start("evaluate", f"score {len(pairs)} (model, scale) pairs against real digits")
    # The record goes first and comes back last: an evaluation cut short is never taken as done.
    (workdir / RESULTS_JSON).unlink(missing_ok=True)
    scorer, num_ref = get_scorer()
    rows = sweep.score_models(scorer, sample_paths, models, with_sampler=False, steps=steps)
    samples = _save_grids(config, workdir, sample_paths)
    n = len(samples[pairs[0]][0])
    baseline = scorer(*_held_back_digits(config, workdir, eval_net[2], n))
    # The scale sweep and the guidance comparison at each network's newest step; the earlier
    # checkpoints (sample.checkpoint_steps) as curves against the training step.
    latest = report.newest(rows)
    summary = report.summarize(
        latest,
        baseline=baseline,
        baseline_name=BASELINE,
        chance=1.0 / int(config.data.num_classes),
    )
    if "guidance" in rows[0]:
        summary += "\n\n" + report.summarize_frontier(latest, report.accuracy_key(rows))
    if stepped:
        summary += "\n\n" + report.summarize_steps(rows)
    results = {"rows": rows, "baseline": baseline, "summary": summary}
    details = _details(config, workdir, models, num_ref, eval_net[2], timings)
    _write_results(config, workdir, results, _titled(samples), details, scored)
    log.done("evaluate", t0)
    return results


def _details(config, workdir: pathlib.Path, models, num_ref: int, meta, timings) -> dict:
    """The set-up lines of results.md."""
    training = "; ".join(
        f"{m.entry} {m.config.train.num_steps} steps x batch {m.config.train.batch_size}"
        + (
            f", label dropout {m.config.model.class_dropout:g}"
            if m.config.model.class_dropout
            else ""
        )
        for m in trained(models)
    )
    scales = "; ".join(
        {
            m.entry: f"{m.entry} {m.config.sample.classifier_scale}"
            for m in models
            if guidance_rows.uses_classifier(guidance_rows.parse_rows(m.config.sample))
        }.values()
    )
    stepped = {
        m.entry: f"{m.entry}: {m.label} at steps {m.config.sample.checkpoint_steps}"
        for m in models
        if m.step is not None
    }
    return {
        "command": f"python main.py --mode=pipeline --config configs/digits.py --workdir {workdir}",
        "image size": f"{config.data.image_size}x{config.data.image_size}",
        "diffusion training": training,
        "classifier training": (
            f"{config.train.classifier_num_steps} steps x batch "
            f"{config.train.classifier_batch_size}"
        ),
        "sampling": sweep.sampling_description(config, models),
        "classifier scales": scales,
        **({"checkpoint steps": "; ".join(stepped.values())} if stepped else {}),
        "reference set": f"{num_ref} held-out real digits (split {config.data.eval_split})",
        "evaluation network held-out accuracy": _fmt_opt(meta.get("held_out_accuracy")),
        "stage times (s)": ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) or "n/a",
    }


def _write_results(config, workdir: pathlib.Path, results, samples, details, scored) -> None:
    """The metrics-vs-scale plot, the sweep figure, results.csv / .md, then results.json with
    `scored`, the stage's record (last: it marks the stage done)."""
    rows, baseline = results["rows"], results["baseline"]
    latest = report.newest(rows)
    per_class, zoom = int(config.pipeline.grid_per_class), int(config.pipeline.grid_zoom)
    report.plot(latest, workdir / PLOT, baseline=baseline, baseline_name=BASELINE)
    images = [PLOT, SWEEP_FIGURE]
    if report.step_curves(rows):
        report.plot_against_step(
            rows, workdir / STEPS_PLOT, baseline=baseline, baseline_name=BASELINE
        )
        images.insert(1, STEPS_PLOT)
    if "guidance" in rows[0]:
        report.plot_frontier(
            latest,
            workdir / FRONTIER_PLOT,
            accuracy=report.accuracy_key(rows),
            baseline=baseline,
            baseline_name=BASELINE,
        )
        images.insert(0, FRONTIER_PLOT)
    report.save_sweep_figure(
        {key: _grid(*samples[key], min(per_class, 5), 1) for key in samples},
        workdir / SWEEP_FIGURE,
        zoom=zoom,
    )
    report.write_csv(rows, workdir / RESULTS_CSV)
    report.write_markdown(
        rows,
        workdir / RESULTS_MD,
        title=(
            "Guidance on digits: classifier, classifier-free, two-network and autoguidance"
            if "guidance" in rows[0]
            else "Classifier guidance on digits: conditional and unconditional models"
        ),
        baseline=baseline,
        baseline_name=BASELINE,
        notes=[
            f"The {BASELINE} row scores real training digits that the evaluation network never "
            "saw (as many as samples per scale, same label balance) the same way: the values "
            "real data reaches on this measuring stick."
        ],
        summary=results["summary"],
        details=details,
        images=images,
    )
    atomic.write_text(workdir / RESULTS_JSON, json.dumps({**results, "scored": scored}, indent=1))


def _grid_path(workdir: pathlib.Path, model: str, row: guidance_rows.GuidanceRow) -> pathlib.Path:
    return workdir / GRID_DIR / f"{model}_{row.folder()}.png"


def _titled(samples: dict) -> dict:
    """{(model, row): x} -> {(entry name, the row's short title): x} for the sweep figure (a
    figure row per sweep entry, a column per guidance row)."""
    return {(name, row.short()): value for (name, row), value in samples.items()}


def _fmt_opt(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


# ----------------------------------------------------------------------------- solver sweep


def solver_nfes(config) -> list[int]:
    """`pipeline.solver_sweep_nfe` ("5,10,15,25,50"; "" skips the stage) as ints, checked."""
    text = str(config.pipeline.solver_sweep_nfe).strip()
    if not text:
        return []
    nfes = sweep.distinct_positive_ints(text)
    if nfes is None:
        raise errors.ConfigError(
            f"pipeline.solver_sweep_nfe={text!r} must be distinct positive integers separated by "
            "commas (e.g. '5,10,15,25,50'), or '' to skip the solver sweep"
        )
    return nfes


def solver_models(config, workdir, models: list[sweep.SweepModel]) -> list[sweep.SweepModel]:
    """The rows of the quality-against-cost sweep, as sweep models sharing one checkpoint: the
    model `pipeline.solver_sweep_model` at `pipeline.solver_sweep_scale` with DDIM steps and
    DPM-Solver (the model's `sample.dpm_solver_*` settings) at each NFE of
    `pipeline.solver_sweep_nfe`, then `pipeline.solver_sweep_reference_steps` ancestral steps;
    all over the scale sweep's noise and labels (its seed, sample count and labels). Each samples
    into samples/solver_sweep/<kind>_<NFE>/; [] when the sweep is off."""
    p = config.pipeline
    nfes = solver_nfes(config)
    if not nfes:
        return []
    by_name = {m.name: m for m in models}
    base = by_name.get(str(p.solver_sweep_model))
    if base is None:
        raise errors.ConfigError(
            f"pipeline.solver_sweep_model={p.solver_sweep_model!r} is not a model of the job; "
            f"use one of {', '.join(by_name)}"
        )
    reference = int(p.solver_sweep_reference_steps)
    if reference < 1:
        raise errors.ConfigError(
            f"pipeline.solver_sweep_reference_steps={reference} must be a positive number of "
            "ancestral steps (the paper's 250)"
        )
    out = plan_lib.output_dir(config, str(workdir)) / SOLVER_SAMPLES
    scale = float(p.solver_sweep_scale)
    rows = [("ddim", n) for n in nfes] + [("dpm_solver", n) for n in nfes]
    return [
        _solver_model(base, kind, steps, scale, out)
        for kind, steps in [*rows, ("ancestral", reference)]
    ]


def _solver_model(base: sweep.SweepModel, kind: str, steps: int, scale: float, out: pathlib.Path):
    """`base` sampled with `kind` in `steps` network evaluations at `scale`, from its own
    checkpoint (sample.model_checkpoint, else its workdir)."""
    config = copy.deepcopy(base.config)
    s = config.sample
    s.classifier_scale = labels_lib.format_scale(scale)
    s.sampler = kind
    s.use_ddim = kind == "ddim"
    if kind == "dpm_solver":
        s.dpm_solver_steps = steps
    else:  # DDIM's even stride ("ddimN"), or N evenly spaced ancestral steps
        s.timestep_respacing = f"ddim{steps}" if kind == "ddim" else str(steps)
    name = f"{kind}_{steps}"
    s.output_dir = str(out / name)
    return sweep.SweepModel(name, config, base.workdir)


def _solver_files(workdir: pathlib.Path) -> list[pathlib.Path]:
    """Every output of the solver sweep stage; solver_sweep.json, its record, is written last."""
    return [workdir / n for n in (SOLVER_CSV, SOLVER_MD, SOLVER_PLOT, SOLVER_JSON)]


def _solver_sweep(
    config, workdir, solver, mesh, eval_net, get_scorer, log
) -> tuple[dict | None, dict]:
    """Stage 6: quality against cost (`solver_models`): sampled like stage 4 (pinned by each
    row's sampling manifest; rows of other weights or settings moved aside and drawn afresh),
    scored like stage 5 (the same scorer), recorded in solver_sweep.json (written last: the
    samples' run digests, the evaluation network, the scoring settings). Skipped when its
    samples are current and every output exists with that record. Returns (the rows, the
    reference row and the summary, or None when the sweep is off or on processes other than 0;
    {row: {scale: merged samples}}).
    """
    stage = "solver_sweep"
    if not solver:
        log.skip(stage, "pipeline.solver_sweep_nfe is empty")
        return None, {}
    plans = sweep.plan_models(solver, workdir, mesh)
    merged = {name: dict(plan.merged) for name, plan in plans.items()}
    changed, unfinished = _sampling_state(solver, plans)
    why = None
    if changed:  # every row's manifest names the same changed weights: the first says it
        more = f" (and {len(changed) - 1} more rows)" if len(changed) > 1 else ""
        why = f"{changed[0]}{more}"
    if not changed and not unfinished:
        stored, why = _stored_record(
            workdir,
            _solver_files(workdir),
            SOLVER_JSON,
            SOLVER_CSV,
            _scored(config, merged, eval_net),
        )
        if stored is not None:
            log.skip(stage, f"found {workdir / SOLVER_JSON} of these samples")
            return {k: stored[k] for k in ("rows", "reference", "summary")}, merged
    if why:
        log.redo(stage, why)
    p, n = config.pipeline, int(config.sample.num_samples)
    t0 = log.start(
        stage,
        f"{p.solver_sweep_model} model at scale {labels_lib.format_scale(p.solver_sweep_scale)}: "
        f"DDIM and DPM-Solver at NFE {p.solver_sweep_nfe}, {p.solver_sweep_reference_steps} "
        f"ancestral steps; {n} samples each",
    )
    if distributed.is_main_process():
        (workdir / SOLVER_JSON).unlink(missing_ok=True)  # the record comes back last
    sample_paths = merged
    if changed or unfinished:
        sample_paths = sweep.sample_models([_restarting(m) for m in solver], workdir, mesh)
    results = None
    if distributed.is_main_process():
        results = _score_solver(config, workdir, solver, sample_paths, eval_net, get_scorer, t0)
    log.done(stage, t0)
    return results, sample_paths


def _score_solver(config, workdir, solver, sample_paths, eval_net, get_scorer, t0) -> dict:
    """The solver sweep's rows through the scale sweep's scorer, then solver_sweep.csv / .md /
    .png and the record solver_sweep.json (last). `t0`: when the stage began."""
    scorer, num_ref = get_scorer()
    rows = sweep.score_models(scorer, sample_paths, solver)
    model = str(config.pipeline.solver_sweep_model)
    for row in rows:  # one model throughout: the row names its sampler and NFE
        row["model"] = model
    *swept, reference = rows
    summary = report.summarize_nfe(swept, reference, tolerance=SOLVER_TOLERANCE)
    found = report.crossover(swept, reference, tolerance=SOLVER_TOLERANCE)
    report.plot_against_nfe(swept, workdir / SOLVER_PLOT, reference=reference)
    report.write_csv(rows, workdir / SOLVER_CSV)
    p, s = config.pipeline, config.sample
    first = {m.config.sample.sampler: m for m in reversed(solver)}  # each kind's first row
    samplers = "; ".join(
        sampler_lib.describe(m.config.sample, m.config.diffusion) for m in first.values()
    )
    seconds = time.perf_counter() - t0
    scale = labels_lib.format_scale(p.solver_sweep_scale)
    report.write_markdown(
        rows,
        workdir / SOLVER_MD,
        title=f"Quality against cost: samplers of the {model} model at classifier scale {scale}",
        notes=[
            f"Every row samples the {model} model at classifier scale {scale} (its default "
            "guided scale, pipeline.solver_sweep_scale) from the same noise and the same labels "
            "as results.md, and is scored the same way (the evaluation network's features "
            f"against held-out real digits). The last row, {reference['sampler']} with "
            f"{reference['nfe']} steps, is the paper's sampler: the reference line of the plot. "
            "DDIM and the ancestral steps clip each x_0 prediction to [-1, 1] "
            "(sample.clip_denoised); DPM-Solver++ uses the sample.dpm_solver_* settings below."
        ],
        summary=summary,
        details={
            "command": (
                f"python main.py --mode=pipeline --config configs/digits.py --workdir {workdir}"
            ),
            "samplers (each kind at its first NFE)": samplers,
            "NFE": str(p.solver_sweep_nfe),
            "samples": f"{s.num_samples} per row, labels {s.labels}, seed {s.seed}",
            "reference set": f"{num_ref} held-out real digits (split {config.data.eval_split})",
            "sampling and scoring time (s)": f"{seconds:.0f}",
        },
        images=[SOLVER_PLOT],
    )
    results = {"rows": rows, "reference": reference, "summary": summary}
    record = {
        **results,
        "crossover": {k: (None if r is None else int(r["nfe"])) for k, r in found.items()},
        "scored": _scored(config, sample_paths, eval_net),
    }
    atomic.write_text(workdir / SOLVER_JSON, json.dumps(record, indent=1))
    return results


# ----------------------------------------------------------------------------- entry point


def _train_networks(config, workdir: pathlib.Path, models, mesh, log: StageLog) -> None:
    """Stages 1 and 2: the networks the paper trains (each skipped when found, resumed when its
    checkpoint is short of its step count).

    Raises:
      errors.StoppedError: a training stage stopped on a request (SIGTERM) after saving.
    """
    for m in trained(models):
        stage = f"diffusion/{m.entry}"
        why, resume = _trained_elsewhere(m.config, m.workdir, "model")
        if why:
            log.skip(stage, why)
            continue
        if resume:
            log.redo(stage, resume)
        kind = "class-conditional" if m.config.model.class_cond else "unconditional"
        what = f"train the {kind} diffusion model ({m.config.train.num_steps} steps)"
        _train_stage(log, stage, what, train_job.train, m.config, m.workdir, mesh)
    if not _is_guided(models):
        log.skip("classifier", "every classifier scale is 0: no guidance")
        return
    why, resume = _trained_elsewhere(config, workdir, "classifier")
    if why:
        log.skip("classifier", why)
        return
    if resume:
        log.redo("classifier", resume)
    what = f"train the noise-aware classifier ({config.train.classifier_num_steps} steps)"
    _train_stage(log, "classifier", what, train_job.train_classifier, config, workdir, mesh)


def _train_stage(log: StageLog, stage: str, what: str, train, config, workdir, mesh) -> None:
    """Runs one training stage; a trainer that stopped on a request stops the job."""
    t0 = log.start(stage, what)
    result = train(config, str(workdir), mesh=mesh)
    if result.get("stopped_early"):
        step = int(result["state"].step)
        raise errors.StoppedError(
            f"the pipeline stopped in stage {stage} on a request, after saving step {step} in "
            f"{workdir}; rerun the same command to resume it"
        )
    log.done(stage, t0)


def _sample(workdir: pathlib.Path, models, mesh, log: StageLog) -> tuple[dict, dict | None]:
    """Stage 4: every model at every scale, over the same noise and labels. Skipped when every
    merged file exists and was drawn under the manifest this run would pin; samples of other
    weights or settings are moved aside and drawn afresh. Returns ({model: {row: merged
    samples}}, `sweep.row_steps`: each model's training step when some network is sampled at
    several)."""
    plans = sweep.plan_models(models, workdir, mesh)
    steps = sweep.row_steps(models, plans)
    merged = {name: dict(plan.merged) for name, plan in plans.items()}
    changed, unfinished = _sampling_state(models, plans)
    if not changed and not unfinished:
        log.skip("sample", f"found {len(_pairs(merged))} merged sample file(s) of these networks")
        return merged, steps
    if changed:
        log.redo("sample", "; ".join(changed))
    n = int(models[0].config.sample.num_samples)
    what = ", ".join(f"{m.name} {len(guidance_rows.parse_rows(m.config.sample))}" for m in models)
    t0 = log.start("sample", f"{n} samples per model and guidance row (rows: {what})")
    # The automated job redoes a stage whose inputs changed: a differing run is moved aside
    # (nothing deleted), as `--mode=sample` does with sample.restart=true.
    sample_paths = sweep.sample_models([_restarting(m) for m in models], workdir, mesh)
    log.done("sample", t0)
    return sample_paths, steps


def _restarting(model: sweep.SweepModel) -> sweep.SweepModel:
    config = copy.deepcopy(model.config)
    config.sample.restart = True
    return dataclasses.replace(model, config=config)


def _sampling_state(models, plans) -> tuple[list[str], list[str]]:
    """(why earlier samples are out of date, which models' runs are unfinished): a model whose
    samples directory holds a run of other settings or weights than it would pin now, or a
    merged file made under another run, is out of date; one with merged files missing is
    unfinished (and resumed from its shards)."""
    changed, unfinished = [], []
    loaded = {}  # the solver sweep's rows share one checkpoint: load and check it once
    for m in models:
        plan = plans[m.name]
        old = manifest_lib.read(plan.out)
        missing = [p for p in plan.merged.values() if not p.exists()]
        if old is None:  # not begun, or its manifest is gone: the sample job checks the files
            unfinished.append(m.name)
            continue
        config = m.sampling_config()
        key = json.dumps(
            [repr(plan.model), repr(plan.classifier), str(config.sample.ema_rate)]
            + [repr(plan.guide), str(config.sample.guide_ema_rate)]
            + [config[g].to_dict() for g in ("model", "diffusion", "classifier")],
            sort_keys=True,
            default=str,
        )
        if key not in loaded:
            loaded[key] = sample_job.load_weights(config, plan)
        new = sample_job.pinned_manifest(plan, loaded[key])
        run_id = manifest_lib.run_digest(new)
        if manifest_lib.run_digest(old) != run_id:
            changed.append(f"{m.name}: {_manifest_changes(old, new)}")
        elif any(_side_digest(p) != run_id for p in plan.merged.values() if p.exists()):
            changed.append(f"{m.name}: a merged file was made under another run")
        elif missing:
            unfinished.append(m.name)
    return changed, unfinished


def _manifest_changes(old: dict, new: dict) -> str:
    """The compared keys of two sampling manifests that differ, shortly."""

    def compared(manifest):
        manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
        return {k: v for k, v in manifest.items() if k not in manifest_lib.INFO_KEYS}

    def short(value):
        return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else value

    changes = treediff.changed_keys(compared(old), compared(new))
    text = ", ".join(f"{k} {short(a)} -> {short(b)}" for k, a, b in changes[:4])
    return text + (f" (and {len(changes) - 4} more)" if len(changes) > 4 else "")


def _side_digest(path: pathlib.Path) -> str | None:
    """The run digest a merged samples file was made under (its `.run` side file), if any."""
    side = manifest_lib.side_digest_path(path)
    return side.read_text().strip() if side.exists() else None


def _output_paths(workdir: pathlib.Path, sample_paths, solver_paths) -> dict[str, Any]:
    return {
        "csv": workdir / RESULTS_CSV,
        "markdown": workdir / RESULTS_MD,
        "plot": workdir / PLOT,
        "sweep_figure": workdir / SWEEP_FIGURE,
        "grids": {(m, s): _grid_path(workdir, m, s) for m, s in _pairs(sample_paths)},
        "samples": sample_paths,
        "solver_csv": workdir / SOLVER_CSV,
        "solver_markdown": workdir / SOLVER_MD,
        "solver_plot": workdir / SOLVER_PLOT,
        # {row: {scale: merged samples}} of the solver sweep's rows (<kind>_<NFE>).
        "solver_samples": solver_paths,
    }


def _once(make):
    """make() on the first call, its result after."""
    made = []

    def get():
        if not made:
            made.append(make())
        return made[0]

    return get


def run(config, workdir: str, *, mesh=None) -> dict[str, Any]:
    """Trains, guides and measures on digits; see the module docstring for the stages.

    Args:
      config: configs/digits.py (or a variant of it with a `pipeline` group).
      workdir: where every stage reads and writes; finished stages are skipped on a rerun.
      mesh: the device mesh for training and sampling (default: every device).

    Returns:
      dict(rows=[per (model, scale) dicts with report.COLUMNS], baseline=the real-digit row,
      summary=str, ran=[stages run], skipped=[stages skipped], redone={stage: why it ran again},
      paths=dict of output files).

    Raises:
      errors.StoppedError: a training stage stopped on a request (SIGTERM) after saving; a rerun
        resumes it.
    """
    workdir = pathlib.Path(workdir)
    models = sweep.sweep_models(config, workdir)
    _check_config(config, models, workdir)
    solver = solver_models(config, workdir, models)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = distributed.data_mesh() if mesh is None else mesh
    log = StageLog(stages(models))
    _train_networks(config, workdir, models, mesh, log)
    # 3: the evaluation network (before sampling: a misconfiguration fails in seconds).
    eval_net = _eval_network(config, workdir, log)
    sampled = _sample(workdir, models, mesh, log)
    sample_paths = sampled[0]
    # 5: measure and report (one scorer for stages 5 and 6, built when first needed).
    get_scorer = _once(lambda: _scorer(config, workdir, eval_net))
    results = {}
    if distributed.is_main_process():
        results = _evaluate(
            config, workdir, models, sampled, eval_net, get_scorer, log, dict(log.seconds)
        )
        print("\n" + results["summary"], flush=True)
        print(
            f"\nResults: {workdir / RESULTS_MD} (table), {workdir / RESULTS_CSV}, "
            f"{workdir / PLOT} (metrics vs scale), {workdir / SWEEP_FIGURE} and "
            f"{workdir / GRID_DIR}/ (samples per model and scale, one row per digit).",
            flush=True,
        )
    # 6: quality against cost.
    solved, solver_paths = _solver_sweep(config, workdir, solver, mesh, eval_net, get_scorer, log)
    if solved is not None:
        print("\n" + solved["summary"], flush=True)
        print(
            f"\nSolver sweep: {workdir / SOLVER_MD} (table), {workdir / SOLVER_CSV}, "
            f"{workdir / SOLVER_PLOT} (FID and accuracy against NFE).",
            flush=True,
        )
    return {
        **results,
        "solver": solved,
        "ran": log.ran,
        "skipped": log.skipped,
        "redone": log.redone,
        "paths": _output_paths(workdir, sample_paths, solver_paths),
    }
