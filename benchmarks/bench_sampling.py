"""Sampling throughput of the released ADM configurations, against ../shared/bench's PyTorch rows.

    python benchmarks/bench_sampling.py --config 64 --batch 256 --respacing ddim25 --guided \
        --out benchmarks/logs/sampling_64_guided.json
    python benchmarks/bench_sampling.py --config 64 --batch 256 --sampler dpm_solver --nfe 20 \
        --guided --thresholding --out benchmarks/logs/s64_dpm20_guided.json
    python benchmarks/bench_sampling.py --config cpu --guided --repeats 3
        # the reference's CPU comparison (reference_sampling_cpu.json): batch 4, DDIM 10
    python benchmarks/bench_sampling.py --config cpu --guided --sampler dpm_solver --nfe 10
        # the same networks and batch, DPM-Solver++ 2M in 10 network evaluations
    python benchmarks/bench_sampling.py --config cpu --guided --interval 0.3,5
        # classifier guidance only where sigma lies in (0.3, 5]: the gradient is skipped elsewhere
    python benchmarks/bench_sampling.py --config cpu --guide-network --interval 0.3,5
        # two-network guidance (a second, unconditional network of the model's architecture,
        # as the released 256x256 pair) at w = --weight, in an interval

`--config cpu` builds exactly the networks whose flags reference_sampling_cpu.json stores and
reports seconds per image-step next to the reference's eager PyTorch figure on the same 2-core
machine kind; the record's `env` holds the XLA flags and versions it ran with.

The program is the one `--mode=sample` runs: `gdiff.sampling.sampler.build_sampler` on the groups
of configs/released/imagenet64.py (imagenet256.py) for 64x64_diffusion.pt + 64x64_classifier.pt
(256x256_*), i.e. the reference README's flags: bfloat16 model and classifier, attention "auto"
(cuDNN's fused kernel on a CUDA GPU, XLA elsewhere), the same sampler. The script's options are
config overrides, recorded as `config_overrides` with the equivalent `--mode=sample` command:
`--respacing` is sample.timestep_respacing, `--sampler ddim|ddpm` sample.use_ddim, `--sampler
dpm_solver` sample.sampler=dpm_solver (with sample.use_ddim=False) and `--nfe` / `--thresholding`
sample.dpm_solver_steps / sample.dpm_solver_thresholding (the solver's other settings are the
config's: DPM-Solver++, order 2, time_uniform, lower_order_final), and `--dtype` / `--attention`
(default: the config's) set model.* and classifier.* alike, checked by the same policy as the
config's. Random float32 weights are made on the device and random labels drawn; the whole reverse
chain (or the whole solve) is one `jax.jit` call, data-parallel over every device. One warm-up call
(compile + run), then `--repeats` timed calls.

A step is one network evaluation: one UNet forward, plus one guidance gradient when guided. DDIM
and ancestral sampling take one per (respaced) chain step, DPM-Solver one per solver step (its NFE),
so `steps` is the number of network evaluations per image and `s_per_img_step` is seconds per
network evaluation of one image: the figure that compares samplers at equal cost per step.

FLOPs per image-step are XLA's cost analysis of ONE model forward, plus one guidance gradient
(classifier forward + backward to the input) when guided, at batch 1. The reference counts the
guided step as UNet + 3x classifier forward; that convention is recorded too
(`ref_convention_flops_per_img_step`) so the two GFLOP columns can be compared like for like.

`--cost-only` builds nothing on the device: it lowers the forward and the whole sampling program on
abstract shapes and reports FLOPs and the program's structure (one `while`, no host transfers).
That is how the real configurations are checked on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses

import common
import jax
import jax.numpy as jnp
import numpy as np

from gdiff import distributed, factory
from gdiff.compat import flags
from gdiff.diffusion import guidance as guidance_lib
from gdiff.sampling import guidance_rows
from gdiff.sampling import sampler as sampler_lib

DEFAULT_BATCH = {"64": 256, "256": 32, "tiny": 8, "cpu": 4}
# --sampler dpm_solver's default number of network evaluations: the solver authors' guided setting
# (2M, 20 steps), as in the released configs' DPM-Solver++ commands.
DEFAULT_NFE = 20


def guide_group(config: str, overrides: dict) -> dict | None:
    """The guide network's model group of `--guide-network`: the model's architecture without
    labels (the released 256x256 unconditional model beside its conditional one), or None."""
    groups = common.sampling_groups(config, overrides)
    if groups["sample"].get("guidance") != "two_network":
        return None
    return {**groups["model"], "class_cond": False}


def build(config: str, overrides: dict, *, guided: bool, mesh, guide: dict | None = None):
    """(sampler, model, classifier or None): `--mode=sample`'s builder on the configuration's
    groups with the script's config overrides (and `guide_group`'s guide network)."""
    groups = common.sampling_groups(config, overrides)
    return sampler_lib.build_sampler(groups, guided=guided, guide=guide, mesh=mesh)


def equivalent_command(config: str, overrides: dict) -> str | None:
    """The `--mode=sample` command line whose program this run times (released configs)."""
    if config not in common.RELEASED:
        return None
    name = common.RELEASED[config]
    sets = " ".join(f"--config.{key}={value}" for key, value in overrides.items())
    return f"python main.py --mode=sample --config configs/released/{name}.py {sets}".strip()


def step_flops(model, classifier, model_vars, classifier_vars, size: int, class_cond: bool):
    """XLA's FLOPs per image of one sampling step's networks (batch-1 programs, lowered only).

    Lowered rather than compiled: the count of the convolutions and matmuls does not depend on
    fusion, and lowering the 256x256 model takes seconds where compiling it on a CPU takes minutes.
    """
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    t = y = jax.ShapeDtypeStruct((1,), jnp.int32)
    fwd = jax.jit(lambda v, x, t, y: model.apply(v, x, t, y=y if class_cond else None))
    out = {"model_fwd": common.cost_flops(fwd.lower(model_vars, x, t, y))}
    if classifier is not None:
        cls = jax.jit(classifier.apply)
        out["classifier_fwd"] = common.cost_flops(cls.lower(classifier_vars, x, t))
        guide = sampler_lib.classifier_guidance(classifier)

        def cond(v, x, t, y):
            return guide(v, y, jnp.ones(y.shape, jnp.float32))(x, t)

        out["classifier_grad"] = common.cost_flops(jax.jit(cond).lower(classifier_vars, x, t, y))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=(*common.RELEASED, "cpu"), default="64")
    p.add_argument("--batch", type=int, default=None, help="global batch (default 256 / 32)")
    p.add_argument(
        "--respacing",
        default=None,
        help="timestep_respacing, e.g. ddim25 or 25 (default ddim25; ddim10 for --config cpu)",
    )
    p.add_argument(
        "--sampler",
        choices=("auto", "ddim", "ddpm", "dpm_solver"),
        default="auto",
        help="auto: DDIM when the respacing starts with 'ddim' (as the reference's use_ddim); "
        "dpm_solver: sample.sampler=dpm_solver (DPM-Solver++ 2M unless the config says otherwise)",
    )
    p.add_argument(
        "--nfe",
        type=int,
        default=None,
        help=f"--sampler dpm_solver: sample.dpm_solver_steps, its network evaluations "
        f"(default {DEFAULT_NFE})",
    )
    p.add_argument(
        "--thresholding",
        action="store_true",
        help="--sampler dpm_solver: sample.dpm_solver_thresholding=True (dynamic thresholding)",
    )
    p.add_argument("--guided", action="store_true", help="classifier guidance")
    p.add_argument("--scale", type=float, default=1.0, help="classifier scale")
    p.add_argument(
        "--guide-network",
        action="store_true",
        help="two-network guidance: a second (random, unconditional) network of the model's "
        "architecture as the guide u of u + w (c - u)",
    )
    p.add_argument("--weight", type=float, default=2.0, help="--guide-network's w")
    p.add_argument(
        "--interval",
        default="",
        help="sample.guidance_interval 'lo,hi': guidance only where sigma lies in (lo, hi]",
    )
    p.add_argument(
        "--dtype",
        choices=factory.DTYPES,
        default=None,
        help="override of model.dtype and classifier.dtype (default: the config's)",
    )
    p.add_argument(
        "--attention",
        choices=factory.ATTENTION_IMPLS,
        default=None,
        help="override of model/classifier.attention_impl (default: the config's, auto)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul peak probe size")
    p.add_argument("--cost-only", action="store_true", help="FLOPs + HLO on abstract shapes")
    p.add_argument("--tiny", action="store_true", help="a tiny model so a CPU runs it in seconds")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch <= 0:
        p.error(f"--batch must be positive; got {args.batch}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.sampler == "dpm_solver":
        if args.respacing is not None:
            p.error(
                "--respacing does not apply to --sampler dpm_solver: the solver runs on the full "
                "training chain in --nfe network evaluations"
            )
        if args.nfe is not None and args.nfe < 1:
            p.error(f"--nfe must be positive; got {args.nfe}")
    elif args.nfe is not None or args.thresholding:
        p.error("--nfe and --thresholding are DPM-Solver's: use them with --sampler dpm_solver")
    return args


def describe(config: str, args, overrides: dict, sampler, model, classifier):
    """(the record's fixed part: what was built, with FLOPs per step; the abstract variables of
    the model and the classifier ({} unguided)).

    `steps` is the number of network evaluations per image (`gdiff.sampling.sampler.nfe`): the
    respaced chain's length for DDIM and ancestral steps, `sample.dpm_solver_steps` for the solver
    (which runs on the full training chain, so `diffusion.num_timesteps` is not its step count)."""
    groups = common.sampling_groups(config, overrides)
    sample, diffusion = groups["sample"], groups["diffusion"]
    solver = sampler.options.dpm_solver
    size, class_cond = int(model.image_size), model.num_classes is not None
    abstract_m = factory.abstract_variables(model)
    abstract_c = factory.abstract_variables(classifier) if classifier is not None else {}
    flops = step_flops(model, classifier, abstract_m, abstract_c, size, class_cond)
    guided = classifier is not None
    record = {
        "benchmark": "sampling",
        "config": config,
        "batch": args.batch,
        "respacing": args.respacing,
        "guided": args.guided,
        "scale": args.scale if args.guided else 0.0,
        "sampler": sampler.options.sampler,
        "sampler_label": sampler_lib.sampler_label(sample, diffusion),
        "ddim": sampler.options.use_ddim,
        "dpm_solver": dataclasses.asdict(solver) if solver is not None else None,
        "steps": sampler_lib.nfe(sample, diffusion),
        "config_overrides": overrides,
        "equivalent_command": equivalent_command(config, overrides),
        "dtype": jnp.dtype(model.dtype).name,
        "classifier_dtype": jnp.dtype(classifier.dtype).name if guided else None,
        "attention_requested": args.attention,
        "attention_impl": model.attention_impl,
        "classifier_attention_impl": classifier.attention_impl if guided else None,
        "model_params": factory.param_count(model),
        "classifier_params": factory.param_count(classifier) if guided else 0,
        "flops_source": "XLA cost analysis of the lowered batch-1 programs",
        "flops": flops,
        "flops_per_img_step": flops["model_fwd"] + flops.get("classifier_grad", 0.0),
        "ref_convention_flops_per_img_step": flops["model_fwd"]
        + 3 * flops.get("classifier_fwd", 0.0),
    }
    record.update(guidance_cost(args, sampler, flops, record["steps"]))
    return record, (abstract_m, abstract_c)


def guidance_cost(args, sampler, flops: dict, steps: int) -> dict:
    """The run's guidance row, how many of its steps are guided (`--interval`; every step
    without one; None for the solver, whose steps' noise levels are its own) and the mean FLOPs
    per image-step that implies: the UNet always, the classifier gradient and the guide network
    (as large as the UNet) only at guided steps."""
    row = guidance_row(args)
    guided_steps = steps
    if not row.every_step:
        guided_steps = None
        if sampler.options.dpm_solver is None:
            d = sampler.diffusion
            ts = np.asarray(getattr(d, "timestep_map", np.arange(d.num_timesteps)))
            if d.rescale_timesteps:
                ts = ts * 1000.0 / getattr(d, "original_num_steps", d.num_timesteps)
            sigma = np.asarray(guidance_lib.noise_level_fn(d)(jnp.asarray(ts, jnp.float32)))
            guided_steps = int(np.sum((sigma > row.interval[0]) & (sigma <= row.interval[1])))
    extra = flops.get("classifier_grad", 0.0) + (flops["model_fwd"] if args.guide_network else 0)
    mean = None
    if guided_steps is not None:
        mean = flops["model_fwd"] + extra * guided_steps / steps
    return {
        "guidance": row.settings(),
        "guided_steps": guided_steps,
        "flops_per_img_step_with_guidance": flops["model_fwd"] + extra,
        "mean_flops_per_img_step": mean,
    }


def guidance_row(args) -> guidance_rows.GuidanceRow:
    """The one guidance row every image of the run gets: classifier guidance at --scale
    (--guided), two-network guidance at --weight (--guide-network), both, or none; in
    --interval when given."""
    kind = "two_network" if args.guide_network else guidance_rows.CLASSIFIER
    return guidance_rows.GuidanceRow(
        kind,
        weight=args.weight if args.guide_network else 1.0,
        classifier_scale=args.scale if args.guided else 0.0,
        interval=guidance_rows.parse_intervals(args.interval)[0],
    )


def batch_rows(args, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The sampling batch: example ids, labels and the guidance row's per-row arrays."""
    ids = np.arange(args.batch, dtype=np.int32)
    arrays = guidance_rows.row_arrays((guidance_row(args),), args.batch)
    return {"ids": ids, "labels": labels.astype(np.int32), **arrays}


def lower_abstract(sampler, abstract, args, mesh):
    """The whole sampling program lowered on abstract arguments (nothing allocated)."""
    rep, rows = distributed.replicated(mesh), distributed.batch_sharding(mesh)
    batch_in = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows)
        for k, v in batch_rows(args, np.zeros(args.batch, np.int32)).items()
    }

    def replicate(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)

    m_in, c_in = jax.tree.map(replicate, abstract)
    g_in = m_in if sampler.guide_apply is not None else None
    return sampler.lower(m_in, c_in, batch_in, g_in)


def time_sampling(sampler, abstract, args, mesh, record: dict, guide: dict | None = None) -> dict:
    """Random weights and labels on the device, one warm-up call, `--repeats` timed calls."""
    rep, (abstract_m, abstract_c) = distributed.replicated(mesh), abstract
    keys = jax.random.split(jax.random.key(0), 2)
    model_vars = common.random_variables(abstract_m, keys[0], rep)
    classifier_vars = common.random_variables(abstract_c, keys[1], rep) if abstract_c else {}
    rng = np.random.default_rng(0)
    labels = rng.integers(0, flags.NUM_CLASSES, args.batch)
    batch_in = sampler.make_batch(batch_rows(args, labels))
    guide_vars = None
    if guide is not None:  # a second random network of the model's architecture
        abstract_g = factory.abstract_variables(factory.unet_from_group(guide))
        guide_vars = common.random_variables(abstract_g, jax.random.key(3), rep)
    out = common.hlo_structure(sampler.lower(model_vars, classifier_vars, batch_in, guide_vars))
    timing = common.time_calls(
        lambda: sampler(model_vars, classifier_vars, batch_in, guide_vars=guide_vars),
        warmup=1,
        repeats=args.repeats,
    )
    images = timing["out"]
    if images.shape != (args.batch, *sampler.options.image_shape) or images.dtype != jnp.uint8:
        raise RuntimeError(f"sampler returned {images.shape} {images.dtype}")
    seconds, steps = timing["seconds"], record["steps"]
    achieved = record["flops_per_img_step"] * args.batch * steps / seconds / 1e12
    ref_achieved = record["ref_convention_flops_per_img_step"] * args.batch * steps / seconds
    n = args.matmul_n or common.default_matmul_size(args.tiny)
    peak = common.matmul_peak_tflops(n)
    out.update(
        {
            "first_call_s": common.round_or_none(timing["first_call_s"]),
            "times_s": [round(t, 4) for t in timing["times_s"]],
            "seconds": round(seconds, 4),
            "img_per_s": round(args.batch / seconds, 4),
            "ms_per_step": round(seconds / steps * 1e3, 3),
            "achieved_tflops": round(achieved, 4),
            "ref_convention_achieved_tflops": round(ref_achieved / 1e12, 4),
            "peak_mem_gib": common.gib(common.peak_memory_bytes()),
            "matmul_n": n,
            "matmul_peak_tflops": round(peak, 4),
            "fraction_of_matmul_peak": round(achieved / peak, 4),
            "s_per_img_step": round(seconds / (args.batch * steps), 4),
        }
    )
    return out


def compare(record: dict, ref: dict | None) -> None:
    """Adds the reference's row and the speed-up against it, where one applies."""
    cpu = record["config"] == "cpu"
    record["reference_cpu" if cpu else "reference_h100"] = ref
    if ref is None or "img_per_s" not in record:
        return
    if cpu:
        record["speedup_vs_reference_cpu"] = round(
            ref["s_per_img_step"] / record["s_per_img_step"], 3
        )
    elif jax.default_backend() == "gpu":
        record["speedup_vs_reference_h100"] = round(record["img_per_s"] / ref["img_per_s"], 3)


def sampling_overrides(args, config: str) -> dict:
    """The script's sampler, precision and attention options as config overrides (filling in the
    defaults of `args.respacing` / `args.nfe`): what `--mode=sample` is given as
    `--config.<group>.<key>=<value>` to build the program timed."""
    common_options = dict(dtype=args.dtype, attention_impl=args.attention)
    guidance = {}
    if args.guide_network:
        guidance["sample.guidance"] = "two_network"
        guidance["sample.guidance_scale"] = f"{args.weight:g}"
    if args.interval:
        guidance["sample.guidance_interval"] = args.interval
    return {**_sampler_overrides(args, config, common_options), **guidance}


def _sampler_overrides(args, config: str, common_options: dict) -> dict:
    if args.sampler == "dpm_solver":
        args.nfe = args.nfe or DEFAULT_NFE
        return common.config_overrides(
            sampler="dpm_solver",
            use_ddim=False,
            nfe=args.nfe,
            thresholding=True if args.thresholding else None,
            **common_options,
        )
    args.respacing = args.respacing or ("ddim10" if config == "cpu" else "ddim25")
    if args.sampler == "auto":
        use_ddim = args.respacing.startswith("ddim")
    else:
        use_ddim = args.sampler == "ddim"
    return common.config_overrides(respacing=args.respacing, use_ddim=use_ddim, **common_options)


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = "tiny" if args.tiny else args.config
    args.batch = args.batch or DEFAULT_BATCH[config]
    mesh = distributed.data_mesh()
    distributed.check_batch_divisible(args.batch, what="--batch", mesh=mesh)
    overrides = sampling_overrides(args, config)
    if args.sampler == "dpm_solver":
        ref = None  # the reference measured no solver: no row to compare with
    else:
        # Read first: a missing reference file fails before anything is built.
        ddim = overrides["sample.use_ddim"]
        ref = common.reference_sampling(config, guided=args.guided, ddim=ddim)
    guide = guide_group(config, overrides)
    sampler, model, classifier = build(
        config, overrides, guided=args.guided, guide=guide, mesh=mesh
    )
    record, abstract = describe(config, args, overrides, sampler, model, classifier)
    if args.cost_only:
        record.update(common.hlo_structure(lower_abstract(sampler, abstract, args, mesh)))
    else:
        record.update(time_sampling(sampler, abstract, args, mesh, record, guide))
    compare(record, ref)
    record["env"] = common.environment()
    common.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
