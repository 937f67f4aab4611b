"""Sampling throughput of the released ADM configurations, against ../shared/bench's PyTorch rows.

    python benchmarks/bench_sampling.py --config 64 --batch 256 --respacing ddim25 --guided \
        --dtype bfloat16 --attention auto --out benchmarks/logs/sampling_64_guided.json
    python benchmarks/bench_sampling.py --config cpu --guided --dtype float32 --repeats 3
        # the reference's CPU comparison (reference_sampling_cpu.json): batch 4, DDIM 10

`--config cpu` builds exactly the networks whose flags reference_sampling_cpu.json stores and
reports seconds per image-step next to the reference's eager PyTorch figure on the same 2-core
machine kind; the record's `env` holds the XLA flags and versions it ran with.

The models are built from the reference README's flags for 64x64_diffusion.pt/64x64_classifier.pt
or 256x256_diffusion.pt/256x256_classifier.pt with random float32 weights made on the device, and
sampled with random labels through gdiff's production sampler (`gdiff.sampling.sampler.Sampler`):
the whole reverse chain is one `jax.jit` call, data-parallel over every device. One warm-up call
(compile + run), then `--repeats` timed calls.

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

import common
import jax
import jax.numpy as jnp
import numpy as np

from gdiff import factory

DEFAULT_BATCH = {"64": 256, "256": 32, "tiny": 8, "cpu": 4}
NUM_CLASSES = 1000


def build(config: str, *, dtype: str, attention_impl: str, respacing: str, guided: bool):
    """(model, diffusion, classifier or None) for a benchmark configuration."""
    model, diffusion = common.build_model(
        config, dtype=dtype, attention_impl=attention_impl, respacing=respacing
    )
    classifier = None
    if guided:
        classifier = common.build_classifier(config, dtype=dtype, attention_impl=attention_impl)
        if classifier.image_size != model.image_size:
            raise ValueError(
                f"config {config}: classifier ({classifier.image_size}) and model "
                f"({model.image_size}) image sizes differ"
            )
    return model, diffusion, classifier


def step_flops(model, classifier, model_vars, classifier_vars, size: int, class_cond: bool):
    """XLA's FLOPs per image of one sampling step's networks (batch-1 programs, lowered only).

    Lowered rather than compiled: the count of the convolutions and matmuls does not depend on
    fusion, and lowering the 256x256 model takes seconds where compiling it on a CPU takes minutes.
    """
    from gdiff.sampling import sampler

    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    t = y = jax.ShapeDtypeStruct((1,), jnp.int32)
    fwd = jax.jit(lambda v, x, t, y: model.apply(v, x, t, y=y if class_cond else None))
    out = {"model_fwd": common.cost_flops(fwd.lower(model_vars, x, t, y))}
    if classifier is not None:
        cls = jax.jit(classifier.apply)
        out["classifier_fwd"] = common.cost_flops(cls.lower(classifier_vars, x, t))
        guide = sampler.classifier_guidance(classifier)

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
        choices=("auto", "ddim", "ddpm"),
        default="auto",
        help="auto: DDIM when the respacing starts with 'ddim' (as the reference's use_ddim)",
    )
    p.add_argument("--guided", action="store_true", help="classifier guidance")
    p.add_argument("--scale", type=float, default=1.0, help="classifier scale")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto")
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
    return args


def main(argv=None) -> dict:
    from gdiff import distributed
    from gdiff.sampling import sampler as sampler_lib

    args = parse_args(argv)
    config = "tiny" if args.tiny else args.config
    args.respacing = args.respacing or ("ddim10" if config == "cpu" else "ddim25")
    batch = args.batch or DEFAULT_BATCH[config]
    if args.sampler == "auto":
        use_ddim = args.respacing.startswith("ddim")
    else:
        use_ddim = args.sampler == "ddim"
    mesh = distributed.data_mesh()
    distributed.check_batch_divisible(batch, what="--batch", mesh=mesh)
    rep, rows = distributed.replicated(mesh), distributed.batch_sharding(mesh)
    attention_impl = common.resolve_attention(args.attention, args.dtype)
    # Read first: a missing reference file fails before anything is built.
    ref = common.reference_sampling(config, guided=args.guided, ddim=use_ddim)
    model, diffusion, classifier = build(
        config,
        dtype=args.dtype,
        attention_impl=attention_impl,
        respacing=args.respacing,
        guided=args.guided,
    )
    size, class_cond = int(model.image_size), model.num_classes is not None
    steps = int(diffusion.num_timesteps)

    abstract_m = factory.abstract_variables(model)
    abstract_c = {}
    if classifier is not None:
        abstract_c = factory.abstract_variables(classifier)
    flops = step_flops(model, classifier, abstract_m, abstract_c, size, class_cond)
    per_img_step = flops["model_fwd"] + flops.get("classifier_grad", 0.0)
    ref_convention = flops["model_fwd"] + 3 * flops.get("classifier_fwd", 0.0)

    sampler = sampler_lib.Sampler(
        diffusion,
        model.apply,
        sampler_lib.SamplerOptions(
            image_shape=(size, size, 3), use_ddim=use_ddim, class_cond=class_cond
        ),
        guidance=sampler_lib.classifier_guidance(classifier) if classifier is not None else None,
        mesh=mesh,
        seed=0,
    )
    record = {
        "benchmark": "sampling",
        "config": config,
        "batch": batch,
        "respacing": args.respacing,
        "guided": args.guided,
        "scale": args.scale if args.guided else 0.0,
        "ddim": use_ddim,
        "steps": steps,
        "dtype": args.dtype,
        "attention_requested": args.attention,
        "attention_impl": attention_impl,
        "model_params": factory.param_count(model),
        "classifier_params": factory.param_count(classifier) if classifier is not None else 0,
        "flops_source": "XLA cost analysis of the lowered batch-1 programs",
        "flops": flops,
        "flops_per_img_step": per_img_step,
        "ref_convention_flops_per_img_step": ref_convention,
    }

    if args.cost_only:
        # Nothing is allocated: the whole sampling program is lowered on abstract arguments.
        batch_in = {
            "ids": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
            "labels": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
            "scales": jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=rows),
        }

        def replicate(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)

        m_in, c_in = jax.tree.map(replicate, (abstract_m, abstract_c))
        record.update(common.hlo_structure(sampler.lower(m_in, c_in, batch_in)))
    else:
        keys = jax.random.split(jax.random.key(0), 2)
        model_vars = common.random_variables(abstract_m, keys[0], rep)
        classifier_vars = (
            common.random_variables(abstract_c, keys[1], rep) if classifier is not None else {}
        )
        labels = np.random.default_rng(0).integers(0, NUM_CLASSES, batch).astype(np.int32)
        batch_in = sampler.make_batch(
            {
                "ids": np.arange(batch, dtype=np.int32),
                "labels": labels,
                "scales": np.full((batch,), args.scale, np.float32),
            }
        )
        record.update(common.hlo_structure(sampler.lower(model_vars, classifier_vars, batch_in)))
        timing = common.time_calls(
            lambda: sampler(model_vars, classifier_vars, batch_in), warmup=1, repeats=args.repeats
        )
        images = timing["out"]
        if images.shape != (batch, size, size, 3) or images.dtype != jnp.uint8:
            raise RuntimeError(f"sampler returned {images.shape} {images.dtype}")
        seconds = timing["seconds"]
        achieved = per_img_step * batch * steps / seconds / 1e12
        n = args.matmul_n or common.default_matmul_size(args.tiny)
        peak = common.matmul_peak_tflops(n)
        record.update(
            {
                "first_call_s": common.round_or_none(timing["first_call_s"]),
                "times_s": [round(s, 4) for s in timing["times_s"]],
                "seconds": round(seconds, 4),
                "img_per_s": round(batch / seconds, 4),
                "ms_per_step": round(seconds / steps * 1e3, 3),
                "achieved_tflops": round(achieved, 4),
                "ref_convention_achieved_tflops": round(
                    ref_convention * batch * steps / seconds / 1e12, 4
                ),
                "peak_mem_gib": common.gib(common.peak_memory_bytes()),
                "matmul_n": n,
                "matmul_peak_tflops": round(peak, 4),
                "fraction_of_matmul_peak": round(achieved / peak, 4),
            }
        )
        record["s_per_img_step"] = round(seconds / (batch * steps), 4)
        if ref is not None and jax.default_backend() == "gpu":
            record["speedup_vs_reference_h100"] = round(record["img_per_s"] / ref["img_per_s"], 3)
        if config == "cpu" and ref is not None:
            record["speedup_vs_reference_cpu"] = round(
                ref["s_per_img_step"] / record["s_per_img_step"], 3
            )
    record["reference_cpu" if config == "cpu" else "reference_h100"] = ref
    record["env"] = common.environment()
    common.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
