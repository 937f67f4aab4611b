"""`--mode=sweep`: the classifier-scale ablation (the paper's Table 4 and Fig. 4).

    python main.py --mode=sweep --config configs/ablations/<ablation>.py --workdir <dir> \
        --config.eval.ref_batch=REF.npz --config.eval.inception_weights=WEIGHTS

One or more diffusion models (`sweep.models`, e.g. a class-conditional and an unconditional one)
are guided by the same classifier. Each is sampled at every scale of its `sample.classifier_scale`
in one compiled program (gdiff/jobs/sample.py), and all models draw the same labels from the same
noise (per-example keys from `sample.seed`), so rows differ by the model, its sampler and the scale
alone. A model's `sample` overrides may choose its sampler and steps (`sample.sampler`,
`sample.timestep_respacing`, `sample.dpm_solver_steps`, ...): two entries with the same
`sample.model_checkpoint` compare samplers over the same noise and labels. Every
(model, scale)'s merged samples are scored by `gdiff.evaluation.scoring.Scorer` against
`eval.ref_batch` exactly as `--mode=evaluate` scores that file (the batch's own mu / sigma / mu_s /
sigma_s, the FID Inception at `eval.resize`, `eval.is_split_size`; the reference activations are
computed once per sweep and cached next to the batch), plus the guidance classifier's accuracy and
log p(y|x) at the requested labels.

Models: `sweep.models` maps a name to overrides of config groups, e.g.
`{"unconditional": {"model": {"class_cond": False}, "sample": {"classifier_scale": "0,1,10"}}}`;
empty, the config's own model is swept alone (named "conditional" or "unconditional" after
`model.class_cond`). A named model is loaded from its `sample.model_checkpoint`, else from
`<workdir>/<name>` (a `--mode=convert` or `--mode=train` workdir); the classifier from
`sample.classifier_checkpoint`, else the workdir.

Over training (the paper's architecture ablations report FID at fixed iteration counts): a
model's `sample.checkpoint_steps` ("100000,200000,300000"; `--config.sample.checkpoint_steps=...`
for the config's own model, `sweep.models.<name>.sample.checkpoint_steps` per entry) samples those
steps of its training run, each at every guidance row over the same noise and labels (rows
`<name>@<step>`; `train.keep_every` keeps such a series beyond `train.max_to_keep`). The table
then names each row's `step`; its plot, frontier and summary speak of each network's newest step,
and training_steps.png draws each curve's FID, sFID, recall and accuracy against the step.

Outputs in the workdir (an interrupted sweep resumes from the shards on disk):

    samples/<model>/scale_<s>/samples_<N>x<H>x<W>x3.npz  per model and scale (the reference's
                      format; samples/scale_<s>/ when one model is swept;
                      samples/<model>/step_<step>/scale_<s>/ per checkpoint step)
    scale_sweep.csv   model, (guidance, step,) scale, sampler, nfe, fid, sfid, inception_score,
                      precision, recall, classifier_accuracy, log_prob: one row per (model,
                      scale), every digit
    scale_sweep.md    the same table (4 significant digits), the columns' meanings, a summary
    scale_sweep.png   each metric against the scale, one line per model
    guidance_frontier.png  FID against accuracy per guidance kind (a sweep comparing kinds)
    training_steps.png     FID, sFID, recall, accuracy against the step (a sweep over training)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from gdiff import distributed, errors, factory
from gdiff.checkpoints import locate
from gdiff.diffusion import guidance as guidance_lib
from gdiff.evaluation import evaluator, report, scoring
from gdiff.jobs import sample as sample_job
from gdiff.sampling import guidance_rows, sample_files
from gdiff.sampling import plan as plan_lib
from gdiff.sampling import sampler as sampler_lib

TABLE_CSV = "scale_sweep.csv"
TABLE_MD = "scale_sweep.md"
PLOT = "scale_sweep.png"
FRONTIER_PLOT = "guidance_frontier.png"
STEPS_PLOT = "training_steps.png"
# Groups a model of a sweep may override; the guidance classifier is shared by all of them.
MODEL_GROUPS = ("model", "diffusion", "optim", "train", "sample")
# Checkpoint keys of a model's `sample` overrides that may start with "{workdir}" (the sweep's
# workdir, e.g. "{workdir}/conditional": another entry's model, or a step folder of it).
WORKDIR_PATHS = ("model_checkpoint", "guide_checkpoint")
# What every model of a sweep must share (keys of its sampling manifest): the noise comes from the
# seed and the example ids. The sampler and its steps may differ: every sampler starts from the
# same per-example x_T (gdiff/sampling/sampler.py).
SHARED_SETTINGS = ("seed", "num_samples", "image_shape")


@dataclasses.dataclass(frozen=True)
class SweepModel:
    """One diffusion model of a sweep."""

    name: str  # the entry's name; "<entry>@<step>" for one step of sample.checkpoint_steps
    config: ml_collections.ConfigDict  # the full config with this model's overrides applied
    workdir: pathlib.Path  # where it is trained, and loaded from without sample.model_checkpoint
    # The network its rows sample, as the table's `model` column names it: the entry's own name,
    # or that of the entry whose workdir its sample.model_checkpoint is (an entry that samples
    # another's model with other guidance: `sampled_label`).
    label: str = ""
    # The sweep.models entry it comes from (`name` without its step).
    entry: str = ""
    # The training step it samples (one of the entry's sample.checkpoint_steps), None: the
    # checkpoint's newest step or its parameters.
    step: int | None = None

    def __post_init__(self):
        for key in ("label", "entry"):
            if not getattr(self, key):
                object.__setattr__(self, key, self.name)

    def sampling_config(self) -> ml_collections.ConfigDict:
        """`config` with `sample.model_checkpoint` defaulting to this model's workdir, and
        naming the folder of `step` when it has one (raises when the step is not there)."""
        config = copy.deepcopy(self.config)
        config.sample.model_checkpoint = config.sample.model_checkpoint or str(self.workdir)
        if self.step is not None:
            config.sample.model_checkpoint = str(
                locate.step_folder(config.sample.model_checkpoint, self.step)
            )
        config.sample.checkpoint_steps = ""
        return config


def _with_overrides(config, name: str, entry) -> ml_collections.ConfigDict:
    """A copy of `config` with `entry` ({group: {key: value}}) written into it, typed."""
    config = copy.deepcopy(config)
    for group, values in entry.items():
        if group not in MODEL_GROUPS:
            raise errors.UnknownKeyError(
                f"sweep.models.{name}.{group}: a model of a sweep may override only "
                f"{', '.join(MODEL_GROUPS)} (the guidance classifier is shared)"
            )
        for key, value in values.items():
            if key not in config[group]:
                raise errors.UnknownKeyError(
                    f"sweep.models.{name}.{group}.{key} is not a key of {group}; see "
                    f"configs/common.py for the keys of {group}"
                )
            # FieldReferences stay linked: model.class_cond also sets data.class_cond.
            config[group][key] = value
    return config


def sweep_models(config, workdir: str | os.PathLike) -> list[SweepModel]:
    """The models `config.sweep.models` declares (or the config's own model alone)."""
    workdir = pathlib.Path(workdir)
    entries = config.sweep.models
    if not entries:
        name = "conditional" if config.model.class_cond else "unconditional"
        return _at_steps(SweepModel(name, config, workdir))
    if config.sample.model_checkpoint:
        raise errors.ConfigError(
            f"sample.model_checkpoint={config.sample.model_checkpoint} names one checkpoint, but "
            f"sweep.models declares {len(entries)} models: set "
            "sweep.models.<name>.sample.model_checkpoint for each (default <workdir>/<name>)"
        )
    out = plan_lib.output_dir(config, str(workdir))
    models = []
    for name, entry in entries.items():
        model_config = _with_overrides(config, name, entry)
        model_config.sample.output_dir = str(out / name)
        for key in WORKDIR_PATHS:  # "{workdir}/<entry>": a checkpoint of this sweep's workdir
            model_config.sample[key] = str(model_config.sample[key]).replace(
                "{workdir}", str(workdir)
            )
        models.append(SweepModel(name, model_config, workdir / name))
    labelled = [dataclasses.replace(m, label=sampled_label(m, models)) for m in models]
    return [step for m in labelled for step in _at_steps(m)]


def checkpoint_steps(config) -> list[int]:
    """`sample.checkpoint_steps` ("500,1000,1500") as distinct positive steps, ascending ([]
    when empty)."""
    text = str(config.sample.checkpoint_steps).strip()
    if not text:
        return []
    steps = distinct_positive_ints(text)
    if steps is None:
        raise errors.ConfigError(
            f"sample.checkpoint_steps={text!r} must be distinct positive training steps "
            "separated by commas (e.g. '100000,200000,300000'), or '' for the newest step"
        )
    return steps


def distinct_positive_ints(text: str) -> list[int] | None:
    """ "5,10,15" as ascending ints; None unless it lists distinct positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        return None
    if min(values) < 1 or len(set(values)) != len(values):
        return None
    return sorted(values)


def _at_steps(model: SweepModel) -> list[SweepModel]:
    """`model` once per step of its sample.checkpoint_steps (`<name>@<step>`, sampling into
    <its output>/step_<step>/), or alone when it names none."""
    steps = checkpoint_steps(model.config)
    if not steps:
        return [model]
    out = plan_lib.output_dir(model.config, str(model.workdir))  # an entry's: out/<entry>
    at_steps = []
    for step in steps:
        config = copy.deepcopy(model.config)
        config.sample.output_dir = str(out / f"step_{step}")
        at_steps.append(
            dataclasses.replace(model, name=f"{model.name}@{step}", config=config, step=step)
        )
    return at_steps


def sampled_label(model: SweepModel, models: list[SweepModel]) -> str:
    """The name of the entry whose model `model` samples: another entry's, when its
    sample.model_checkpoint is that entry's workdir (or a step folder in it), else its own."""
    given = model.config.sample.model_checkpoint
    if not given:
        return model.name
    path = pathlib.Path(given).resolve()
    for other in models:
        home = other.workdir.resolve()
        if other is not model and (path == home or home in path.parents):
            return other.name
    return model.name


def plan_models(models: list[SweepModel], workdir, mesh) -> dict[str, plan_lib.SamplingPlan]:
    """Every model's sampling plan (checkpoints located, settings validated), checking that all
    models draw the same labels and image shape: the rows of a sweep differ by model and scale
    only. Raises before anything is sampled."""
    topology = plan_lib.Topology.of(mesh)
    plans = {
        m.name: plan_lib.make_plan(m.sampling_config(), str(workdir), topology) for m in models
    }
    first = plans[models[0].name].manifest
    for name, plan in plans.items():
        differ = [k for k in SHARED_SETTINGS if plan.manifest[k] != first[k]]
        if differ:
            raise errors.ConfigError(
                f"the models of a sweep draw the same noise and samples, but {models[0].name} and "
                f"{name} differ in {', '.join(f'sample.{k}' for k in differ)}"
            )
    labelled = {n: p.labels for n, p in plans.items() if p.labels is not None}
    if labelled and any(
        not np.array_equal(v, next(iter(labelled.values()))) for v in labelled.values()
    ):
        raise errors.ConfigError(
            f"the models of a sweep must draw the same labels; {sorted(labelled)} do not (do "
            "their model.num_classes and sample.labels / sample.seed agree?)"
        )
    return plans


def sample_models(models: list[SweepModel], workdir, mesh) -> dict[str, dict[Any, pathlib.Path]]:
    """Samples every model at its guidance rows (resumable); {model: {GuidanceRow: merged
    .npz}}."""
    plan_models(models, workdir, mesh)
    return {m.name: sample_job.run(m.sampling_config(), str(workdir), mesh=mesh) for m in models}


def load_guidance(config, workdir) -> scoring.ClassifierScore | None:
    """The guidance classifier's scorer (`sample.classifier_checkpoint`, else the workdir's
    classifier), or None when there is none."""
    try:
        found = locate.locate(config.sample.classifier_checkpoint or workdir, "classifier")
    except FileNotFoundError:
        return None
    params = locate.load_params(found)
    return scoring.ClassifierScore(
        factory.build_classifier(config), sample_job.as_variables(params)
    )


def sampler_columns(model: SweepModel) -> dict[str, Any]:
    """A model's `sampler` and `nfe` cells (report.COLUMNS): what draws its rows, at what cost."""
    s, d = model.config.sample, model.config.diffusion
    return {"sampler": sampler_lib.sampler_label(s, d), "nfe": sampler_lib.nfe(s, d)}


def score_models(
    scorer: scoring.Scorer,
    sample_paths,
    models: list[SweepModel] | None = None,
    *,
    with_sampler: bool = True,
    steps: dict[str, int | None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, guidance row), in row order (network, training step, kind, weight,
    classifier scale, interval): `scorer` on the merged samples and the labels they were drawn
    for.

    Args:
      scorer: the sweep's `scoring.Scorer`.
      sample_paths: {model: {guidance row: merged samples .npz}} (`sample_models`).
      models: the sweep's models; given, each row also names its sampler and NFE
        (`sampler_columns`; not `with_sampler`: all rows share one), and its `model` cell the
        network it samples (`SweepModel.label`).
      steps: {model: the training step it sampled} (`row_steps`); given, each row has a `step`
        cell.
    """
    by_name = {m.name: sampler_columns(m) for m in models or () if with_sampler}
    labels_of = {m.name: m.label for m in models or ()}
    compares = compares_guidance(sample_paths)
    rows = []
    for name, guidance in _row_order(sample_paths, labels_of, steps or {}):
        images, labels = sample_files.read_sample_file(sample_paths[name][guidance])
        row = {"model": labels_of.get(name, name)}
        if compares:
            row["guidance"] = guidance.method()
        if steps is not None:
            row["step"] = steps[name]
        row.update(scale=float(guidance.scale), **by_name.get(name, {}))
        row.update(scorer(images, labels))
        logging.info("%s, %s: %s", name, guidance.describe(), row)
        rows.append(row)
    return rows


def _row_order(sample_paths, labels_of: dict[str, str], steps) -> list[tuple[str, Any]]:
    """(entry, row) in table order: the sampled models in order of first appearance; within
    one, its training steps ascending (`steps`: {entry: step}; a parameter checkpoint first),
    then its rows grouped by curve (kind, classifier scale on top, interval), scales ascending,
    whichever entry drew them."""
    first = {}
    for name in sample_paths:
        first.setdefault(labels_of.get(name, name), len(first))

    def step(name) -> int:
        return -1 if steps.get(name) is None else steps[name]

    keyed = [
        ((first[labels_of.get(name, name)], step(name), row.curve_key()), name, row)
        for name, paths in sample_paths.items()
        for row in paths
    ]
    return [(name, row) for _, name, row in sorted(keyed, key=lambda item: item[0])]


def row_steps(
    models: list[SweepModel], plans: dict[str, plan_lib.SamplingPlan]
) -> dict[str, int | None] | None:
    """{model: the training step of the checkpoint its plan loads (None: parameters)} when some
    network of the sweep is sampled at more than one step (its table then has a `step`
    column: `score_models`), else None."""
    steps = {m.name: plans[m.name].model.step for m in models}
    by_label: dict[str, set] = {}
    for m in models:
        by_label.setdefault(m.label, set()).add(steps[m.name])
    return steps if any(len(v) > 1 for v in by_label.values()) else None


def has_step_curves(models: list[SweepModel], sample_paths, steps) -> bool:
    """Whether some network is sampled at one guidance row at more than one training step
    (`steps`: `row_steps`): then its report draws training_steps.png (`report.step_curves`)."""
    if steps is None:
        return False
    labels_of = {m.name: m.label for m in models}
    seen: dict[tuple, set] = {}
    for name, paths in sample_paths.items():
        for row in paths:
            seen.setdefault((labels_of.get(name, name), row), set()).add(steps[name])
    return any(len(v) > 1 for v in seen.values())


def compares_guidance(sample_paths) -> bool:
    """Whether a sweep's rows go beyond classifier guidance at every step (then its table names
    each row's guidance: `report.series`); the classifier-scale ablation keeps Table 4's
    columns."""
    return any(guidance_rows.compares(paths) for paths in sample_paths.values())


def _reference_batch(config) -> tuple:
    """Checks the evaluation inputs BEFORE hours of sampling; returns the read reference batch."""
    ev = config.eval
    if not ev.ref_batch:
        raise errors.ConfigError(
            "the scale sweep evaluates every scale against a reference batch: set "
            "--config.eval.ref_batch=REF.npz (e.g. VIRTUAL_imagenet64_labeled.npz)"
        )
    if not os.path.exists(ev.ref_batch):
        raise errors.MissingInputError(
            f"eval.ref_batch={ev.ref_batch} does not exist; give the reference batch .npz (e.g. "
            "VIRTUAL_imagenet64_labeled.npz)"
        )
    return evaluator.read_reference_batch(ev.ref_batch)


def reference_scorer(config, workdir, ref_batch, extractor=None, guidance=None) -> scoring.Scorer:
    """The scorer `--mode=evaluate` would be (`scoring.evaluate_scorer` of config.eval, or
    `extractor` as its feature network), plus the guidance classifier's columns
    (`load_guidance`).

    Args:
      ref_batch: `evaluator.read_reference_batch(config.eval.ref_batch)`.
      guidance: `load_guidance(config, workdir)` when the caller has loaded it (None: loaded
        here).
    """
    return scoring.evaluate_scorer(
        config.eval,
        workdir,
        batch=ref_batch,
        extractor=extractor,
        guidance=guidance if guidance is not None else load_guidance(config, workdir),
    )


def sampling_description(config, models: list[SweepModel] | None = None) -> str:
    """How a sweep samples, in one line of its report: the sampler of each model (of the config
    alone without `models`), then what all rows share."""
    s = config.sample
    described = {
        m.name: sampler_lib.describe(m.config.sample, m.config.diffusion) for m in models or ()
    }
    if len(set(described.values())) > 1:
        samplers = "; ".join(f"{name}: {text}" for name, text in described.items())
    else:
        samplers = sampler_lib.describe(s, config.diffusion)
    text = (
        f"{samplers}; {s.num_samples} samples per model and scale, labels {s.labels}, seed {s.seed}"
    )
    guides = [guide_description(m) for m in models or ()]
    return "; ".join([text, *[g for g in guides if g]])


def guide_description(model: SweepModel) -> str:
    """What guides an entry's rows beyond the classifier ("" for classifier guidance alone):
    its kinds, and the guide network's checkpoint for two_network / autoguidance rows."""
    s = model.config.sample
    rows = guidance_rows.parse_rows(s)
    if not guidance_rows.compares(rows):
        return ""
    if s.guidance == "classifier":  # in an interval: the scales are its classifier scales
        text = f"{model.name}: classifier at scales {s.classifier_scale}"
    else:
        text = f"{model.name}: {s.guidance} at w = {s.guidance_scale}"
        if guidance_rows.uses_classifier(rows):
            text += f", classifier scales {s.classifier_scale}"
    if s.guidance_interval:
        text += f", intervals {s.guidance_interval!r}"
    if guidance_rows.uses(rows, guidance_lib.GUIDE_NETWORK):
        text += f", guide network {s.guide_checkpoint}"
    return text


def write_report(config, rows, workdir, models=None) -> dict[str, pathlib.Path]:
    """scale_sweep.csv / .md / .png in the workdir (`models`: the sweep's, named in the
    "sampling" line); a sweep comparing guidance kinds (rows with a `guidance` column) adds
    guidance_frontier.png, FID against accuracy at the requested labels per kind, and says
    which kind is best at a given accuracy; one over training steps (rows with a `step` column)
    adds training_steps.png and how each curve moves with the step."""
    workdir = pathlib.Path(workdir)
    details = {
        "reference batch": config.eval.ref_batch,
        "sampling": sampling_description(config, models),
    }
    # The scale sweep and the frontier at each network's newest step; its earlier steps (a sweep
    # over training) as curves against the step.
    latest = report.newest(rows)
    summary, images, out = report.summarize(latest), [PLOT], {}
    accuracy = report.accuracy_key(rows)
    if "guidance" in rows[0] and accuracy:
        out["frontier"] = report.plot_frontier(latest, workdir / FRONTIER_PLOT, accuracy=accuracy)
        summary += "\n\n" + report.summarize_frontier(latest, accuracy)
        images.append(FRONTIER_PLOT)
    if report.step_curves(rows):
        out["steps_plot"] = report.plot_against_step(rows, workdir / STEPS_PLOT)
        summary += "\n\n" + report.summarize_steps(rows)
        images.append(STEPS_PLOT)
    title = "Guidance sweep" if "guidance" in rows[0] else "Classifier-scale sweep"
    if report.STEP in rows[0]:
        title += " over training"
    return {
        "csv": report.write_csv(rows, workdir / TABLE_CSV),
        "markdown": report.write_markdown(
            rows,
            workdir / TABLE_MD,
            title=title,
            summary=summary,
            details=details,
            images=images,
        ),
        "plot": report.plot(latest, workdir / PLOT),
        **out,
    }


def run(config, workdir: str, *, extractor=None, mesh=None) -> list[dict[str, Any]]:
    """Samples every model at every scale, scores each, and writes the table and the plot.

    Args:
      config: a gdiff config: `sweep.models` (the models), each model's `sample.classifier_scale`
        (its scales), `eval` (the reference batch and feature network).
      workdir: checkpoints (defaults) and outputs.
      extractor: the feature network; default the FID Inception-v3 from `eval.inception_weights`
        (a clear error, before any sampling, when that or `eval.ref_batch` is missing).
      mesh: the sampling device mesh (default: all devices).

    Returns:
      The table rows on process 0 (dicts with report.COLUMNS), [] on the others.
    """
    mesh = distributed.data_mesh() if mesh is None else mesh
    ref_batch = _reference_batch(config)
    models = sweep_models(config, workdir)
    steps = row_steps(models, plan_models(models, workdir, mesh))
    # Every process reads the guidance classifier although process 0 alone scores: orbax's
    # restore waits for all processes, so a read by process 0 alone would wait forever.
    guidance = load_guidance(config, workdir)
    scorer = None
    if distributed.is_main_process():
        scorer = reference_scorer(config, workdir, ref_batch, extractor, guidance)
    sample_paths = sample_models(models, workdir, mesh)
    if scorer is None:
        return []
    rows = score_models(scorer, sample_paths, models, steps=steps)
    write_report(config, rows, workdir, models)
    return rows
