"""Networks and diffusions from typed configuration values: the one place that builds them.

`build_model`, `build_classifier` and `build_diffusion` read the `model`, `classifier` and
`diffusion` groups of a gdiff config (configs/common.py). Each group is a mapping of typed values
(sizes, tuples, dtype names), so the same functions serve an ml_collections group and the plain
dict that the reference-compatible adapter (`gdiff.compat.openai`) assembles from the reference's
keyword arguments: both end in `unet_from_group` / `classifier_from_group` / `diffusion_from_group`,
for any image size.
"""

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from gdiff import diffusion as diffusion_lib
from gdiff import errors
from gdiff.models import unet

# The reference's channel multipliers per resolution (`script_util.create_model` and
# `create_classifier`); sizes outside the table need an explicit `channel_mult`.
CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
# `sr_create_model` uses the 256 table for 512 too, and has none for 128.
SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
DTYPES = ("float32", "bfloat16")
# `model.attention_impl` / `classifier.attention_impl`: "auto" takes cuDNN's fused attention where
# it can run (a CUDA GPU and a 16-bit compute dtype: the kernel rejects float32) and XLA's
# everywhere else; "xla" and "cudnn" force one (a forced "cudnn" that cannot run is an error).
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# The platform "auto" resolves for while `target_platform` is active (None: the running backend).
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gdiff_target_platform", default=None
)


def compute_dtype(name: str) -> Any:
    """ "float32" | "bfloat16" -> the scalar type a module's `dtype` attribute takes."""
    if name not in DTYPES:
        raise errors.ConfigError(f"compute dtype must be one of {DTYPES}; got {name!r}")
    return getattr(jnp, name)


def runtime_platform() -> str:
    """The platform this process runs programs on, in `jax.export`'s names: "cpu", "tpu",
    "cuda" or "rocm" (`jax.default_backend()` says "gpu" for both of the last two)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = jax.extend.backend.get_backend().platform_version.lower()
    return "cuda" if "cuda" in version else "rocm"


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Networks built inside resolve `attention_impl="auto"` for `platform` (e.g. "cuda")
    instead of for the backend this process runs on: how a GPU program is built and exported
    from a CPU (tests/test_export_cuda.py) through the same code paths as on the GPU."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def resolve_attention_impl(
    choice: str, dtype: str, platform: str | None = None, *, key: str = "attention_impl"
) -> str:
    """The attention implementation a network is built with: "xla" or "cudnn".

    Args:
      choice: "auto" | "xla" | "cudnn" (the config's `<group>.attention_impl`).
      dtype: the network's compute dtype name (`<group>.dtype`).
      platform: the platform the program is for ("cpu", "cuda", ...); None: the one set by
        `target_platform`, else the running backend (`runtime_platform()`).
      key: the config key `choice` came from, named in errors.

    Raises:
      errors.ConfigError (a ValueError): an unknown choice, or "cudnn" where it cannot run (not
        a CUDA platform, or a compute dtype that is not 16-bit), naming the key, the dtype and
        the platform.
    """
    if choice not in ATTENTION_IMPLS:
        raise errors.ConfigError(f"{key} must be one of {ATTENTION_IMPLS}; got {choice!r}")
    platform = platform or _TARGET_PLATFORM.get() or runtime_platform()
    # cuDNN's fused attention is an NVIDIA kernel for fp16/bf16 inputs only.
    cudnn_runs = platform == "cuda" and jnp.dtype(dtype).itemsize == 2
    if choice == "auto":
        return "cudnn" if cudnn_runs else "xla"
    if choice == "cudnn" and not cudnn_runs:
        raise errors.ConfigError(
            f"{key}='cudnn' cannot run here: cuDNN fused attention needs a CUDA GPU and a 16-bit "
            f"compute dtype, and this network computes in {dtype} on platform {platform!r}; "
            f"use 'auto' (cuDNN where it runs, XLA elsewhere) or 'xla'"
        )
    return choice


def attention_rates(resolutions, image_size: int) -> tuple[int, ...]:
    """Attention resolutions in pixels (e.g. (32, 16, 8)) -> downsample rates, as the reference
    converts its `attention_resolutions` flag."""
    return tuple(image_size // int(r) for r in resolutions)


def channel_mult(explicit, image_size: int, *, super_res: bool = False) -> tuple:
    """`explicit` when given, else the reference's multipliers for `image_size`."""
    if explicit:
        return tuple(explicit)
    table = SR_CHANNEL_MULT if super_res else CHANNEL_MULT
    if image_size not in table:
        what = "super-resolution large size" if super_res else "image size"
        raise errors.ConfigError(
            f"unsupported {what}: {image_size} (the reference has channel multipliers for "
            f"{sorted(table)} only; give channel_mult explicitly)"
        )
    return table[image_size]


def _shared_fields(
    group: Mapping[str, Any],
    image_size: int,
    *,
    name: str,
    platform: str | None,
    super_res: bool = False,
) -> dict:
    """The attributes the UNet and the classifier read alike from their groups (`name`: the
    group's name in a config, for errors)."""
    dtype = compute_dtype(group["dtype"])
    key = f"{name}.attention_impl"
    attention_impl = resolve_attention_impl(
        str(group["attention_impl"]), group["dtype"], platform, key=key
    )
    return dict(
        image_size=image_size,
        in_channels=3,
        attention_resolutions=attention_rates(group["attention_resolutions"], image_size),
        channel_mult=channel_mult(group["channel_mult"], image_size, super_res=super_res),
        num_head_channels=int(group["num_head_channels"]),
        use_scale_shift_norm=bool(group["use_scale_shift_norm"]),
        resblock_updown=bool(group["resblock_updown"]),
        dtype=dtype,
        attention_impl=attention_impl,
    )


def class_dropout(m: Mapping[str, Any]) -> float:
    """`model.class_dropout` of a `model` group, checked: the probability that training replaces
    a label by the null class (classifier-free guidance). A group without the key (the reference
    adapter's, or one recorded before the key existed) has 0.

    Raises:
      errors.ConfigError: outside [0, 1), or > 0 on an unconditional model (class_cond False).
    """
    p = float(m.get("class_dropout", 0.0))
    if not 0.0 <= p < 1.0:  # also refuses NaN; 1 would never train the real labels
        raise errors.ConfigError(f"model.class_dropout must be in [0, 1); got {p}")
    if p > 0 and not m["class_cond"]:
        raise errors.ConfigError(
            f"model.class_dropout={p} needs a class-conditional model (model.class_cond=True): "
            "an unconditional model has no labels to drop; set model.class_dropout=0"
        )
    return p


def null_label(m: Mapping[str, Any]) -> int | None:
    """The null label of a `model` group's network: `num_classes` (its extra `label_emb` row,
    "no class", what classifier-free guidance conditions the unconditional half on) when the
    group trains one (`class_dropout > 0`), else None (no such label exists)."""
    return int(m["num_classes"]) if class_dropout(m) > 0 else None


def recorded_model_group(m: Mapping[str, Any]) -> dict:
    """The `model` group as training checkpoints (their settings) and run manifests record it: a
    plain dict, without `class_dropout` when it is 0, so a model without a null class records
    what it did before the key existed and the runs and checkpoints made then still match."""
    values = m.to_dict() if hasattr(m, "to_dict") else dict(m)
    if class_dropout(values) == 0:
        values.pop("class_dropout", None)
    return values


def unet_from_group(m: Mapping[str, Any], *, platform: str | None = None) -> unet.UNetModel:
    """The diffusion network of a `model` group: a UNetModel, or a SuperResModel when
    `small_size > 0` (then `image_size` is the large size), with a null class (`null_label`)
    when `class_dropout > 0`. Keys: see configs/common.py.
    `platform`: what `attention_impl` resolves for (see `resolve_attention_impl`)."""
    super_res = int(m["small_size"]) > 0
    cls = unet.SuperResModel if super_res else unet.UNetModel
    fields = _shared_fields(
        m, int(m["image_size"]), name="model", platform=platform, super_res=super_res
    )
    return cls(
        **fields,
        model_channels=int(m["num_channels"]),
        out_channels=6 if m["learn_sigma"] else 3,
        num_res_blocks=int(m["num_res_blocks"]),
        dropout=float(m["dropout"]),
        num_classes=int(m["num_classes"]) if m["class_cond"] else None,
        null_class=null_label(m) is not None,
        remat=unet.check_remat(str(m["remat"])),
        num_heads=int(m["num_heads"]),
        num_heads_upsample=int(m["num_heads_upsample"]),
        use_new_attention_order=bool(m["use_new_attention_order"]),
    )


def classifier_from_group(
    c: Mapping[str, Any], image_size: int, *, platform: str | None = None
) -> unet.EncoderUNetModel:
    """The noise-aware classifier of a `classifier` group at `image_size` (the reference's
    `create_classifier`, with its channel-multiplier table unless `channel_mult` is given).
    `platform`: what `attention_impl` resolves for (see `resolve_attention_impl`)."""
    return unet.EncoderUNetModel(
        **_shared_fields(c, int(image_size), name="classifier", platform=platform),
        model_channels=int(c["width"]),
        out_channels=int(c["num_classes"]),
        num_res_blocks=int(c["depth"]),
        pool=str(c["pool"]),
    )


def diffusion_from_group(d: Mapping[str, Any], *, learn_sigma: bool, timestep_respacing: str):
    """The (respaced) Gaussian diffusion of a `diffusion` group; `learn_sigma` is the model's."""
    return diffusion_lib.create_gaussian_diffusion(
        steps=int(d["steps"]),
        learn_sigma=bool(learn_sigma),
        sigma_small=bool(d["sigma_small"]),
        noise_schedule=str(d["noise_schedule"]),
        use_kl=bool(d["use_kl"]),
        predict_xstart=bool(d["predict_xstart"]),
        rescale_timesteps=bool(d["rescale_timesteps"]),
        rescale_learned_sigmas=bool(d["rescale_learned_sigmas"]),
        timestep_respacing=str(timestep_respacing or ""),
    )


def build_model(config, *, platform: str | None = None) -> unet.UNetModel:
    """The diffusion network of `config.model` (`platform`: see `unet_from_group`)."""
    return unet_from_group(config.model, platform=platform)


def build_classifier(config, *, platform: str | None = None) -> unet.EncoderUNetModel:
    """The noise-aware classifier of `config.classifier`, at the data's image size."""
    return classifier_from_group(config.classifier, int(config.data.image_size), platform=platform)


def check_respacing(steps: int, respacing: str, key: str) -> None:
    """Refuses a timestep respacing that cannot respace `steps` training steps, naming the config
    key that set it (e.g. "sample.timestep_respacing"). Jobs call it before anything is written:
    a respacing that fails after run.json pinned it would make the corrected rerun be refused.

    Raises:
      errors.ConfigError: why it cannot be used, with examples of ones that can.
    """
    if not respacing:
        return
    try:
        kept = diffusion_lib.space_timesteps(steps, respacing)
    except ValueError as e:
        raise errors.ConfigError(
            f"{key}={respacing!r} cannot respace the {steps} steps of diffusion.steps ({e}); use "
            f"e.g. '{min(steps, 250)}', a comma list of per-section counts, or 'ddimN' with N "
            "steps at an integer stride"
        ) from None
    if not kept:
        raise errors.ConfigError(
            f"{key}={respacing!r} keeps none of the {steps} steps of diffusion.steps; give at "
            "least one step"
        )


def build_diffusion(config, timestep_respacing: str | None = None):
    """The diffusion of `config.diffusion`; `timestep_respacing` (e.g. "250", "ddim25") overrides
    the group's own, None keeps it."""
    d = config.diffusion
    respacing = d.timestep_respacing if timestep_respacing is None else timestep_respacing
    return diffusion_from_group(
        d, learn_sigma=bool(config.model.learn_sigma), timestep_respacing=respacing
    )


def init_variables(module: nn.Module, rng, *, image_size: int | None = None, batch: int = 1):
    """Freshly initialised variables `{"params": ...}` for `module` (jitted init).

    Args:
      module: a UNetModel, SuperResModel or EncoderUNetModel.
      rng: a `jax.random.key`.
      image_size: the input size to trace with (default: the module's own `image_size`).
      batch: the dummy batch size (parameters do not depend on it).
    """
    args, kwargs = unet.example_inputs(module, batch=batch, image_size=image_size)
    return jax.jit(lambda r: module.init(r, *args, **kwargs))(rng)


def abstract_variables(module: nn.Module, *, image_size: int | None = None):
    """Shapes and dtypes of `init_variables(...)` (ShapeDtypeStructs; nothing is allocated)."""
    args, kwargs = unet.example_inputs(module, image_size=image_size)
    return jax.eval_shape(lambda r: module.init(r, *args, **kwargs), jax.random.key(0))


def param_count(module: nn.Module, *, image_size: int | None = None) -> int:
    """Number of parameters of `module`, computed with `jax.eval_shape` (no allocation)."""
    variables = abstract_variables(module, image_size=image_size)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))
