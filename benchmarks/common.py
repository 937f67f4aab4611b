"""Shared machinery of the benchmark scripts: networks, the reference's figures, timing, memory,
FLOP counts, JSON records.

The scripts compare gdiff with the PyTorch reference measured on one H100 (the JSON files of
`../shared/bench`, or of $GDIFF_BENCH_REFERENCE_DIR, read at run time; summarised in
benchmarks/RESULTS.md), so every number here is taken the way the reference's were: one warm-up
run of the whole program (compile + run), then timed runs that end in `block_until_ready`. FLOPs
come from XLA's own cost analysis of the program, never from a hand count, so the "achieved
TFLOP/s" column means the same thing on every backend.

Imports stay free of ml_collections, clu and TensorFlow: a GPU machine only needs jax, flax, optax
and numpy (and, for bench_training.py's production trainers, pillow and scikit-learn) to run
`benchmarks/run_all_gpu.sh`.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # The scripts run as `python benchmarks/<script>.py` from anywhere; gdiff lives at the root.
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gdiff import factory  # noqa: E402
from gdiff.compat import flags, released  # noqa: E402

GIB = 1024**3

# Benchmark configuration -> the released checkpoint (gdiff.compat.released) whose README flags
# build its diffusion model and, guided, the classifier released with it: the networks the
# reference was measured with (64x64_diffusion.pt + 64x64_classifier.pt, 256x256_diffusion.pt +
# 256x256_classifier.pt).
RELEASED = {"64": "imagenet64", "256": "imagenet256"}
# "cpu": the scaled-down 64x64 ADM and classifier the reference was timed with on this project's
# 2-core CPU, built from the flags stored in ../shared/bench/reference_sampling_cpu.json.
CPU_REFERENCE = "reference_sampling_cpu.json"
CONFIGS = (*RELEASED, "tiny", "cpu")

# "tiny": a CPU-sized stand-in with the same block structure (class-conditional, learned sigma,
# attention, scale-shift norm, up/down resblocks, an attention-pool classifier): the reference's
# defaults as typed config groups (`flags.sampling_groups`, as for the other configurations) with
# these typed values in their place. 16x16 inputs, two levels, attention at 8x8 in both networks;
# float32, attention "auto" (the defaults').
TINY = {
    "model": dict(
        image_size=16,
        class_cond=True,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(8,),
        num_head_channels=16,
        dropout=0.1,
        learn_sigma=True,
        resblock_updown=True,
        use_new_attention_order=True,
    ),
    "classifier": dict(width=32, depth=1, channel_mult=(1, 2), attention_resolutions=(8,)),
    "diffusion": dict(noise_schedule="cosine"),
}

# Where the reference's measured figures are (../shared/bench: README.md and its JSON files).
REFERENCE_DIR_ENV = "GDIFF_BENCH_REFERENCE_DIR"


# ----------------------------------------------------------------------------------------------
# Models


def sampling_groups(config: str, overrides: dict[str, Any] | None = None) -> dict[str, dict]:
    """The `model`, `diffusion`, `classifier` and `sample` groups of a benchmark configuration.

    "64" / "256": those `--mode=sample --config configs/released/imagenet64.py` (imagenet256.py)
    samples with (`gdiff.compat.released.sampling_groups`: the README's flags, bfloat16 model and
    classifier, attention "auto"); "cpu": the reference's flags stored in
    reference_sampling_cpu.json, through the same flag table; "tiny": the typed stand-in.

    Args:
      config: one of CONFIGS.
      overrides: {"group.key": value}, applied as `--config.group.key=value` would be (see
        `config_overrides`).

    Returns:
      {group: {key: value}}, what `gdiff.sampling.sampler.build_sampler` reads.
    """
    _check_choice("config", config, CONFIGS)
    if config == "tiny":
        classifier = {k: v for k, v in flags.classifier_defaults().items() if k != "image_size"}
        kwargs = {**flags.model_and_diffusion_defaults(), **classifier}
        groups = flags.sampling_groups({**kwargs, **flags.sampling_flag_defaults()})
        for group, values in TINY.items():
            groups[group].update(values)
    elif config == "cpu":
        ref = load_reference(CPU_REFERENCE)
        classifier = {k: v for k, v in ref["classifier_flags"].items() if k != "image_size"}
        kwargs = {**flags.model_and_diffusion_defaults(), **ref["model_flags"], **classifier}
        scale = {"classifier_scale": ref["classifier_scale"]}
        groups = flags.sampling_groups({**kwargs, **scale, **flags.sampling_flag_defaults()})
    else:
        groups = released.sampling_groups(RELEASED[config])
    for dotted, value in (overrides or {}).items():
        group, key = dotted.split(".")
        if key not in groups[group]:
            raise KeyError(f"{dotted} is no key of the {config!r} configuration's groups")
        groups[group][key] = value
    return groups


def config_overrides(
    *,
    respacing: str | None = None,
    use_ddim: bool | None = None,
    sampler: str | None = None,
    nfe: int | None = None,
    thresholding: bool | None = None,
    dtype: str | None = None,
    attention_impl: str | None = None,
) -> dict[str, Any]:
    """A benchmark script's options as config overrides {"group.key": value} (None: the
    configuration's own value). `sampler` is sample.sampler (auto | ancestral | ddim |
    dpm_solver), `nfe` sample.dpm_solver_steps and `thresholding` sample.dpm_solver_thresholding
    (DPM-Solver's settings; the others keep the config's: dpmsolver++, order 2, time_uniform).
    `dtype` and `attention_impl` set the model's and the classifier's alike. Everything is checked
    when the program is built (`gdiff.sampling.sampler.build_sampler`, `gdiff.factory`)."""
    out: dict[str, Any] = {}
    if respacing is not None:
        out["sample.timestep_respacing"] = respacing
    if sampler is not None:
        out["sample.sampler"] = str(sampler)
    if use_ddim is not None:
        out["sample.use_ddim"] = bool(use_ddim)
    if nfe is not None:
        out["sample.dpm_solver_steps"] = int(nfe)
    if thresholding is not None:
        out["sample.dpm_solver_thresholding"] = bool(thresholding)
    for key, value in (("dtype", dtype), ("attention_impl", attention_impl)):
        if value is not None:
            out[f"model.{key}"] = out[f"classifier.{key}"] = value
    return out


def build_model(
    config: str,
    *,
    dtype: str | None = None,
    attention_impl: str | None = None,
    respacing: str = "",
):
    """(diffusion network, diffusion) of a benchmark configuration: the model group of
    `sampling_groups` with `dtype` / `attention_impl` overrides (None: the configuration's), and
    its diffusion respaced by `respacing` ("" = all steps)."""
    groups = sampling_groups(config, config_overrides(dtype=dtype, attention_impl=attention_impl))
    model = factory.unet_from_group(groups["model"])
    diffusion = factory.diffusion_from_group(
        groups["diffusion"],
        learn_sigma=bool(groups["model"]["learn_sigma"]),
        timestep_respacing=respacing,
    )
    return model, diffusion


def build_classifier(config: str, *, dtype: str | None = None, attention_impl: str | None = None):
    """The noise-aware classifier of a benchmark configuration, at its model's image size."""
    groups = sampling_groups(config, config_overrides(dtype=dtype, attention_impl=attention_impl))
    image_size = int(groups["model"]["image_size"])
    return factory.classifier_from_group(groups["classifier"], image_size)


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {sorted(choices)}; got {value!r}")


def random_variables(abstract, key: jax.Array, sharding=None):
    """Random float32 variables shaped like `abstract`, created on the device(s) of `sharding`.

    Weights of rank >= 2 are N(0, 1/fan_in) (so activations neither vanish nor blow up through a
    deep random network and timings are not taken on NaNs); GroupNorm scales are 1; other vectors 0.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]

    def make(key):
        # One normal draw for every weight, then slices: a separate draw per leaf would put a few
        # hundred threefry hashes into the program and its CPU compile would take minutes.
        flat = jax.random.normal(key, (max(sum(sizes), 1),), jnp.float32)
        out, offset = [], 0
        for (path, leaf), size in zip(leaves, sizes, strict=True):
            name = str(getattr(path[-1], "key", path[-1]))
            if len(leaf.shape) >= 2:
                fan_in = int(np.prod(leaf.shape[:-1]))
                values = flat[offset : offset + size].reshape(leaf.shape) / np.sqrt(fan_in)
                out.append(values.astype(leaf.dtype))
                offset += size
            elif name == "scale":
                out.append(jnp.ones(leaf.shape, leaf.dtype))
            else:
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(make, out_shardings=sharding)(key)


# ----------------------------------------------------------------------------------------------
# Attention implementation


def resolve_attention(choice: str, dtype: str) -> str:
    """--attention {auto,xla,cudnn} -> the implementation the networks are built with here.

    The config's policy (`gdiff.factory.resolve_attention_impl`, what `model.attention_impl`
    means): "auto" is cuDNN's fused kernel on a CUDA GPU with a 16-bit dtype (the probe in
    ../shared/bench measured it 7.4x faster than XLA's at 1024 tokens), XLA elsewhere; a forced
    "cudnn" that cannot run raises ValueError.
    """
    return factory.resolve_attention_impl(choice, dtype, key="--attention")


# ----------------------------------------------------------------------------------------------
# Timing and memory


def time_calls(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 1) -> dict[str, Any]:
    """Times `fn()` (which must return jax arrays) after `warmup` untimed calls.

    Every call is ended with `block_until_ready`, so the time is the device's, not the dispatch's.

    Returns:
      dict(first_call_s: the first warm-up call, i.e. compile + run; times_s: one entry per timed
      call; seconds: their median; out: the last call's result).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    first = None
    out = None
    for _ in range(warmup):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        if first is None:
            first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {
        "first_call_s": first,
        "times_s": times,
        "seconds": float(np.median(times)),
        "out": out,
    }


def time_pipelined(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10) -> float:
    """Mean seconds per call of a short kernel, dispatched `iters` times back to back.

    Blocking only on the last result keeps launch latency out of microsecond-scale op timings.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    start = time.perf_counter()
    out = None
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def peak_memory_bytes() -> int | None:
    """The largest `peak_bytes_in_use` over this process's devices, or None where the backend
    keeps no statistics (the CPU backend)."""
    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def gib(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / GIB, 3)


# ----------------------------------------------------------------------------------------------
# FLOPs and the program's structure


def cost_flops(stage) -> float:
    """FLOPs of a `jax.stages.Lowered` or `Compiled` program from XLA's cost analysis.

    XLA counts 2 FLOPs per multiply-add of convolutions and dots and 1 per elementwise op. A
    `while` body is counted once, not once per trip, so count single steps, not whole loops.
    """
    analysis = stage.cost_analysis()
    if isinstance(analysis, Sequence) and not isinstance(analysis, dict):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        raise RuntimeError(f"XLA cost analysis reported no FLOPs ({analysis!r})")
    return float(analysis["flops"])


# Markers of work that leaves the device inside a compiled program.
_HOST_MARKERS = (
    "callback",  # jax.pure_callback / io_callback / debug.print custom calls
    "infeed",
    "outfeed",
    "stablehlo.send",
    "stablehlo.recv",
    "host_compute",
)


def hlo_structure(lowered) -> dict[str, Any]:
    """Counts loops and host round trips in a lowered (StableHLO) program.

    A sampling run that stays on the device has ONE `stablehlo.while` outside the random number
    generator (the scanned reverse chain; JAX's threefry hash is itself a short rolled loop inside
    its own `@threefry2x32*` functions) and no callback, infeed/outfeed or send/recv anywhere.
    """
    text = lowered.as_text()
    per_function: dict[str, int] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("func.func"):
            current = stripped.split("@", 1)[1].split("(", 1)[0]
        if "stablehlo.while" in line and current is not None:
            per_function[current] = per_function.get(current, 0) + 1
    outside_rng = sum(n for f, n in per_function.items() if not f.startswith("threefry"))
    host = {m: text.count(m) for m in _HOST_MARKERS if text.count(m)}
    return {
        "hlo_while_loops": outside_rng,
        "hlo_while_loops_by_function": per_function,
        "hlo_host_transfers": host,
        "hlo_custom_calls": sorted(
            {line.split('call_target_name = "')[1].split('"')[0] for line in _custom_calls(text)}
        ),
    }


def _custom_calls(text: str):
    return [line for line in text.splitlines() if 'call_target_name = "' in line]


# ----------------------------------------------------------------------------------------------
# The bf16 matmul peak of the device


def default_matmul_size(tiny: bool) -> int:
    """8192^3 on accelerators (what ../shared/bench measured on the H100), small on CPU."""
    if jax.default_backend() in ("gpu", "tpu"):
        return 8192
    return 256 if tiny else 1024


def matmul_peak_tflops(n: int, dtype=jnp.bfloat16, iters: int = 10) -> float:
    """Achieved TFLOP/s of an n x n x n matrix product in `dtype` on the default device."""
    if n <= 0:
        raise ValueError(f"matmul size must be positive; got {n}")
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(jnp.matmul)
    seconds = time_pipelined(lambda: matmul(a, b), warmup=2, iters=iters)
    return 2.0 * n**3 / seconds / 1e12


# ----------------------------------------------------------------------------------------------
# The reference's figures


def reference_dir() -> pathlib.Path:
    """The folder of the reference's measured figures: $GDIFF_BENCH_REFERENCE_DIR, else
    ../shared/bench beside the repository."""
    return pathlib.Path(os.environ.get(REFERENCE_DIR_ENV) or REPO.parent / "shared" / "bench")


def reference_sampling_cpu() -> dict[str, Any]:
    """The reference's guided DDIM figures on the 2-core CPU (eager PyTorch, 2 threads): seconds
    per image-step at batch 4 (median of its runs) and the conditions they were measured under."""
    ref = load_reference(CPU_REFERENCE)
    times = ref["seconds_per_image_step"]
    return {
        "s_per_img_step": float(np.median(times["reference_batch4"])),
        "batch": 4,
        "steps": int(ref["steps"]),
        "measured": ref["measured"],
    }


def load_reference(name: str) -> list[dict[str, Any]]:
    """The rows of one of the reference's JSON files (e.g. "reference_sampling_h100.json")."""
    path = reference_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"the reference's figures {path} are missing: the benchmarks compare with the files "
            f"of ../shared/bench; set {REFERENCE_DIR_ENV} to the folder that holds them"
        )
    return json.loads(path.read_text())


def reference_sampling(config: str, *, guided: bool, ddim: bool) -> dict[str, float] | None:
    """The reference's H100 sampling row of a released configuration with the same guidance and
    sampler (reference_sampling_h100.json), or None where it measured none (e.g. "tiny").

    GFLOP per image-step follows the reference's convention: 2 FLOPs per multiply-add of the UNet
    forward, plus 3x the classifier forward when guided.
    """
    if config == "cpu":
        return reference_sampling_cpu() if guided and ddim else None
    if config not in RELEASED:
        return None
    for row in load_reference("reference_sampling_h100.json"):
        if (row["config"], row["guided"], row["ddim"]) == (config, guided, ddim):
            return {
                "img_per_s": row["img_per_s"],
                "ms_per_step": row["ms_per_step"],
                "gflop_per_img_step": round(row["flops_per_img_step"] / 1e9, 1),
            }
    return None


def reference_training(kind: str, config: str) -> dict[str, float] | None:
    """The reference's H100 training-step row (reference_training_h100.json) of a network kind
    ("diffusion" | "classifier") and released configuration, or None where it measured none."""
    if config not in RELEASED:
        return None
    for row in load_reference("reference_training_h100.json"):
        if (row["kind"], row["config"]) == (kind, config):
            return {k: row[k] for k in ("batch", "ms_per_step", "img_per_s", "params_m")}
    return None


# ----------------------------------------------------------------------------------------------
# Records


def environment() -> dict[str, Any]:
    """Where a number was measured: backend, device kind and count, versions, command line."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jax.lib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "host": platform.node(),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def emit(record: dict[str, Any], out: str | None) -> None:
    """Prints `record` as JSON and writes it to `out` (parent folders created) when given."""
    text = json.dumps(record, indent=1, sort_keys=False, default=_jsonable)
    print(text, flush=True)
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def round_or_none(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


# ----------------------------------------------------------------------------------------------
# Summary table of written records: `python benchmarks/common.py benchmarks/logs/*.json`


def _sampler_column(record: dict[str, Any]) -> str:
    """A sampling record's sampler and its network evaluations, e.g. "DDIM 25",
    "DPM-Solver++(2M) 20" (records written before the solver existed carry no `sampler`)."""
    if record.get("sampler") == "dpm_solver":
        return f"{record['sampler_label']} {record['steps']}"
    return ("DDIM " if record["ddim"] else "DDPM ") + str(record["steps"])


def summarize(records: list[dict[str, Any]]) -> str:
    """Markdown tables of sampling, training and ops records, next to the reference's H100 rows."""
    out = []
    sampling = [r for r in records if r.get("benchmark") == "sampling" and "img_per_s" in r]
    if sampling:
        out += [
            "| config | batch | sampler | guided | attention | img/s | ms/step | GFLOP/img-step "
            "(XLA; ref. convention) | TFLOP/s | of matmul peak | peak GiB | reference img/s | x |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sampling:
            ref = r.get("reference_h100") or {}
            sampler = _sampler_column(r)
            out.append(
                f"| {r['config']} | {r['batch']} | {sampler} | {r['guided']} | "
                f"{r['attention_impl']} | {r['img_per_s']} | {r['ms_per_step']} | "
                f"{r['flops_per_img_step'] / 1e9:.1f}; "
                f"{r['ref_convention_flops_per_img_step'] / 1e9:.1f} | {r['achieved_tflops']} | "
                f"{100 * r['fraction_of_matmul_peak']:.1f}% | {r['peak_mem_gib']} | "
                f"{ref.get('img_per_s', '-')} | {r.get('speedup_vs_reference_h100', '-')} |"
            )
    training = [r for r in records if r.get("benchmark") == "training"]
    if training:
        out += [
            "",
            "| kind | config | batch | ms/step | img/s | params | TFLOP/s | peak GiB | "
            "reference ms/step (batch) | x |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in training:
            ref = r.get("reference_h100") or {}
            ref_text = f"{ref['ms_per_step']} ({ref['batch']})" if ref else "-"
            out.append(
                f"| {r['kind']} | {r['config']} | {r['batch']} | {r['ms_per_step']} | "
                f"{r['img_per_s']} | {r['params_m']}M | {r['achieved_tflops']} | "
                f"{r['peak_mem_gib']} | {ref_text} | {r.get('speedup_vs_reference_h100', '-')} |"
            )
    for r in records:
        if r.get("benchmark") != "ops":
            continue
        out += ["", "| op | TFLOP/s | % of matmul peak |", "|---|---|---|"]
        for row in r["rows"]:
            tflops = row["tflops"] if row["tflops"] is not None else row.get("error", "-")
            out.append(f"| {row['op']} | {tflops} | {row.get('pct_of_matmul', '-')} |")
    return "\n".join(out)


if __name__ == "__main__":
    paths = sys.argv[1:]
    if not paths:
        raise SystemExit("usage: python benchmarks/common.py RECORD.json [...]")
    print(summarize([json.loads(pathlib.Path(p).read_text()) for p in paths]))
