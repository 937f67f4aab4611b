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
    shards/shard_<process>_<batch>.npz one per batch and process (a killed run resumes from them;
                                     shard_<p>of<N>_<batch>.npz when N > 1 processes drew it)
    vb_terms.npz, mse_terms.npz, xstart_mse_terms.npz
                                      the reference's files: arr_0 float [T], each step's term
                                      (t = T-1 first) averaged over the images
    per_image.npz                     position, id (index in the split; -1 for TFDS), label [N];
                                      total_bpd, prior_bpd [N]; vb, mse, xstart_mse [N, T]
    summary.json                      bits/dim (mean, standard error), its parts, the settings

What is this job's own: the plan of stream positions, `bpd_fn` (one jitted calc_bpd_loop per
batch), the data stream and the output files. Locking, resuming, the manifest, shards and progress
are the run engine's (gdiff/engine/runs.py), as for sampling.
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
from absl import logging

from gdiff import atomic, distributed, errors, factory, xla_options
from gdiff.checkpoints import fingerprints, locate, settings
from gdiff.data import pipeline
from gdiff.engine import runs
from gdiff.sampling import sampler as sampler_lib

# The reference's files: <term>_terms.npz with arr_0 = the term per step, averaged over images.
TERMS = ("vb", "mse", "xstart_mse")
PER_IMAGE = "per_image.npz"
SUMMARY = "summary.json"
SHARDS = "shards"  # the engine's one part: <out>/shards/shard_*.npz (engine/runs.py names)
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
    model: locate.Location

    def positions(self, batch: int) -> np.ndarray:
        """int32 [local_examples]: this process's stream positions in global batch `batch`."""
        first = batch * self.per_batch + self.first_local
        return np.arange(first, first + self.local_examples, dtype=np.int32)

    def kept(self, batch: int) -> int:
        """How many of this process's examples in `batch` lie inside the run."""
        return int(np.sum(self.positions(batch) < self.num_samples))


def _manifest(config, per_batch: int, model_checkpoint: str) -> dict:
    """What a resumed run must share with the shards on disk."""
    data, ev = config.data, config.eval
    return {
        "seed": int(config.seed),
        "num_samples": int(ev.nll_num_samples),
        "examples_per_batch": per_batch,
        "process_count": jax.process_count(),
        "clip_denoised": bool(ev.nll_clip_denoised),
        # The network as it computes (dtype, attention): a resumed run in another precision is
        # another run, not shards to mix.
        "model": factory.recorded_model_group(config.model),  # runs of earlier versions resume
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
        raise errors.ConfigError(
            f"eval.nll_num_samples ({num_samples}) and eval.nll_batch_size ({batch_size}, per "
            "device) must be positive"
        )
    if int(config.model.small_size) > 0:
        raise errors.ConfigError(
            "--mode=nll evaluates image models; model.small_size > 0 makes a super-resolution "
            "model (the reference's image_nll.py does not evaluate those either)"
        )
    pipeline.check_data_config(config)
    # Checked before run.json pins it (the corrected rerun would otherwise be refused).
    factory.check_respacing(
        int(config.diffusion.steps),
        str(config.diffusion.timestep_respacing or ""),
        "diffusion.timestep_respacing",
    )
    per_batch = batch_size * mesh.size
    local = distributed.local_batch_size(per_batch, mesh)
    model_checkpoint = config.sample.model_checkpoint or workdir
    try:
        model = locate.locate(model_checkpoint, "model")
    except FileNotFoundError as e:
        raise errors.MissingInputError(f"cannot load the model from {model_checkpoint}: {e}") from e
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


def _next_batch(stream: Iterator, batch: int, plan: NllPlan) -> dict[str, np.ndarray]:
    try:
        return next(stream)
    except StopIteration:
        raise errors.ConfigError(
            f"the eval split ended after {batch} batches of {plan.per_batch}: it holds fewer than "
            f"eval.nll_num_samples={plan.num_samples} examples; lower eval.nll_num_samples"
        ) from None


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


class NllJob:
    """A bits/dim run as the engine's job: one part, every example's terms."""

    what = "bits/dim run"
    unit = "img"
    setting = "eval.nll_output_dir"
    restart_setting = None
    restart = False

    def __init__(self, config, plan: NllPlan, mesh: jax.sharding.Mesh):
        self.config, self.plan, self.mesh = config, plan, mesh
        self.layout = runs.Layout(
            out=plan.out,
            parts=(SHARDS,),
            num_batches=plan.num_batches,
            process_index=plan.process_index,
            process_count=plan.process_count,
        )
        self.params = None
        self.manifest = plan.manifest
        self._program = None
        self._stream: Iterator | None = None
        self._next = 0  # the batch the stream yields next
        self._seen: list[float] = []  # this process's total_bpd so far (the running mean)

    def pin(self) -> dict:
        """Loads the model, checked against the config; the plan's manifest plus its pin (step,
        EMA copy, sha256), so a resumed run never mixes two models' bits/dim."""
        plan, config = self.plan, self.config
        size = int(config.model.image_size)
        settings.check_trained_settings(plan.model, "model", config.model, config.diffusion, size)
        params, pin = locate.load_pinned(plan.model, ema_rate=config.sample.ema_rate or None)
        abstract = factory.abstract_variables(factory.build_model(self.config))["params"]
        fingerprints.check_params_match(params, abstract, what="model", where=plan.model.path)
        self.params = params
        self.manifest = {
            **plan.manifest,
            "model_weights": {k: pin[k] for k in ("step", "ema_rate", "sha256")},
            "model_located": pin["path"],
        }
        return self.manifest

    def hint(self, manifest: dict) -> str:
        return ""

    def finished(self, run_id: str) -> bool:
        return (self.plan.out / SUMMARY).exists()

    def start(self, todo: list[int]) -> None:
        self._program = _build(self.config, self.mesh, self.params)
        # Each host reads its own part of the stream; a resumed run starts at its first gap.
        self._stream = pipeline.local_batches(
            self.config,
            global_batch_size=self.plan.per_batch,
            mesh=self.mesh,
            start_step=todo[0],
            train=False,
        )
        self._next = todo[0]

    def _batch(self, batch: int) -> dict[str, np.ndarray]:
        """The stream's batch `batch` (batches between are read and dropped: already on disk)."""
        while True:
            local = _next_batch(self._stream, self._next, self.plan)
            self._next += 1
            if self._next > batch:
                return local

    def compute(self, batch: int) -> dict[str, dict[str, np.ndarray]]:
        """This process's rows of `batch` that lie inside the run."""
        plan = self.plan
        jitted, variables, key = self._program
        local = self._batch(batch)
        positions = plan.positions(batch)
        inputs = {"image": local["image"], "label": local["label"], "ids": positions}
        out = jitted(variables, key, distributed.global_batch(inputs, self.mesh))
        keep = positions < plan.num_samples
        values = {
            "position": positions,
            "id": np.asarray(local.get("id", np.full(len(positions), -1)), np.int64),
            "label": local["label"],
            **{k: sampler_lib.local_rows(out[k]) for k in ("total_bpd", "prior_bpd", *TERMS)},
        }
        rows = {k: np.asarray(values[k])[keep] for k in KEYS}
        self._seen.extend(rows["total_bpd"].tolist())
        logging.info("done batch %d: bpd=%.6f (this process)", batch, np.mean(self._seen))
        if batch == plan.num_batches - 1:
            self._stream.close()
        return {SHARDS: rows}

    def units(self, batch: int) -> int:
        return self.plan.kept(batch)

    def total_units(self) -> int:
        return sum(self.plan.kept(b) for b in range(self.plan.num_batches))

    def postfix(self) -> dict[str, str]:
        return {"bpd": f"{np.mean(self._seen):.4f}"} if self._seen else {}

    def merge(self, gather: Callable[[str], dict[str, np.ndarray]], run_id: str) -> None:
        """per_image.npz, the reference's <term>_terms.npz files and summary.json."""
        out = self.plan.out
        arrays = gather(SHARDS)
        per_image = {k: arrays[k] for k in KEYS}
        if per_image["position"].tolist() != list(range(self.plan.num_samples)):
            raise errors.InputError(
                f"{out / SHARDS}: the shards do not hold positions 0..{self.plan.num_samples - 1}; "
                f"delete {out / SHARDS} to compute them afresh"
            )
        atomic.savez(out / PER_IMAGE, **per_image)
        for term in TERMS:
            atomic.savez(out / f"{term}_terms.npz", arr_0=per_image[term].mean(axis=0))
        summary = summarize(per_image, self.manifest)
        atomic.write_text(out / SUMMARY, json.dumps(summary, indent=1, sort_keys=True))

    def result(self) -> dict:
        summary = json.loads((self.plan.out / SUMMARY).read_text())
        logging.info(
            "bits/dim %.4f +- %.4f over %d images (%s)",
            summary["bpd"],
            summary["bpd_stderr"],
            summary["num_samples"],
            self.plan.out,
        )
        return summary


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
    return runs.run(NllJob(config, plan, mesh), on_batch_done=on_batch_done)
