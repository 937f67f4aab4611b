"""Training-step throughput of the released ADM configurations, against ../shared/bench's rows.

    python benchmarks/bench_training.py --kind diffusion --config 64 --batch 64 \
        --dtype bfloat16 --out benchmarks/logs/train_diffusion_64.json

One optimizer step as the reference's training scripts take it, written self-contained here so the
number measures the step and nothing else:
  - diffusion: uniform timesteps, the hybrid loss (`training_losses` with learned sigma: MSE + VB),
    dropout as the released flags set it;
  - classifier: noised inputs (`q_sample` at uniform timesteps) and cross-entropy, as the
    reference's classifier_train.py;
  - AdamW (optax) on float32 parameters, bf16 compute (no loss scaling: bf16 has float32's range,
    where the reference's fp16 needed dynamic loss scaling), one `jax.jit` with the parameters and
    optimizer state donated, data-parallel over every device;
  - `--remat` the diffusion model's `model.remat` policy (none / dots / full; the released 256x256
    and 512x512 training configs use full), to measure what recomputation costs and saves.
`--warmup` untimed steps (the first compiles), then `--steps` steps timed back to back, ending in
`block_until_ready` (the reference: 3 warm-up, 20 timed). FLOPs per step are XLA's cost analysis
of the lowered step (forward + backward + optimizer) at the global batch.
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gdiff import factory, xla_options
from gdiff.models import unet

DEFAULT_BATCH = {
    ("diffusion", "64"): 64,
    ("classifier", "64"): 128,
    ("diffusion", "256"): 16,
    ("classifier", "256"): 64,
}
TINY_BATCH = 8
NUM_CLASSES = 1000
# The reference's settings: improved-diffusion's lr for the ImageNet models; the classifier flags
# of the guided-diffusion README (lr 3e-4, weight decay 0.05).
OPTIM = {"diffusion": (1e-4, 0.0), "classifier": (3e-4, 0.05)}


def make_loss(kind: str, net, diffusion, class_cond: bool):
    """loss(params, images [B,H,W,3], labels [B], key) -> scalar, for one kind of network."""

    def loss_fn(params, images, labels, key):
        kt, kn, kd = jax.random.split(key, 3)
        batch = images.shape[0]
        t = jax.random.randint(kt, (batch,), 0, diffusion.num_timesteps)
        noise = jax.random.normal(kn, images.shape, images.dtype)
        rngs = {"dropout": kd}
        if kind == "diffusion":

            def model_fn(x, ts):
                y = labels if class_cond else None
                return net.apply({"params": params}, x, ts, y=y, train=True, rngs=rngs)

            return jnp.mean(diffusion.training_losses(model_fn, images, t, noise)["loss"])
        x_t = diffusion.q_sample(images, t, noise)
        logits = net.apply({"params": params}, x_t, t, train=True, rngs=rngs)
        return jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        )

    return loss_fn


def make_step(loss_fn, optimizer):
    """step((params, opt_state), images, labels, key, index) -> ((params, opt_state), loss)."""

    def step(state, images, labels, key, index):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(
            params, images, labels, jax.random.fold_in(key, index)
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("diffusion", "classifier"), default="diffusion")
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


def time_steps(jitted, state, inputs, args) -> tuple[float, float, float]:
    """(first call s, mean s per timed step, last loss): the first call (compilation included),
    `args.warmup - 1` more untimed steps, then `args.steps` timed ones."""
    start = time.perf_counter()
    state, loss = jitted(state, *inputs, 0)
    jax.block_until_ready(loss)
    first_call = time.perf_counter() - start
    for i in range(1, args.warmup):
        state, loss = jitted(state, *inputs, i)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(args.steps):
        state, loss = jitted(state, *inputs, args.warmup + i)
    jax.block_until_ready((state, loss))
    seconds = (time.perf_counter() - start) / args.steps
    loss = float(loss)
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
    model, diffusion = common.build_model(config, dtype=args.dtype, attention_impl=attention_impl)
    class_cond = model.num_classes is not None
    if args.kind == "diffusion":
        net = model.clone(remat=args.remat)
    else:
        net = common.build_classifier(config, dtype=args.dtype, attention_impl=attention_impl)
    size = int(net.image_size)
    abstract = factory.abstract_variables(net)["params"]
    n_params = factory.param_count(net)

    lr, weight_decay = OPTIM[args.kind]
    optimizer = optax.adamw(lr, weight_decay=weight_decay)
    step = make_step(make_loss(args.kind, net, diffusion, class_cond), optimizer)
    # Parameters and optimizer state are donated: XLA updates them in place, as a real loop does.
    # The production training step's compile options (gdiff/xla_options.py; none off the CPU).
    jitted = jax.jit(
        step,
        in_shardings=(rep, rows, rows, rep, rep),
        out_shardings=(rep, rep),
        donate_argnums=0,
        compiler_options=xla_options.compiler_options(),
    )

    params = common.random_variables(abstract, jax.random.key(0), rep)
    opt_state = jax.jit(optimizer.init, out_shardings=rep)(params)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32), rows)
    labels = jax.device_put(rng.integers(0, NUM_CLASSES, batch).astype(np.int32), rows)
    key = jax.device_put(jax.random.key(1), rep)
    state = (params, opt_state)

    flops_per_step = common.cost_flops(jitted.lower(state, images, labels, key, 0))
    first_call, seconds, loss = time_steps(jitted, state, (images, labels, key), args)

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
        "optimizer": f"adamw lr={lr} weight_decay={weight_decay}",
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
