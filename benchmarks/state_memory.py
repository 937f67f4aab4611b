"""Per-device training memory of the released ADMs: state replicated vs FSDP, and a whole step.

    python benchmarks/state_memory.py --out benchmarks/logs/state_memory.json
    python benchmarks/state_memory.py --compile 64,128 --out benchmarks/logs/state_memory_c.json

Two parts, for the diffusion models of configs/released/ (their own config files: network,
EMA rate 0.9999, AdamW, `train.fsdp_min_elements`, the paper's global batch of Table 11/13):

1. State (parameters + EMA copy + AdamW moments) per device at N devices for `--devices`, under
   `train.state_sharding=replicated` and `fsdp`: pure arithmetic from `jax.eval_shape` of the
   run's own initialiser (`gdiff.train.runner.state_initializer`) and the FSDP rule
   (`gdiff.train.sharding.planned_bytes_per_device`); nothing is allocated. tests/test_fsdp.py
   checks that this arithmetic is what the arrays' addressable shards hold.
2. `--compile`: the production training step (`runner.compile_step` with the mode's state
   shardings, donated) lowered on abstract arguments over a mesh of `--compile_devices` fake CPU
   devices at the paper's global batch (so per device: global / N) and compiled by XLA:CPU; its
   `memory_analysis()` per device: arguments (state and batch shards), outputs, the donated part
   of them (aliased, counted once), and temporaries (activations, gradients, parameters gathered
   under FSDP, optimiser scratch). Peak per device = arguments + outputs - aliased + temporaries.
   XLA:CPU's buffer assignment, not a GPU's or TPU's: on CPU, attention runs through XLA (no
   cuDNN kernel) and bfloat16 convolutions may be computed through float32 copies, so the
   figures are an upper bound for an accelerator with fused attention.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from typing import Any

# Set before jax is imported, unless XLA_FLAGS already sets them: fake CPU devices for the
# meshes; XLA:CPU's memory-minimising scheduler, as GPUs schedule (its default schedules for
# concurrency and undoes rematerialisation: tests/test_remat.py); and no LLVM optimisation,
# which does not change the buffer assignment and halves the compile time.
XLA_DEFAULTS = {
    "--xla_force_host_platform_device_count": "64",
    "--xla_cpu_enable_concurrency_optimized_scheduler": "false",
    "--xla_backend_optimization_level": "0",
}
for _flag, _value in XLA_DEFAULTS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()

import common  # noqa: E402  (puts the repository on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gdiff import distributed  # noqa: E402
from gdiff.train import diffusion_trainer, runner, sharding  # noqa: E402

# The released diffusion models: short name -> configs/released/<module>.
MODELS = {
    "64": "imagenet64",
    "128": "imagenet128",
    "256": "imagenet256",
    "256u": "imagenet256_uncond",
    "512": "imagenet512",
    "64-256": "upsampler_64_256",
    "128-512": "upsampler_128_512",
}
MODES = sharding.MODES


def load_config(name: str):
    """configs/released/<MODELS[name]>.py's config, unchanged."""
    return importlib.import_module(f"configs.released.{MODELS[name]}").get_config()


def build(name: str, mesh) -> tuple[Any, Any, Any]:
    """(config, task, abstract state) of a released model on `mesh` (nothing allocated)."""
    config = load_config(name)
    task = diffusion_trainer.build_task(config, mesh)
    return config, task, jax.eval_shape(runner.state_initializer(config, task))


def state_rows(name: str, device_counts: list[int]) -> dict[str, Any]:
    """Parameter count and state bytes per device (params + EMA + AdamW) for each N and mode."""
    config, task, shapes = build(name, distributed.data_mesh(jax.devices()[:1]))
    fields = [getattr(shapes, f) for f in sharding.SHARDED_FIELDS]
    min_elements = int(config.train.fsdp_min_elements)
    per_device = {
        mode: {
            n: sharding.planned_bytes_per_device(fields, n, mode, min_elements)
            for n in device_counts
        }
        for mode in MODES
    }
    whole = [x for x in jax.tree.leaves(shapes.params) if x.ndim]
    kept = [x for x in whole if sharding.fsdp_axis(x.shape, 8, min_elements) is None]
    return {
        "config": f"configs/released/{MODELS[name]}.py",
        "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes.params))),
        "ema_rates": list(task.ema_rates),
        "global_batch": int(config.train.batch_size),
        "remat": str(config.model.remat),
        "dtype": str(config.model.dtype),
        "fsdp_min_elements": min_elements,
        "params_replicated_under_fsdp_at_8": int(sum(math.prod(x.shape) for x in kept)),
        "state_bytes_per_device": per_device,
    }


def step_memory(name: str, mode: str, num_devices: int) -> dict[str, Any]:
    """The compiled training step's memory per device on `num_devices` fake CPU devices."""
    mesh = distributed.data_mesh(jax.devices()[:num_devices])
    config, task, shapes = build(name, mesh)
    shardings = sharding.state_shardings(shapes, mesh, mode, int(config.train.fsdp_min_elements))
    state = sharding.with_shardings(shapes, shardings)
    rows, size, batch = distributed.batch_sharding(mesh), config.data.image_size, task.batch_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=rows)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    start = time.perf_counter()
    lowered = runner.compile_step(task, mesh, shardings).lower(
        state, {"image": images, "label": labels}
    )
    stats = lowered.compile().memory_analysis()
    seconds = time.perf_counter() - start
    out = {
        "mode": mode,
        "devices": num_devices,
        "per_device_batch": batch // num_devices,
        "compile_s": round(seconds, 1),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "code_bytes": int(stats.generated_code_size_in_bytes),
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="of " + ", ".join(MODELS))
    p.add_argument("--devices", default="1,8,16,32,64,256", help="N for the state arithmetic")
    p.add_argument("--compile", default="", help="models whose step is compiled (default none)")
    p.add_argument("--compile_devices", type=int, default=8, help="devices of the mesh")
    p.add_argument("--modes", default=",".join(MODES), help="modes compiled")
    p.add_argument("--out", default=None, help="JSON record path")
    args = p.parse_args(argv)
    for what in ("models", "compile"):
        names = [m for m in getattr(args, what).split(",") if m]
        unknown = sorted(set(names) - set(MODELS))
        if unknown:
            p.error(f"--{what}: unknown {unknown}; known: {', '.join(MODELS)}")
        setattr(args, what, names)
    args.devices = [int(n) for n in args.devices.split(",")]
    args.modes = [sharding.check_mode(m) for m in args.modes.split(",")]
    if args.compile_devices > jax.device_count():
        p.error(f"--compile_devices={args.compile_devices} > {jax.device_count()} devices")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    record = {"environment": common.environment(), "models": {}}
    for name in args.models:
        record["models"][name] = state_rows(name, args.devices)
        print(f"{name}: {record['models'][name]['params']:,} parameters", file=sys.stderr)
    for name in args.compile:
        steps = record["models"].setdefault(name, {}).setdefault("step", [])
        for mode in args.modes:
            steps.append(step_memory(name, mode, args.compile_devices))
            print(f"{name} {mode}: {steps[-1]}", file=sys.stderr, flush=True)
    common.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
