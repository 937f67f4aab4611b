"""What XLA reaches on the ADM's building blocks: the probe of ../shared/bench/xla_probe_h100.json.

    python benchmarks/bench_ops.py [--batch 256] [--tiny] [--out benchmarks/logs/ops.json]

Rows (bf16 compute, NHWC, weights bf16, GroupNorm statistics in float32):
  - the bf16 matmul peak (8192^3 on accelerators): the yardstick every other row is a fraction of;
  - 4x conv3x3 at the UNet's four resolutions (64x64x192, 32x32x384, 16x16x576, 8x8x768 at the
    64x64 model's widths): what the convolutions alone reach;
  - 4x (GroupNorm + SiLU + conv3x3 + residual), written naively as the model does: the cost of the
    normalisation glue around the convolutions;
  - self-attention, 1024 tokens, 6 heads x 64 (the 64x64 model's 32x32 level) through the
    networks' own `gdiff.models.attention.qkv_attention` (packed bf16 qkv, the new head order),
    implementation "xla" and "cudnn"; a "cudnn" row where the config policy
    (`gdiff.factory.resolve_attention_impl`) says it cannot run records that reason instead.
TFLOP/s count only the convolutions' / attention products' multiply-adds (2 FLOPs each), as the
reference probe did; XLA's own count of the whole program is recorded next to it.
"""

from __future__ import annotations

import argparse
import functools

import common
import jax
import jax.numpy as jnp

from gdiff import factory
from gdiff.models import attention

# (spatial size, channels) of the four levels of the 64x64 ADM; the tiny set keeps CPU CI fast.
LEVELS = ((64, 192), (32, 384), (16, 576), (8, 768))
TINY_LEVELS = ((16, 32), (8, 64))
NUM_GROUPS = 32


def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """[B, H, W, C] x [3, 3, C, C] -> [B, H, W, C], padded by one pixel."""
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Naive GroupNorm with float32 statistics (as the models compute it), cast back to x.dtype."""
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, h, w, NUM_GROUPS, c // NUM_GROUPS)
    mean = xf.mean(axis=(1, 2, 4), keepdims=True)
    var = xf.var(axis=(1, 2, 4), keepdims=True)
    xf = ((xf - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(b, h, w, c)
    return (xf * scale + bias).astype(x.dtype)


def conv_chain(x, weights):
    for w in weights:
        x = conv3x3(x, w)
    return x


def block_chain(x, weights, scales, biases):
    for w, s, b in zip(weights, scales, biases, strict=True):
        x = x + conv3x3(jax.nn.silu(group_norm(x, s, b)), w)
    return x


def bench_level(batch: int, size: int, channels: int, iters: int, peak: float) -> list[dict]:
    keys = jax.random.split(jax.random.key(size), 5)
    x = jax.random.normal(keys[0], (batch, size, size, channels), jnp.bfloat16)
    weights = [
        (
            jax.random.normal(k, (3, 3, channels, channels), jnp.float32) / (3 * channels**0.5)
        ).astype(jnp.bfloat16)
        for k in keys[1:]
    ]
    scales = [jnp.ones((channels,), jnp.float32)] * 4
    biases = [jnp.zeros((channels,), jnp.float32)] * 4
    conv_flops = 4 * 2.0 * batch * size * size * channels * channels * 9
    rows = []
    for label, fn, args in (
        ("4x conv3x3", conv_chain, (x, weights)),
        ("4x GN+SiLU+conv3x3+res", block_chain, (x, weights, scales, biases)),
    ):
        jitted = jax.jit(fn)
        xla_flops = common.cost_flops(jitted.lower(*args))
        seconds = common.time_pipelined(functools.partial(jitted, *args), iters=iters)
        tflops = conv_flops / seconds / 1e12
        rows.append(
            {
                "op": f"{label} {size}x{size}x{channels} b{batch}",
                "tflops": float(f"{tflops:.4g}"),  # 4 digits: tiny CPU rows are ~1e-4
                "pct_of_matmul": round(100 * tflops / peak, 1),
                "ms": round(seconds * 1e3, 4),
                "conv_flops": conv_flops,
                "xla_flops": xla_flops,
            }
        )
    return rows


def bench_attention(batch: int, tokens: int, heads: int, head_dim: int, iters: int, peak: float):
    qkv = jax.random.normal(jax.random.key(1), (batch, tokens, 3 * heads * head_dim), jnp.bfloat16)
    flops = 4.0 * batch * heads * tokens * tokens * head_dim  # QK^T and PV
    rows = []
    for impl in ("xla", "cudnn"):
        op = f"attention {tokens} tok {heads}x{head_dim} b{batch} {impl}"
        jitted = jax.jit(
            functools.partial(
                attention.qkv_attention, num_heads=heads, new_order=True, implementation=impl
            )
        )
        try:
            factory.resolve_attention_impl(impl, "bfloat16", key="attention")
            seconds = common.time_pipelined(lambda j=jitted: j(qkv), iters=iters)
        except Exception as err:  # noqa: BLE001 - cuDNN is absent off NVIDIA GPUs; say so
            rows.append({"op": op, "tflops": None, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        tflops = flops / seconds / 1e12
        rows.append(
            {
                "op": op,
                "tflops": float(f"{tflops:.4g}"),  # 4 digits: tiny CPU rows are ~1e-4
                "pct_of_matmul": round(100 * tflops / peak, 1),
                "ms": round(seconds * 1e3, 4),
            }
        )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="default 256 (tiny: 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per op")
    parser.add_argument("--matmul-n", type=int, default=None, help="default 8192 on GPU/TPU")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes for CI")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)

    batch = args.batch if args.batch is not None else (2 if args.tiny else 256)
    if batch <= 0:
        raise ValueError(f"--batch must be positive; got {batch}")
    iters = args.iters if args.iters is not None else (2 if args.tiny else 20)
    n = args.matmul_n if args.matmul_n is not None else common.default_matmul_size(args.tiny)

    peak = common.matmul_peak_tflops(n, iters=iters)
    rows = [{"op": f"matmul {n}^3 bf16", "tflops": round(peak, 3)}]
    for size, channels in TINY_LEVELS if args.tiny else LEVELS:
        rows += bench_level(batch, size, channels, iters, peak)
    tokens, heads = (64, 2) if args.tiny else (1024, 6)
    rows += bench_attention(batch, tokens, heads, 16 if args.tiny else 64, iters, peak)

    record = {
        "benchmark": "ops",
        "tiny": args.tiny,
        "batch": batch,
        "matmul_peak_tflops": round(peak, 3),
        "rows": rows,
        "env": common.environment(),
    }
    common.emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
