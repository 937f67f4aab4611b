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

import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from gdiff import checkpointing, distributed, factory, progress
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
    shards.check_run_manifest(plan.out, plan.manifest, write=distributed.is_main_process())
    if all(p.exists() for p in plan.merged.values()):
        logging.info(
            "all %d scale(s) already merged under %s; nothing to do", len(plan.scales), plan.out
        )
        return dict(plan.merged)
    draw(config, plan, mesh, on_batch_done=on_batch_done)
    return merge(plan)


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
    *,
    on_batch_done: Callable[[int], None] | None = None,
) -> None:
    """Draws every batch of `plan` that has no shards yet; each process writes its own shards.

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
    sampler, model_vars, classifier_vars = _build_sampler(config, plan, mesh)
    n_scales = len(plan.scales)
    progress = _progress_bar(plan, todo)
    start, drawn = time.perf_counter(), 0
    for b in todo:
        images = sampler(model_vars, classifier_vars, sampler.make_batch(plan.batch_rows(b)))
        _write_shards(plan, b, sampler_lib.local_rows(images))
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


def _write_shards(plan: plan_lib.SamplingPlan, batch: int, images: np.ndarray) -> None:
    """Writes this process's rows of `batch` (uint8 [n_scales * local_examples, H, W, 3], in
    `plan.batch_rows` order) as one shard per scale, trimmed to the run's examples."""
    images = images.reshape(len(plan.scales), plan.local_examples, *plan.image_shape)
    ids = plan.local_ids(batch)
    keep = ids < plan.num_samples
    labels = None if plan.labels is None else plan.labels[ids[keep]]
    for k, scale in enumerate(plan.scales):
        path = shards.shard_path(plan.out, scale, plan.topology.process_index, batch)
        if not path.exists():  # a finished shard is never rewritten
            shards.write_sample_file(path, images[k][keep], labels)


def merge(plan: plan_lib.SamplingPlan) -> dict[float, pathlib.Path]:
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
            )
            grid_path = shards.scale_dir(plan.out, scale) / "grid.png"
            if not grid_path.exists():
                images, labels = shards.read_sample_file(path)
                grid_lib.save_sample_grid(grid_path, images, labels, by_class=plan.by_class)
            logging.info("scale %s: %s", labels_lib.format_scale(scale), path)
    distributed.barrier("gdiff_sampling_merged")
    return dict(plan.merged)


def _build_sampler(config, plan: plan_lib.SamplingPlan, mesh: jax.sharding.Mesh):
    """(sampler, model variables, classifier variables or None), placed on `mesh`."""
    s = config.sample
    model = factory.build_model(config)
    diffusion = factory.build_diffusion(config, timestep_respacing=s.timestep_respacing or None)
    model_vars = _as_variables(checkpointing.load_params(plan.model, ema_rate=s.ema_rate or None))
    guidance, classifier_vars = None, None
    if plan.classifier is not None:
        classifier = factory.build_classifier(config)
        classifier_vars = _as_variables(checkpointing.load_params(plan.classifier))
        guidance = sampler_lib.classifier_guidance(classifier)
    options = sampler_lib.SamplerOptions(
        image_shape=plan.image_shape,
        use_ddim=bool(s.use_ddim),
        eta=float(s.eta),
        clip_denoised=bool(s.clip_denoised),
        class_cond=bool(config.model.class_cond),
    )
    sampler = sampler_lib.Sampler(
        diffusion, model.apply, options, guidance=guidance, mesh=mesh, seed=int(s.seed)
    )
    return sampler, sampler.put_params(model_vars), sampler.put_params(classifier_vars)
