"""`--mode=sample`: draw a run of samples, sharded over every device, resumable, per guidance scale.

    python main.py --mode=sample --config configs/<model>.py --workdir <dir> \
        --config.sample.classifier_checkpoint=<dir> --config.sample.classifier_scale=1.0

The model (and, when any guidance scale is non-zero, the classifier) is loaded with
`gdiff.checkpointing.load_params`, from `sample.model_checkpoint` / `sample.classifier_checkpoint`
or the workdir. Every scale of `sample.classifier_scale` is sampled in the same compiled program
over the same noise and labels (see gdiff/sampling/sampler.py), batch by batch; each batch leaves
one shard per scale and process on disk, so an interrupted run continues where it stopped. At the
end process 0 merges each scale into the reference's `samples_<N>x<H>x<W>x3.npz` and a grid PNG.

Super-resolution configs (`model.small_size` > 0) read `sample.base_samples` (the reference's
super_res_sample.py input: arr_0 uint8 [N, small, small, 3], arr_1 labels) as the low-resolution
input; example i is conditioned on base sample i (cycled when the base file is shorter).

`run` = `plan.make_plan` (pure: validate, label, locate checkpoints) -> `check_run_manifest` ->
`draw` (the batch loop; every process) -> `merge` (process 0).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from gdiff import checkpointing, distributed, factory, progress, workdir_lock
from gdiff.sampling import grid as grid_lib
from gdiff.sampling import labels as labels_lib
from gdiff.sampling import plan as plan_lib
from gdiff.sampling import sampler as sampler_lib
from gdiff.sampling import shards

# The sampling entry point's public names (tests, gdiff/pipeline/digits.py); they live with the
# plan they belong to.
load_base_samples = plan_lib.load_base_samples
output_dir = plan_lib.output_dir


def _as_variables(params: Any) -> dict:
    """load_params returns the inner params tree; tolerate a full {"params": ...} dict too."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return dict(params)
    return {"params": params}


def topology(mesh: jax.sharding.Mesh) -> plan_lib.Topology:
    """The plan's view of `mesh` from this process."""
    return plan_lib.Topology(
        num_devices=mesh.size,
        # This process's share of a one-example-per-device batch: its devices in the mesh.
        local_devices=distributed.local_batch_size(mesh.size, mesh),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def run(
    config,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    on_batch_done: Callable[[int], None] | None = None,
) -> dict[float, pathlib.Path]:
    """Samples `config.sample.num_samples` images per guidance scale.

    Args:
      config: a full gdiff config (configs/common.py); reads `model`, `diffusion`, `classifier`,
        `sample`.
      workdir: default place of the checkpoints and of the output (`<workdir>/samples`).
      mesh: the device mesh (default: all devices of all hosts).
      on_batch_done: called with the batch index after each batch's shards are written (progress
        hooks; tests inject a failure here to simulate a killed run).

    Returns:
      {scale: path of the merged samples_<N>x<H>x<W>x3.npz}.
    """
    mesh = mesh if mesh is not None else distributed.data_mesh()
    plan = plan_lib.make_plan(config, workdir, topology(mesh))
    # One sampler per output directory: a second one would draw every shard again.
    with workdir_lock.hold(plan.out.parent, plan.out.name, what="sampling run"):
        weights = load_weights(config, plan)
        manifest = pinned_manifest(plan, weights)
        run_id = shards.run_digest(manifest)
        shards.check_run_manifest(
            plan.out,
            manifest,
            write=distributed.is_main_process(),
            restart_setting="sample.restart",
            restart=bool(config.sample.restart),
            hint=_finish_hint(plan.out, manifest),
        )
        if all(p.exists() for p in plan.merged.values()):
            for path in plan.merged.values():
                shards.check_merged(path, run_id)
            logging.info(
                "all %d scale(s) already merged under %s; nothing to do",
                len(plan.scales),
                plan.out,
            )
            return dict(plan.merged)
        draw(config, plan, mesh, weights, run_id, on_batch_done=on_batch_done)
        return merge(plan, run_id)


@dataclasses.dataclass(frozen=True)
class Weights:
    """The parameters a run samples with (host or device pytrees) and their pins
    (`checkpointing.load_pinned`: path, format, step, EMA copy, content fingerprint)."""

    model: Any
    model_pin: dict
    classifier: Any = None
    classifier_pin: dict | None = None


def load_weights(config, plan: plan_lib.SamplingPlan) -> Weights:
    """Loads the plan's model (and classifier) and checks them against the configured networks.

    Raises:
      errors.ConfigMismatchError: a config describes another network than its checkpoint holds
        (naming the first differing parameter).
    """
    ema_rate = config.sample.ema_rate or None
    model, model_pin = checkpointing.load_pinned(plan.model, ema_rate=ema_rate)
    network = factory.unet_from_group(config.model)
    checkpointing.check_params_match(
        model, factory.abstract_variables(network)["params"], what="model", where=plan.model.path
    )
    if plan.classifier is None:
        return Weights(model, model_pin)
    classifier, classifier_pin = checkpointing.load_pinned(plan.classifier)
    network = factory.classifier_from_group(config.classifier, int(config.model.image_size))
    checkpointing.check_params_match(
        classifier,
        factory.abstract_variables(network)["params"],
        what="classifier",
        where=plan.classifier.path,
    )
    return Weights(model, model_pin, classifier, classifier_pin)


def pinned_manifest(plan: plan_lib.SamplingPlan, weights: Weights) -> dict:
    """The plan's manifest plus what exactly is sampled: each network's step, EMA copy and
    content fingerprint (compared), and where it was found (recorded only)."""

    def pin(p: dict | None) -> dict | None:
        return None if p is None else {k: p[k] for k in ("step", "ema_rate", "sha256")}

    return {
        **plan.manifest,
        "model_weights": pin(weights.model_pin),
        "model_located": weights.model_pin["path"],
        "classifier_weights": pin(weights.classifier_pin),
        "classifier_located": weights.classifier_pin["path"] if weights.classifier_pin else "",
    }


def _finish_hint(out: pathlib.Path, manifest: dict) -> str:
    """How to finish the run on disk with the training step it began with, when its model
    came from a training directory that has moved on since."""
    path = out / shards.RUN_FILE
    if not path.exists():
        return ""
    old = json.loads(path.read_text())
    was, now = old.get("model_weights") or {}, manifest["model_weights"]
    if was.get("step") is None or was.get("step") == now["step"] or not old.get("model_located"):
        return ""
    step_dir = pathlib.Path(old["model_located"]) / str(was["step"])
    if not step_dir.is_dir():
        return ""
    return f"To finish it with the weights it began with, set sample.model_checkpoint={step_dir}. "


def _todo(plan: plan_lib.SamplingPlan) -> list[int]:
    """The batches still to draw: those some process lacks a shard of (agreed by all)."""
    index = plan.topology.process_index

    def batch_done(b: int) -> bool:
        return all(shards.shard_path(plan.out, sc, index, b).exists() for sc in plan.scales)

    done = distributed.all_agree(np.array([batch_done(b) for b in range(plan.num_batches)], bool))
    return [b for b in range(plan.num_batches) if not done[b]]


def draw(
    config,
    plan: plan_lib.SamplingPlan,
    mesh: jax.sharding.Mesh,
    weights: Weights,
    run_id: str,
    *,
    on_batch_done: Callable[[int], None] | None = None,
) -> None:
    """Draws every batch of `plan` that has no shards yet; each process writes its own shards,
    tagged with `run_id` (shards.run_digest of the run's manifest).

    Every process must call it: the batches left to draw are agreed across hosts, and each batch
    is one collective program.
    """
    todo = _todo(plan)
    if not todo:
        return
    if plan.num_samples % plan.per_batch:
        logging.info(
            "sample.num_samples=%d is not a multiple of the global batch %d (%d per device x %d "
            "devices): the last batch is trimmed",
            plan.num_samples,
            plan.per_batch,
            plan.per_batch // plan.topology.num_devices,
            plan.topology.num_devices,
        )
    sampler, model_vars, classifier_vars = _build_sampler(config, plan, mesh, weights)
    n_scales = len(plan.scales)
    progress = _progress_bar(plan, todo)
    start, drawn = time.perf_counter(), 0
    for b in todo:
        images = sampler(model_vars, classifier_vars, sampler.make_batch(plan.batch_rows(b)))
        _write_shards(plan, b, sampler_lib.local_rows(images), run_id)
        drawn += plan.batch_examples(b) * n_scales
        if progress is not None:
            progress.update(plan.batch_examples(b) * n_scales)
        if on_batch_done is not None:
            on_batch_done(b)
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - start
    logging.info(
        "sampled %d images in %.1fs (%.2f images/s, %d device(s))",
        drawn,
        elapsed,
        drawn / elapsed,
        plan.topology.num_devices,
    )


def _progress_bar(plan: plan_lib.SamplingPlan, todo: list[int]) -> tqdm.tqdm | None:
    """Process 0's bar over every image of every scale, starting at those already on disk."""
    left = sum(plan.batch_examples(b) for b in todo)
    return progress.bar(
        plan.num_samples * len(plan.scales),
        initial=(plan.num_samples - left) * len(plan.scales),
        unit="img",
        desc="sampling",
    )


def _write_shards(plan: plan_lib.SamplingPlan, batch: int, images: np.ndarray, run_id: str) -> None:
    """Writes this process's rows of `batch` (uint8 [n_scales * local_examples, H, W, 3], in
    `plan.batch_rows` order) as one shard per scale, trimmed to the run's examples."""
    images = images.reshape(len(plan.scales), plan.local_examples, *plan.image_shape)
    ids = plan.local_ids(batch)
    keep = ids < plan.num_samples
    labels = None if plan.labels is None else plan.labels[ids[keep]]
    for k, scale in enumerate(plan.scales):
        path = shards.shard_path(plan.out, scale, plan.topology.process_index, batch)
        if not path.exists():  # a finished shard is never rewritten
            shards.write_sample_file(path, images[k][keep], labels, run=run_id)


def merge(plan: plan_lib.SamplingPlan, run_id: str) -> dict[float, pathlib.Path]:
    """Process 0 merges each scale's shards into its samples file and grid; every process waits
    for the shards before and for the merge after."""
    distributed.barrier("gdiff_sampling_shards_written")
    if distributed.is_main_process():
        for scale in plan.scales:
            path = shards.merge_shards(
                shards.scale_dir(plan.out, scale),
                plan.num_samples,
                plan.merged[scale],
                num_batches=plan.num_batches,
                num_processes=plan.topology.process_count,
                run=run_id,
            )
            grid_path = shards.scale_dir(plan.out, scale) / "grid.png"
            if not grid_path.exists():
                images, labels = shards.read_sample_file(path)
                grid_lib.save_sample_grid(grid_path, images, labels, by_class=plan.by_class)
            logging.info("scale %s: %s", labels_lib.format_scale(scale), path)
    distributed.barrier("gdiff_sampling_merged")
    return dict(plan.merged)


def _build_sampler(config, plan: plan_lib.SamplingPlan, mesh: jax.sharding.Mesh, weights: Weights):
    """(sampler, model variables, classifier variables or None), placed on `mesh`.

    The program is `sampler_lib.build_sampler`'s, the one benchmarks/bench_sampling.py times.
    """
    groups = {name: config[name] for name in ("model", "diffusion", "classifier", "sample")}
    guided = plan.classifier is not None
    sampler, _, _ = sampler_lib.build_sampler(groups, guided=guided, mesh=mesh)
    model_vars = _as_variables(weights.model)
    classifier_vars = _as_variables(weights.classifier) if guided else None
    return sampler, sampler.put_params(model_vars), sampler.put_params(classifier_vars)
