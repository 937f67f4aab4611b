"""Training-step throughput of the released ADM configurations, against ../shared/bench's rows.

    python benchmarks/bench_training.py --kind diffusion --config 64 --batch 64 \
        --dtype bfloat16 --out benchmarks/logs/train_diffusion_64.json

The production step: the task `--mode=train` (`--mode=train_classifier`) trains,
`gdiff.train.diffusion_trainer.build_task` (`classifier_trainer.build_task`), its `train_step`
jitted as the training loop jits it (gdiff/train/runner.py: the state replicated and donated, the
batch sharded over every device, the compile options of `gdiff.xla_options`). So the number is
that of a training run's step, with nothing of its own:
  - diffusion: timesteps from the uniform sampler, q_sample, the configured loss (the released
    flags learn sigma: the hybrid MSE + VB loss), dropout as the released flags set it;
  - classifier: noised inputs (`q_sample` at uniform timesteps) and cross-entropy, as the
    reference's classifier_train.py;
  - then AdamW (float32 parameters; bf16 compute without loss scaling: bf16 has float32's range,
    where the reference's fp16 needed dynamic loss scaling), the EMA copies (diffusion: the
    reference's `--ema_rate 0.9999`; the classifier keeps none), the non-finite guard and the
    logged metrics.
The config the task is built from is plain data (`training_config`): the networks' and diffusion's
groups of `common.sampling_groups` (the released README flags) and the optim / train groups of the
reference training script's defaults, through the flag table (`gdiff.compat.flags`).
`--remat` sets the diffusion model's `model.remat` policy (none / dots / full; the released
256x256 and 512x512 training configs use full), to measure what recomputation costs and saves.
Random weights stand in for the initialisation. `--warmup` untimed steps (the first compiles),
then `--steps` steps timed back to back, ending in `block_until_ready` (the reference: 3 warm-up,
20 timed). FLOPs per step are XLA's cost analysis of the lowered step (forward + backward +
optimizer) at the global batch.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import common
import jax
import numpy as np

from gdiff.compat import flags
from gdiff.models import unet
from gdiff.train import classifier_trainer, diffusion_trainer, optim, runner
from gdiff.train import state as state_lib

DEFAULT_BATCH = {
    ("diffusion", "64"): 64,
    ("classifier", "64"): 128,
    ("diffusion", "256"): 16,
    ("classifier", "256"): 64,
}
TINY_BATCH = 8
# What each network kind trains with: the trainer that builds the production task, the group of
# its network, and the reference's training script with the flags given it over that script's
# defaults. image_train.py's defaults are improved-diffusion's ImageNet settings (lr 1e-4, no
# weight decay, EMA 0.9999); the guided-diffusion README's classifier training flags add weight
# decay 0.05 (their lr, 3e-4, is classifier_train.py's default).
KINDS = {
    "diffusion": (diffusion_trainer, "model", "image_train", ""),
    "classifier": (classifier_trainer, "classifier", "classifier_train", "--weight_decay 0.05"),
}


class ConfigGroup(dict):
    """Plain config data read the way the trainers read an ml_collections config:
    `config.group.key`, `group["key"]`, `group.to_dict()`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, ConfigGroup) else v for k, v in self.items()}


def training_config(kind: str, groups: dict[str, dict], *, batch: int, num_steps: int):
    """The config the benchmark's task is built from, as plain data (no ml_collections).

    Args:
      kind: "diffusion" | "classifier".
      groups: the configuration's model, classifier, diffusion (and sample) groups
        (`common.sampling_groups`).
      batch: the global batch.
      num_steps: the steps the benchmark takes (the length of the learning-rate schedule).

    Returns:
      A `ConfigGroup` of groups: `groups`, the optim and train groups of the reference's training
      script for `kind` (`KINDS`) through the flag table, with `flags.OPTIM_DEFAULTS` for the
      optimiser keys no flag sets, no periodic sampling or evaluation, and a data group that only
      gives the image size (the benchmark feeds random batches: no augmentation).
    """
    _, _, script, given = KINDS[kind]
    kwargs = {
        **flags.script_defaults(script),
        **flags.parse_flags(given, script=script),
        "batch_size": batch,
    }
    placed = flags.to_config(kwargs, script)
    size = int(groups["model"]["image_size"])
    return ConfigGroup(
        {
            **{name: ConfigGroup(values) for name, values in groups.items()},
            "optim": ConfigGroup({**flags.OPTIM_DEFAULTS, **placed["optim"]}),
            "train": ConfigGroup(
                {
                    **placed["train"],
                    "num_steps": num_steps,
                    **{f"{k}_every": 0 for k in ("sample", "eval", "fid")},
                }
            ),
            "data": ConfigGroup({"image_size": size, "random_crop": False, "random_flip": False}),
        }
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=tuple(KINDS), default="diffusion")
    p.add_argument("--config", choices=tuple(common.RELEASED), default="64")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: reference's)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto")
    p.add_argument(
        "--remat", choices=tuple(unet.REMAT_POLICIES), default="none", help="model.remat"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (the first compiles)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul peak probe size")
    p.add_argument("--tiny", action="store_true", help="a tiny network so a CPU runs it in seconds")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch <= 0:
        p.error(f"--batch must be positive; got {args.batch}")
    if args.remat != "none" and args.kind != "diffusion":
        p.error("--remat is the diffusion model's model.remat; the classifier has no such key")
    if args.warmup < 1 or args.steps < 1:
        p.error(f"--warmup and --steps must be >= 1; got {args.warmup}, {args.steps}")
    return args


def time_steps(step_fn, state, batch, args) -> tuple[float, float, float]:
    """(first call s, mean s per timed step, last loss): the first call (compilation included),
    `args.warmup - 1` more untimed steps, then `args.steps` timed ones. Each step draws its own
    randomness from the state's step counter, as in training."""
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    first_call = time.perf_counter() - start
    for _ in range(1, args.warmup):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / args.steps
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"the training step produced a non-finite loss ({loss})")
    return first_call, seconds, loss


def main(argv=None) -> dict:
    from gdiff import distributed

    args = parse_args(argv)
    config = "tiny" if args.tiny else args.config
    batch = args.batch or (TINY_BATCH if args.tiny else DEFAULT_BATCH[(args.kind, config)])
    mesh = distributed.data_mesh()
    distributed.check_batch_divisible(batch, what="--batch", mesh=mesh)
    rep, rows = distributed.replicated(mesh), distributed.batch_sharding(mesh)
    attention_impl = common.resolve_attention(args.attention, args.dtype)
    # Read first: a missing reference file fails before anything is built.
    ref = common.reference_training(args.kind, config)
    overrides = common.config_overrides(dtype=args.dtype, attention_impl=attention_impl)
    groups = common.sampling_groups(config, {**overrides, "model.remat": args.remat})
    cfg = training_config(args.kind, groups, batch=batch, num_steps=args.warmup + args.steps)
    trainer, net_group, _, _ = KINDS[args.kind]
    # The task --mode=train (--mode=train_classifier) builds from this config.
    task = trainer.build_task(cfg, mesh)
    abstract = jax.eval_shape(task.init_params, jax.random.key(0))
    n_params = int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(abstract)))
    size = int(cfg.data.image_size)

    # The training loop's compiled step (gdiff/train/runner.py compile_step).
    step_fn = runner.compile_step(task, mesh)
    tx = optim.create_optimizer(cfg.optim)

    def init_state(params):
        return state_lib.create(
            params,
            tx,
            rng=jax.random.key(1),
            ema_rates=task.ema_rates,
            sampler_state=task.sampler_state,
        )

    params = common.random_variables(abstract, jax.random.key(0), rep)
    state = jax.jit(init_state, out_shardings=rep)(params)
    del params  # the state holds its own copy
    rng = np.random.default_rng(0)
    num_classes = int(cfg[net_group].num_classes)
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, batch).astype(np.int32)
    train_batch = jax.device_put({"image": images, "label": labels}, rows)

    flops_per_step = common.cost_flops(step_fn.lower(state, train_batch))
    first_call, seconds, loss = time_steps(step_fn, state, train_batch, args)

    achieved = flops_per_step / seconds / 1e12
    n = args.matmul_n or common.default_matmul_size(args.tiny)
    peak = common.matmul_peak_tflops(n)
    record = {
        "benchmark": "training",
        "kind": args.kind,
        "config": config,
        "batch": batch,
        "dtype": args.dtype,
        "attention_impl": attention_impl,
        "remat": args.remat,
        "train_step": f"{trainer.__name__}.build_task",
        "optimizer": f"adamw lr={cfg.optim.lr} weight_decay={cfg.optim.weight_decay}",
        "ema_rates": task.ema_rates,
        "params": n_params,
        "params_m": round(n_params / 1e6, 2),
        "first_call_s": round(first_call, 3),
        "ms_per_step": round(seconds * 1e3, 3),
        "img_per_s": round(batch / seconds, 3),
        "loss": loss,
        "flops_source": "XLA cost analysis of the lowered step (fwd + bwd + AdamW, global batch)",
        "flops_per_step": flops_per_step,
        "flops_per_img": flops_per_step / batch,
        "achieved_tflops": round(achieved, 4),
        "peak_mem_gib": common.gib(common.peak_memory_bytes()),
        "matmul_n": n,
        "matmul_peak_tflops": round(peak, 4),
        "fraction_of_matmul_peak": round(achieved / peak, 4),
        "reference_h100": ref,
    }
    if ref is not None and jax.default_backend() == "gpu" and batch == ref["batch"]:
        record["speedup_vs_reference_h100"] = round(record["img_per_s"] / ref["img_per_s"], 3)
    record["env"] = common.environment()
    common.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
