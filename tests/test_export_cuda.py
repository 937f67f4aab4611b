"""The GPU program, checked from a CPU: `jax.export` for platform "cuda" of the production guided
sampler and of one training step of the released 64x64 model and classifier.

The programs are built by the production code: `gdiff.sampling.sampler.build_sampler` on the groups
of configs/released/imagenet64.py (what `--mode=sample` and benchmarks/bench_sampling.py run), and
`diffusion_trainer.build_task`'s step jitted as `train/runner.py` jits it (replicated state donated,
batch sharded). "auto" attention is resolved for "cuda" (`platform=` of `build_sampler`;
`factory.target_platform` around the trainer, which builds its own model). Parameters are abstract
(`jax.eval_shape`): nothing is allocated or compiled. Batch 2; DDIM 4 steps (the chain is one
scan, whose body is the same for any length).

Stubbed, and nothing else: `jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version`, which
JAX's cuDNN attention rule calls while tracing to ask the CUDA plugin for cuDNN's version (a
CPU-only jaxlib has none: "cuDNN is not detected"). It answers 9.8.0. The rule's other checks
(dtypes, head dims, layouts, sequence lengths) run as they do on a GPU; its compute-capability
checks answer "before Hopper" off a GPU, the stricter limits.

Both programs use a one-device mesh: over several devices JAX partitions cuDNN attention with
`custom_partitioning`, whose partitioner is a Python callback that runs while XLA compiles (not
inside the program) and that `jax.export` refuses to serialise.

The float32 convolutions allowed: the UNet's output head `out_2` (3x3, 192 -> 6 channels), which
the reference keeps in float32 under fp16 (its `convert_to_fp16` converts only the input, middle
and output blocks); its forward when sampling, and in training also its two gradients. The
classifier's head (GroupNorm, SiLU, attention pool) has no convolution.

Measured on the 2-core CPU (`time JAX_PLATFORMS=cpu python -m pytest -q tests/test_export_cuda.py`):
15-23 s in pytest, 17-25 s wall, with other work on the machine; building and exporting the training
step is the larger half (about 13 s).
"""

import collections
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.cudnn import fused_attention_stablehlo

from configs.released import imagenet64
from gdiff import distributed, factory
from gdiff.sampling import sampler as sampler_lib
from gdiff.train import diffusion_trainer, optim, runner
from gdiff.train import state as state_lib

PLATFORM = "cuda"
CUDNN_FWD = "__cudnn$fmhaSoftmax"
CUDNN_BWD = "__cudnn$fmhaSoftmaxBackward"
# cuDNN's custom calls carry no export compatibility guarantee; allow these two by name only.
CUDNN_CHECKS = [jax.export.DisabledSafetyCheck.custom_call(n) for n in (CUDNN_FWD, CUDNN_BWD)]
# What a program that leaves the device would contain.
HOST_MARKERS = (
    "xla_python_cpu_callback",
    "xla_python_gpu_callback",
    "xla_ffi_python",
    "callback",
    "infeed",
    "outfeed",
    "stablehlo.send",
    "stablehlo.recv",
)
# The one float32 convolution kernel (see the module docstring).
OUT_HEAD_KERNEL = "tensor<3x3x192x6xf32>"
# The 64x64 ADM: attention at 32, 16, 8 px = levels 1-3 of 4, 3 res blocks per level, so 9 in the
# input blocks, 1 in the middle, 12 in the output blocks (4 per level). The classifier (depth 4):
# 12 in its input blocks, 1 in the middle, plus the attention pool.
MODEL_ATTENTION = 22
CLASSIFIER_ATTENTION = 14
BATCH = 2


@pytest.fixture(scope="module")
def cudnn_version():
    """The one stub: cuDNN's version, which the attention rule reads from the CUDA plugin."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
        yield


def _custom_calls(text: str) -> collections.Counter:
    return collections.Counter(re.findall(r"stablehlo\.custom_call @([\w$.]+)\(", text))


def _float32_convolutions(text: str) -> list[str]:
    """The operand/result types of every convolution with a float32 operand."""
    types = [
        line.rsplit(" : ", 1)[-1] for line in text.splitlines() if "stablehlo.convolution" in line
    ]
    return [t.split(" loc(")[0] for t in types if "xf32>" in t]


def _attention_modules(params) -> int:
    """Attention blocks and pools in a parameter tree (one `qkv` / `qkv_proj` projection each)."""
    if not isinstance(params, dict):
        return 0
    own = int("qkv" in params or "qkv_proj" in params)
    return own + sum(_attention_modules(v) for v in params.values())


def _main_arguments(text: str) -> list[tuple[str, str]]:
    """(type and attributes, location name) of each argument of the exported `main`."""
    main = next(line for line in text.splitlines() if "func.func public @main(" in line)
    chunks = re.split(r"%arg\d+: ", main.split(") -> (")[0])[1:]
    return [(c, re.search(r'loc\("([^"]+)"\)', c).group(1)) for c in chunks]


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


@pytest.fixture(scope="module")
def sampling(cudnn_version):
    """The exported guided DDIM sampler of configs/released/imagenet64.py, and its networks."""
    config = imagenet64.get_config()
    config.sample.timestep_respacing = "ddim4"
    config.sample.use_ddim = True
    groups = {name: config[name] for name in ("model", "diffusion", "classifier", "sample")}
    mesh = distributed.data_mesh(jax.devices()[:1])
    sampler, model, classifier = sampler_lib.build_sampler(
        groups, guided=True, mesh=mesh, platform=PLATFORM
    )
    rep, rows = distributed.replicated(mesh), distributed.batch_sharding(mesh)
    model_vars = _abstract(factory.abstract_variables(model), rep)
    classifier_vars = _abstract(factory.abstract_variables(classifier), rep)
    batch = {
        "ids": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=rows),
        "labels": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=rows),
        "scales": jax.ShapeDtypeStruct((BATCH,), jnp.float32, sharding=rows),
    }
    exported = sampler.export(
        model_vars, classifier_vars, batch, platforms=(PLATFORM,), disabled_checks=CUDNN_CHECKS
    )
    return {
        "text": exported.mlir_module(),
        "model": model,
        "classifier": classifier,
        "model_vars": model_vars,
        "classifier_vars": classifier_vars,
        "steps": sampler.diffusion.num_timesteps,
    }


def test_sampler_networks_are_bfloat16_with_cudnn_attention(sampling):
    """The README's use_fp16 / classifier_use_fp16 give bfloat16 networks; "auto" gives cuDNN."""
    for net in (sampling["model"], sampling["classifier"]):
        assert net.dtype == jnp.bfloat16 and net.attention_impl == "cudnn"
    assert sampling["steps"] == 4


def test_sampler_runs_every_attention_on_cudnn(sampling):
    """Each scan step: the UNet forward and the guidance gradient (classifier forward and
    backward), every attention of both as a cuDNN fused-attention call."""
    model = _attention_modules(sampling["model_vars"]["params"])
    classifier = _attention_modules(sampling["classifier_vars"]["params"])
    assert (model, classifier) == (MODEL_ATTENTION, CLASSIFIER_ATTENTION)
    calls = _custom_calls(sampling["text"])
    assert calls[CUDNN_FWD] == model + classifier
    assert calls[CUDNN_BWD] == classifier


def test_sampler_float32_convolutions_are_the_output_head(sampling):
    convs = _float32_convolutions(sampling["text"])
    assert convs == [
        f"(tensor<{BATCH}x64x64x192xf32>, {OUT_HEAD_KERNEL}) -> tensor<{BATCH}x64x64x6xf32>"
    ]


def test_sampler_is_one_device_loop_without_host_calls(sampling):
    text = sampling["text"]
    assert text.count("stablehlo.while") == 1  # the scanned reverse chain
    assert {m: text.count(m) for m in HOST_MARKERS if m in text} == {}
    assert set(_custom_calls(text)) == {CUDNN_FWD, CUDNN_BWD}


@pytest.fixture(scope="module")
def training(cudnn_version):
    """One exported training step of configs/released/imagenet64.py, jitted as the runner does."""
    config = imagenet64.get_config()
    config.train.batch_size = BATCH
    mesh = distributed.data_mesh(jax.devices()[:1])
    with factory.target_platform(PLATFORM):
        task = diffusion_trainer.build_task(config, mesh)
    repl, batch_sh = distributed.replicated(mesh), distributed.batch_sharding(mesh)
    tx = optim.create_optimizer(config.optim)
    key = jax.random.key(config.seed)

    def init_state():
        return state_lib.create(
            task.init_params(key), tx, rng=key, ema_rates=task.ema_rates,
            sampler_state=task.sampler_state,
        )  # fmt: skip

    state = runner.abstract_with_sharding(jax.eval_shape(init_state), repl)
    # As train/runner.py's _start jits it: the state is donated.
    step = jax.jit(
        task.train_step,
        in_shardings=(repl, batch_sh),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
    batch = {
        "image": jax.ShapeDtypeStruct((BATCH, 64, 64, 3), jnp.float32, sharding=batch_sh),
        "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=batch_sh),
    }
    exported = jax.export.export(step, platforms=(PLATFORM,), disabled_checks=CUDNN_CHECKS)
    exported = exported(state, batch)
    paths = [
        f"state{jax.tree_util.keystr(p)}" for p, _ in jax.tree_util.tree_leaves_with_path(state)
    ]
    return {"text": exported.mlir_module(), "state_paths": paths, "params": state.params}


def test_train_step_donates_the_state(training):
    """Every state array the step reads is aliased to its output (updated in place); the one
    it does not read, the injected learning rate (set from the step each step), jit drops."""
    args = _main_arguments(training["text"])
    state_args = {name: attrs for attrs, name in args if name.startswith("state")}
    assert {name for attrs, name in args if not name.startswith("state")} == {
        "batch['image']",
        "batch['label']",
    }
    assert [n for n, attrs in state_args.items() if "tf.aliasing_output" not in attrs] == []
    dropped = set(training["state_paths"]) - set(state_args)
    assert dropped == {"state.opt_state.hyperparams['learning_rate']"}
    assert len(state_args) == len(training["state_paths"]) - 1 > 2000


def test_train_step_attention_convolutions_and_host(training):
    text = training["text"]
    calls = _custom_calls(text)
    blocks = _attention_modules(training["params"])
    assert blocks == MODEL_ATTENTION
    assert calls == {CUDNN_FWD: blocks, CUDNN_BWD: blocks}
    # The output head's forward, and its gradients to the kernel and to the input.
    convs = _float32_convolutions(text)
    # The input gradient's kernel is the head's flipped, with its features exchanged
    # (gdiff/models/conv.py), hence 6x192.
    head = (OUT_HEAD_KERNEL, OUT_HEAD_KERNEL.replace("192x6", "6x192"))
    assert len(convs) == 3 and all(any(k in c for k in head) for c in convs), convs
    # The metrics leave as outputs of the step; nothing is sent to the host inside it.
    assert {m: text.count(m) for m in HOST_MARKERS if m in text} == {}
    assert text.count("stablehlo.while") == 0
