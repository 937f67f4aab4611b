"""`--mode=sample`: draw a run of samples, sharded over every device, resumable, per guidance row.

    python main.py --mode=sample --config configs/<model>.py --workdir <dir> \
        --config.sample.classifier_checkpoint=<dir> --config.sample.classifier_scale=1.0
    # classifier-free guidance of a model trained with model.class_dropout, guided only where
    # sigma lies in (0.3, 5]:
    python main.py --mode=sample --config configs/<model>.py --workdir <dir> \
        --config.sample.guidance=cfg --config.sample.guidance_scale=1,2,4 \
        --config.sample.guidance_interval="all;0.3,5"

The rows of a run (`gdiff/sampling/guidance_rows.py`: classifier guidance at each
`sample.classifier_scale`, classifier-free, two-network and autoguidance at each
`sample.guidance_scale`, crossed with every `sample.guidance_interval`) are sampled in the same
compiled program over the same noise and labels (gdiff/sampling/sampler.py), batch by batch; each
batch leaves one shard per row and process on disk, so an interrupted run continues where it
stopped. At the end process 0 merges each row into the reference's `samples_<N>x<H>x<W>x3.npz` and
a grid PNG. The model (and, when a classifier scale is non-zero, the classifier; for two_network
or autoguidance rows, the guide network) is loaded from `sample.model_checkpoint` /
`sample.classifier_checkpoint` / `sample.guide_checkpoint` or the workdir.

Super-resolution configs (`model.small_size` > 0) read `sample.base_samples` (the reference's
super_res_sample.py input: arr_0 uint8 [N, small, small, 3], arr_1 labels) as the low-resolution
input; example i is conditioned on base sample i (cycled when the base file is shorter).

What is this job's own: the plan (`gdiff/sampling/plan.py`: labels, batches, checkpoints), the
weights and their pins, one sampler call per batch and the output format (a reference-format file
and a grid per row). Locking, resuming, the manifest, shards and progress are the run engine's
(gdiff/engine/runs.py).

Output directory (`sample.output_dir`, default `<workdir>/samples`), one folder per row
(`GuidanceRow.folder`: scale_<s> for classifier guidance at every step, else e.g. cfg_2,
two_network_1.5+classifier_1, autoguidance_2_sigma_0.3-5):

    run.json                                 the pinned manifest (gdiff/engine/manifest.py)
    <row>/shard_<process>_<batch>.npz        one per batch and process (shard_<p>of<N>_<batch>.npz
                                             when N > 1 processes drew it)
    <row>/samples_<N>x<H>x<W>x3.npz          the merged run, in the reference's format
    <row>/samples_<N>x<H>x<W>x3.npz.run      the run digest it was merged under
    <row>/grid.png                           a preview grid
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from gdiff import distributed, errors, factory
from gdiff.checkpoints import fingerprints, locate, settings
from gdiff.engine import manifest as manifest_lib
from gdiff.engine import runs
from gdiff.sampling import grid as grid_lib
from gdiff.sampling import guidance_rows, sample_files
from gdiff.sampling import plan as plan_lib
from gdiff.sampling import sampler as sampler_lib


def as_variables(params: Any) -> dict:
    """A loaded parameter tree as flax variables; a full {"params": ...} dict passes through."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return dict(params)
    return {"params": params}


@dataclasses.dataclass(frozen=True)
class Weights:
    """The parameters a run samples with (host or device pytrees) and their pins
    (`locate.load_pinned`: path, format, step, EMA copy, content fingerprint)."""

    model: Any
    model_pin: dict
    classifier: Any = None
    classifier_pin: dict | None = None
    guide: Any = None  # the guide network of two_network / autoguidance rows
    guide_pin: dict | None = None
    guide_group: dict | None = None  # its `model` group (`guide_model_group`)


def guide_model_group(config, location, params) -> dict:
    """The guide network's `model` group: what its training checkpoint recorded (a smaller
    model for autoguidance is described by its own run), else, for parameter checkpoints
    (converted released weights, which record nothing), the config's model group with
    `class_cond` (a label embedding or none) and the null class (an extra embedding row) read
    off the parameters: the released conditional/unconditional pairs differ in nothing else.

    Raises:
      errors.ConfigMismatchError: the guide was trained on another diffusion or image size.
    """
    size = int(config.model.image_size)
    trained = settings.recorded(location)
    if trained is not None and trained.get("model"):
        # A recorded group without class_dropout trained none (`factory.recorded_model_group`).
        group = {**config.model.to_dict(), "class_dropout": 0.0, **trained["model"]}
        group["remat"] = "none"
        settings.check_trained_settings(location, "model", group, config.diffusion, size)
        return group
    group = config.model.to_dict()
    group["class_cond"] = "label_emb" in params
    # A null class (an extra label_emb row) was trained with the config's label dropout, which
    # only decides that the row exists; without one the guide has none.
    rows = params["label_emb"]["embedding"].shape[0] if group["class_cond"] else 0
    if rows != int(group["num_classes"]) + 1:
        group["class_dropout"] = 0.0
    return group


def load_weights(config, plan: plan_lib.SamplingPlan) -> Weights:
    """Loads the plan's model (and classifier) and checks them against the configured networks:
    the settings a training checkpoint records (diffusion, image size, network group;
    gdiff/checkpoints/settings.py), then every parameter's shape.

    Raises:
      errors.ConfigMismatchError: a config describes another network or diffusion than its
        checkpoint was trained with (naming the differing keys or the first differing parameter).
    """
    ema_rate = config.sample.ema_rate or None
    size = int(config.model.image_size)
    settings.check_trained_settings(plan.model, "model", config.model, config.diffusion, size)
    model, model_pin = locate.load_pinned(plan.model, ema_rate=ema_rate)
    network = factory.unet_from_group(config.model)
    fingerprints.check_params_match(
        model, factory.abstract_variables(network)["params"], what="model", where=plan.model.path
    )
    guide = {}
    if plan.guide is not None:
        params, pin = locate.load_pinned(plan.guide, ema_rate=config.sample.guide_ema_rate or None)
        group = guide_model_group(config, plan.guide, params)
        fingerprints.check_params_match(
            params,
            factory.abstract_variables(factory.unet_from_group(group))["params"],
            what="guide network",
            where=plan.guide.path,
        )
        guide = {"guide": params, "guide_pin": pin, "guide_group": group}
    if plan.classifier is None:
        return Weights(model, model_pin, **guide)
    settings.check_trained_settings(
        plan.classifier, "classifier", config.classifier, config.diffusion, size
    )
    classifier, classifier_pin = locate.load_pinned(plan.classifier)
    network = factory.classifier_from_group(config.classifier, size)
    fingerprints.check_params_match(
        classifier,
        factory.abstract_variables(network)["params"],
        what="classifier",
        where=plan.classifier.path,
    )
    return Weights(model, model_pin, classifier, classifier_pin, **guide)


def pinned_manifest(plan: plan_lib.SamplingPlan, weights: Weights) -> dict:
    """The plan's manifest plus what exactly is sampled: each network's step, EMA copy and
    content fingerprint (compared), and where it was found (recorded only)."""

    def pin(p: dict | None) -> dict | None:
        return None if p is None else {k: p[k] for k in ("step", "ema_rate", "sha256")}

    manifest = {
        **plan.manifest,
        "model_weights": pin(weights.model_pin),
        "model_located": weights.model_pin["path"],
        "classifier_weights": pin(weights.classifier_pin),
        "classifier_located": weights.classifier_pin["path"] if weights.classifier_pin else "",
    }
    if weights.guide_pin is not None:  # only then: runs without a guide keep their manifests
        manifest["guide_weights"] = pin(weights.guide_pin)
        manifest["guide_located"] = weights.guide_pin["path"]
        manifest["guide_model"] = factory.recorded_model_group(weights.guide_group)
    return manifest


class SampleJob:
    """A sampling run as the engine's job: one part (folder) per guidance row
    (`guidance_rows.GuidanceRow`: kind, weights, interval).

    The sampler is the config's choice, `sample.sampler`: ancestral or DDIM steps over the
    (respaced) chain, or DPM-Solver / DPM-Solver++ in `sample.dpm_solver_steps` network
    evaluations ("auto" keeps the reference's `sample.use_ddim` switch). Every choice is one
    program built by `gdiff.sampling.sampler.build_sampler`, and the manifest pins its settings
    (`sampler.sampler_settings`), so a run resumes only under the sampler it began with.
    """

    what = "sampling run"
    unit = "img"
    setting = "sample.output_dir"
    restart_setting = "sample.restart"

    def __init__(self, config, plan: plan_lib.SamplingPlan, mesh: jax.sharding.Mesh):
        self.config, self.plan, self.mesh = config, plan, mesh
        self.restart = bool(config.sample.restart)
        self.parts = {row: row.folder() for row in plan.rows}
        self.layout = runs.Layout(
            out=plan.out,
            parts=tuple(self.parts.values()),
            num_batches=plan.num_batches,
            process_index=plan.topology.process_index,
            process_count=plan.topology.process_count,
        )
        self.weights: Weights | None = None
        self._program = None

    def pin(self) -> dict:
        self.weights = load_weights(self.config, self.plan)
        return pinned_manifest(self.plan, self.weights)

    def hint(self, manifest: dict) -> str:
        """How to finish the run on disk with the training step it began with, when its model
        came from a training directory that has moved on since."""
        old = manifest_lib.read(self.plan.out)
        if old is None:
            return ""
        was, now = old.get("model_weights") or {}, manifest["model_weights"]
        if was.get("step") in (None, now["step"]) or not old.get("model_located"):
            return ""
        step_dir = pathlib.Path(old["model_located"]) / str(was["step"])
        if not step_dir.is_dir():
            return ""
        return (
            f"To finish it with the weights it began with, set sample.model_checkpoint={step_dir}. "
        )

    def finished(self, run_id: str) -> bool:
        """Whether every row is merged; raises when a merged file (even of one row) was made
        under another run, since `merge` leaves an existing file alone (sample.restart=true then
        moves the directory aside: the run engine's `_finished`)."""
        merged = [p for p in self.plan.merged.values() if p.exists()]
        for path in merged:
            manifest_lib.check_side_digest(path, run_id)
        if len(merged) < len(self.plan.merged):
            return False
        logging.info(
            "all %d guidance row(s) already merged under %s; nothing to do",
            len(self.plan.rows),
            self.plan.out,
        )
        return True

    def start(self, todo: list[int]) -> None:
        plan = self.plan
        if plan.num_samples % plan.per_batch:
            logging.info(
                "sample.num_samples=%d is not a multiple of the global batch %d (%d per device x "
                "%d devices): the last batch is trimmed",
                plan.num_samples,
                plan.per_batch,
                plan.per_batch // plan.topology.num_devices,
                plan.topology.num_devices,
            )
        # The program is build_sampler's, the one benchmarks/bench_sampling.py times.
        guided = plan.classifier is not None
        w = self.weights
        sampler, _, _ = sampler_lib.build_sampler(
            sampler_lib.config_groups(self.config),
            guided=guided,
            guide=w.guide_group,
            mesh=self.mesh,
        )
        model_vars = sampler.put_params(as_variables(w.model))
        classifier_vars = sampler.put_params(as_variables(w.classifier) if guided else None)
        guide_vars = sampler.put_params(as_variables(w.guide)) if w.guide is not None else None
        self._program = (sampler, model_vars, classifier_vars, guide_vars)
        for row in plan.rows:
            logging.info("row %s: %s", row.folder(), row.describe())

    def compute(self, batch: int) -> dict[str, dict[str, np.ndarray]]:
        """This process's rows of `batch`, one reference-format array dict per guidance row,
        trimmed to the run's examples."""
        plan = self.plan
        sampler, model_vars, classifier_vars, guide_vars = self._program
        batch_rows = sampler.make_batch(plan.batch_rows(batch))
        images = sampler(model_vars, classifier_vars, batch_rows, guide_vars=guide_vars)
        images = sampler_lib.local_rows(images).reshape(
            len(plan.rows), plan.local_examples, *plan.image_shape
        )
        ids = plan.local_ids(batch)
        keep = ids < plan.num_samples
        labels = None if plan.labels is None else plan.labels[ids[keep]]
        return {
            self.parts[row]: sample_files.sample_arrays(images[k][keep], labels)
            for k, row in enumerate(plan.rows)
        }

    def units(self, batch: int) -> int:
        return self.plan.batch_examples(batch) * len(self.plan.rows)

    def total_units(self) -> int:
        return self.plan.num_samples * len(self.plan.rows)

    def postfix(self) -> dict[str, str]:
        return {}

    def merge(self, gather: Callable[[str], dict[str, np.ndarray]], run_id: str) -> None:
        """Each row's samples file (left alone when it exists) and grid."""
        plan = self.plan
        for row in plan.rows:
            path = plan.merged[row]
            if not path.exists():
                arrays = gather(self.parts[row])
                if arrays["arr_0"].shape[0] != plan.num_samples:
                    raise errors.InputError(
                        f"{path.parent}: shards hold {arrays['arr_0'].shape[0]} samples, "
                        f"expected {plan.num_samples}; delete its shards to redraw them"
                    )
                manifest_lib.write_side_digest(path, run_id)
                sample_files.write_sample_file(path, arrays["arr_0"], arrays.get("arr_1"))
            grid_path = path.parent / "grid.png"
            if not grid_path.exists():
                images, labels = sample_files.read_sample_file(path)
                grid_lib.save_sample_grid(grid_path, images, labels, by_class=plan.by_class)
            logging.info("%s: %s", row.describe(), path)

    def result(self) -> dict[guidance_rows.GuidanceRow, pathlib.Path]:
        return dict(self.plan.merged)


def run(
    config,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    on_batch_done: Callable[[int], None] | None = None,
) -> dict[guidance_rows.GuidanceRow, pathlib.Path]:
    """Samples `config.sample.num_samples` images per guidance row.

    Args:
      config: a full gdiff config (configs/common.py); reads `model`, `diffusion`, `classifier`,
        `sample`.
      workdir: default place of the checkpoints and of the output (`<workdir>/samples`).
      mesh: the device mesh (default: all devices of all hosts).
      on_batch_done: called with the batch index after each batch's shards are written (progress
        hooks; tests inject a failure here to simulate a killed run).

    Returns:
      {guidance row: path of its merged samples_<N>x<H>x<W>x3.npz} (a classifier row at every
      step equals its scale: `paths[1.0]`).
    """
    mesh = mesh if mesh is not None else distributed.data_mesh()
    plan = plan_lib.make_plan(config, workdir, plan_lib.Topology.of(mesh))
    return runs.run(SampleJob(config, plan, mesh), on_batch_done=on_batch_done)
