"""`--mode=nll`: bits/dim of a data set under a diffusion model (the reference's image_nll.py).

    python main.py --mode=nll --config <model config> --workdir <dir> \
        [--config.sample.model_checkpoint=<params>] [--config.eval.nll_num_samples=1000]

The first `eval.nll_num_samples` examples of `config.data`'s eval split (`data.eval_split`;
`data.eval_folder` for image folders; a folder or the digits split is cycled when shorter, as the
reference's loader does) go through `GaussianDiffusion.calc_bpd_loop`: every term of the
variational bound, the prior and the eps / x_0 mean squared errors, with `eval.nll_clip_denoised`
and the (possibly respaced) chain of `config.diffusion`. Batches of `eval.nll_batch_size` per
device run as one jitted program over the one-axis data mesh (every device of every host; each
host reads its own part of the data). Example i draws its q_sample noise from
`fold_in(key(config.seed), i)`, so its numbers depend neither on the batch size nor on the number
of devices or hosts. The model is `sample.model_checkpoint` (default: the workdir) with
`sample.ema_rate`, as for sampling.

Outputs, under `eval.nll_output_dir` (default `<workdir>/nll`):

    run.json                          the settings; a resumed run must share them
    shards/shard_<process>_<batch>.npz one per batch and process (a killed run resumes from them)
    vb_terms.npz, mse_terms.npz, xstart_mse_terms.npz
                                      the reference's files: arr_0 float [T], each step's term
                                      (t = T-1 first) averaged over the images
    per_image.npz                     position, id (index in the split; -1 for TFDS), label [N];
                                      total_bpd, prior_bpd [N]; vb, mse, xstart_mse [N, T]
    summary.json                      bits/dim (mean, standard error), its parts, the settings
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from gdiff import checkpointing, distributed, factory, progress, workdir_lock, xla_options
from gdiff.data import pipeline
from gdiff.sampling import sampler as sampler_lib
from gdiff.sampling import shards

# The reference's files: <term>_terms.npz with arr_0 = the term per step, averaged over images.
TERMS = ("vb", "mse", "xstart_mse")
PER_IMAGE = "per_image.npz"
SUMMARY = "summary.json"
# Arrays of a shard and of per_image.npz, in that order.
KEYS = ("position", "id", "label", "total_bpd", "prior_bpd", *TERMS)


@dataclasses.dataclass(frozen=True)
class NllPlan:
    """One run: examples 0..num_samples-1 of the stream, in num_batches global batches.

    Global batch b holds stream positions b * per_batch .. (b + 1) * per_batch - 1; this process
    feeds `local_examples` of them from offset `first_local`. Positions past num_samples (the
    trimmed last batch) are evaluated, since every device runs the same program, but not written.
    """

    num_samples: int
    per_batch: int
    num_batches: int
    local_examples: int
    first_local: int
    process_index: int
    process_count: int
    out: pathlib.Path
    manifest: dict
    model: checkpointing.Location

    def positions(self, batch: int) -> np.ndarray:
        """int32 [local_examples]: this process's stream positions in global batch `batch`."""
        first = batch * self.per_batch + self.first_local
        return np.arange(first, first + self.local_examples, dtype=np.int32)

    def shard(self, batch: int, process: int | None = None) -> pathlib.Path:
        process = self.process_index if process is None else process
        return self.out / "shards" / f"shard_{process}_{batch}.npz"


def _manifest(config, per_batch: int, model_checkpoint: str) -> dict:
    """What a resumed run must share with the shards on disk."""
    data, ev = config.data, config.eval
    return {
        "seed": int(config.seed),
        "num_samples": int(ev.nll_num_samples),
        "examples_per_batch": per_batch,
        "process_count": jax.process_count(),
        "clip_denoised": bool(ev.nll_clip_denoised),
        "diffusion": config.diffusion.to_dict(),
        "data": {
            "source": data.source,
            "name": data.name,
            "split": data.eval_split,
            "eval_folder": os.path.abspath(data.eval_folder) if data.eval_folder else "",
            "image_size": int(data.image_size),
            "class_cond": bool(data.class_cond),
        },
        "model_checkpoint": os.path.abspath(model_checkpoint),
        "ema_rate": str(config.sample.ema_rate),
    }


def make_plan(config, workdir: str, mesh: jax.sharding.Mesh) -> NllPlan:
    """The run, validated before anything is computed or written."""
    ev = config.eval
    num_samples, batch_size = int(ev.nll_num_samples), int(ev.nll_batch_size)
    if num_samples <= 0 or batch_size <= 0:
        raise ValueError(
            f"eval.nll_num_samples ({num_samples}) and eval.nll_batch_size ({batch_size}, per "
            "device) must be positive"
        )
    if int(config.model.small_size) > 0:
        raise ValueError(
            "--mode=nll evaluates image models; model.small_size > 0 makes a super-resolution "
            "model (the reference's image_nll.py does not evaluate those either)"
        )
    pipeline.check_data_config(config)
    per_batch = batch_size * mesh.size
    local = distributed.local_batch_size(per_batch, mesh)
    model_checkpoint = config.sample.model_checkpoint or workdir
    try:
        model = checkpointing.locate(model_checkpoint, "model")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot load the model from {model_checkpoint}: {e}") from e
    return NllPlan(
        num_samples=num_samples,
        per_batch=per_batch,
        num_batches=math.ceil(num_samples / per_batch),
        local_examples=local,
        first_local=jax.process_index() * local,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        out=pathlib.Path(ev.nll_output_dir or os.path.join(workdir, "nll")),
        manifest=_manifest(config, per_batch, model_checkpoint),
        model=model,
    )


def bpd_fn(diffusion, model_apply: Callable, *, image_shape, class_cond: bool, clip_denoised: bool):
    """fn(variables, key_data, batch) -> calc_bpd_loop's dict for one batch.

    `batch` holds image float32 [B, H, W, C] in [-1, 1], label int32 [B] and ids int32 [B], the
    examples' stream positions: example i's q_sample noise at step t is
    `sampler.step_noise(fold_in(key, i), t)`, whatever batch it is in.
    """

    def fn(variables, key_data, batch):
        keys = sampler_lib.example_keys(jax.random.wrap_key_data(key_data), batch["ids"])
        kwargs = {"y": batch["label"]} if class_cond else {}

        def model_fn(x, ts):
            return model_apply(variables, x, ts, **kwargs)

        return diffusion.calc_bpd_loop(
            model_fn,
            batch["image"],
            None,
            clip_denoised=clip_denoised,
            noise_fn=lambda index: sampler_lib.step_noise(keys, index, image_shape),
        )

    return fn


def _build(config, mesh: jax.sharding.Mesh, params: Any):
    """(the jitted batch function, the model variables and the run key on `mesh`)."""
    size = int(config.data.image_size)
    fn = bpd_fn(
        factory.build_diffusion(config),
        factory.build_model(config).apply,
        image_shape=(size, size, 3),
        class_cond=bool(config.model.class_cond),
        clip_denoised=bool(config.eval.nll_clip_denoised),
    )
    rows, rep = distributed.batch_sharding(mesh), distributed.replicated(mesh)
    jitted = jax.jit(
        fn,
        in_shardings=(rep, rep, rows),
        out_shardings=rows,
        compiler_options=xla_options.compiler_options(),
    )
    variables = jax.device_put({"params": params}, rep)
    key = jax.device_put(jax.random.key_data(jax.random.key(int(config.seed))), rep)
    return jitted, variables, key


def _todo(plan: NllPlan) -> list[int]:
    """The batches some process has no shard of yet (agreed by all processes)."""
    done = np.array([plan.shard(b).exists() for b in range(plan.num_batches)], bool)
    done = distributed.all_agree(done)
    return [b for b in range(plan.num_batches) if not done[b]]


def _next_batch(stream: Iterator, batch: int, plan: NllPlan) -> dict[str, np.ndarray]:
    try:
        return next(stream)
    except StopIteration:
        raise ValueError(
            f"the eval split ended after {batch} batches of {plan.per_batch}: it holds fewer than "
            f"eval.nll_num_samples={plan.num_samples} examples; lower eval.nll_num_samples"
        ) from None


def _write_shard(plan: NllPlan, batch: int, local: dict, out: dict) -> np.ndarray:
    """Writes this process's rows of `batch` that lie inside the run; returns their total_bpd."""
    positions = plan.positions(batch)
    keep = positions < plan.num_samples
    ids = local.get("id", np.full(len(positions), -1))
    values = {
        "position": positions,
        "id": np.asarray(ids, np.int64),
        "label": local["label"],
        **{k: sampler_lib.local_rows(out[k]) for k in ("total_bpd", "prior_bpd", *TERMS)},
    }
    shards.atomic_savez(plan.shard(batch), **{k: np.asarray(values[k])[keep] for k in KEYS})
    return values["total_bpd"][keep]


def _load_pinned(config, plan: NllPlan) -> tuple[Any, dict]:
    """(the model's parameters, checked against the config; `plan.manifest` plus their pin:
    step, EMA copy, sha256), so a resumed run never mixes two models' bits/dim."""
    params, pin = checkpointing.load_pinned(plan.model, ema_rate=config.sample.ema_rate or None)
    abstract = factory.abstract_variables(factory.build_model(config))["params"]
    checkpointing.check_params_match(params, abstract, what="model", where=plan.model.path)
    manifest = {
        **plan.manifest,
        "model_weights": {k: pin[k] for k in ("step", "ema_rate", "sha256")},
        "model_located": pin["path"],
    }
    return params, manifest


def evaluate(config, plan: NllPlan, mesh, params: Any, *, on_batch_done=None) -> None:
    """Evaluates every batch that has no shard yet with `params`; each process writes its own
    shards. Every process must call it (each batch is one collective program)."""
    todo = _todo(plan)
    if not todo:
        return
    jitted, variables, key = _build(config, mesh, params)
    stream = pipeline.local_batches(
        config, global_batch_size=plan.per_batch, mesh=mesh, start_step=todo[0], train=False
    )
    bar = _progress_bar(plan, todo)
    seen = []
    for b in range(todo[0], plan.num_batches):
        local = _next_batch(stream, b, plan)
        if b not in todo:
            continue
        ids = plan.positions(b)
        batch = {"image": local["image"], "label": local["label"], "ids": ids}
        out = jitted(variables, key, distributed.global_batch(batch, mesh))
        seen.extend(_write_shard(plan, b, local, out).tolist())
        logging.info("done batch %d: bpd=%.6f (this process)", b, np.mean(seen))
        if bar is not None:
            bar.update(int(np.sum(ids < plan.num_samples)))
            bar.set_postfix(bpd=f"{np.mean(seen):.4f}")
        if on_batch_done is not None:
            on_batch_done(b)
    stream.close()
    if bar is not None:
        bar.close()


def _progress_bar(plan: NllPlan, todo: list[int]) -> tqdm.tqdm | None:
    """Process 0's bar over its images, starting at those already on disk."""
    left = sum(int(np.sum(plan.positions(b) < plan.num_samples)) for b in todo)
    mine = sum(int(np.sum(plan.positions(b) < plan.num_samples)) for b in range(plan.num_batches))
    return progress.bar(mine, initial=mine - left, unit="img", desc="nll")


def merge_shards(plan: NllPlan) -> dict[str, np.ndarray]:
    """Every shard in (batch, process) order, i.e. stream order -> {key: [num_samples, ...]}."""
    parts = []
    for b in range(plan.num_batches):
        for p in range(plan.process_count):
            path = plan.shard(b, p)
            if not path.exists():
                raise FileNotFoundError(f"cannot merge {plan.out}: {path.name} is missing (rerun)")
            with np.load(path) as z:
                parts.append({k: z[k] for k in KEYS})
    merged = {k: np.concatenate([part[k] for part in parts]) for k in KEYS}
    if merged["position"].tolist() != list(range(plan.num_samples)):
        raise ValueError(f"{plan.out}: the shards do not hold positions 0..{plan.num_samples - 1}")
    return merged


def summarize(per_image: dict[str, np.ndarray], manifest: dict) -> dict:
    """The run's numbers: mean bits/dim and its standard error, the prior and vb parts."""
    bpd = np.asarray(per_image["total_bpd"], np.float64)
    n = len(bpd)
    return {
        "bpd": float(bpd.mean()),
        "bpd_stderr": float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "prior_bpd": float(np.mean(per_image["prior_bpd"])),
        "vb_bpd": float(np.mean(np.sum(per_image["vb"], axis=1))),
        "num_samples": n,
        "num_timesteps": int(per_image["vb"].shape[1]),
        **{k: manifest[k] for k in ("clip_denoised", "model_checkpoint", "ema_rate", "data")},
    }


def _write_outputs(plan: NllPlan) -> None:
    """Process 0: per_image.npz, the reference's <term>_terms.npz files and summary.json."""
    per_image = merge_shards(plan)
    shards.atomic_savez(plan.out / PER_IMAGE, **per_image)
    for term in TERMS:
        shards.atomic_savez(plan.out / f"{term}_terms.npz", arr_0=per_image[term].mean(axis=0))
    summary = summarize(per_image, plan.manifest)
    tmp = plan.out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True))
    os.replace(tmp, plan.out / SUMMARY)


def run(config, workdir: str, *, mesh=None, on_batch_done=None) -> dict:
    """Bits/dim of `eval.nll_num_samples` examples of the eval split (see the module docstring).

    Args:
      config: a full gdiff config; reads `data`, `model`, `diffusion`, `eval.nll_*`, `seed`,
        `sample.model_checkpoint` and `sample.ema_rate`.
      workdir: default place of the model checkpoint and of the output (`<workdir>/nll`).
      mesh: the device mesh (default: every device of every host).
      on_batch_done: called with the batch index after its shards are written (tests inject a
        failure here to simulate a killed run).

    Returns:
      summary.json's contents (bpd, bpd_stderr, prior_bpd, vb_bpd, num_samples, ...).
    """
    mesh = mesh if mesh is not None else distributed.data_mesh()
    plan = make_plan(config, workdir, mesh)
    with workdir_lock.hold(plan.out.parent, plan.out.name, what="bits/dim run"):
        params, manifest = _load_pinned(config, plan)
        shards.check_run_manifest(
            plan.out,
            manifest,
            write=distributed.is_main_process(),
            setting="eval.nll_output_dir",
        )
        if not (plan.out / SUMMARY).exists():
            evaluate(config, plan, mesh, params, on_batch_done=on_batch_done)
            distributed.barrier("gdiff_nll_shards_written")
            if distributed.is_main_process():
                _write_outputs(plan)
            distributed.barrier("gdiff_nll_merged")
    summary = json.loads((plan.out / SUMMARY).read_text())
    logging.info(
        "bits/dim %.4f +- %.4f over %d images (%s)",
        summary["bpd"],
        summary["bpd_stderr"],
        summary["num_samples"],
        plan.out,
    )
    return summary
