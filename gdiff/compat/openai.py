"""The reference-compatible front door: OpenAI guided-diffusion's `script_util` names, in Flax.

Someone holding a released checkpoint and its `MODEL_FLAGS` string does

    kw = parse_flags(MODEL_FLAGS + " " + DIFFUSION_FLAGS)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **kw})
    variables = convert_state_dict(model, load_torch_state_dict("256x256_diffusion.pt"))

Same keyword names and defaults as the reference; an unknown or missing key raises `TypeError`
naming every offender. Extra optional keywords everywhere a network is built: `num_classes`
(default 1000, the reference's hard-coded ImageNet), `dtype` (compute dtype; `use_fp16=True`
selects bfloat16 when `dtype` is not given) and `attention_impl` (None | "xla" | "cudnn").

The diffusion and evaluation names are re-exported lazily so this module imports on its own.
"""

import shlex
from typing import Any

import jax.numpy as jnp

from gdiff.compat.convert import convert_state_dict
from gdiff.compat.torch_checkpoint import load_torch_state_dict
from gdiff.models import unet

NUM_CLASSES = 1000
_EXTRA_DEFAULTS = {"num_classes": NUM_CLASSES, "dtype": None, "attention_impl": None}

_DIFFUSION_NAMES = (
    "classifier_cond_fn",
    "get_named_beta_schedule",
    "space_timesteps",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "approx_standard_normal_cdf",
)
_EVALUATION_NAMES = (
    "create_fid_inception",
    "convert_fid_inception_state_dict",
    "load_fid_inception_graph_def",
    "fid_inception_features",
    "frechet_distance",
    "inception_score",
    "precision_recall",
)

__all__ = [
    "NUM_CLASSES",
    "classifier_and_diffusion_defaults",
    "classifier_defaults",
    "convert_state_dict",
    "create_classifier",
    "create_classifier_and_diffusion",
    "create_gaussian_diffusion",
    "create_model",
    "create_model_and_diffusion",
    "diffusion_defaults",
    "load_torch_state_dict",
    "model_and_diffusion_defaults",
    "parse_flags",
    "sr_create_model",
    "sr_create_model_and_diffusion",
    "sr_model_and_diffusion_defaults",
    *_DIFFUSION_NAMES,
    *_EVALUATION_NAMES,
]


def __getattr__(name: str) -> Any:
    # Lazy re-exports: the diffusion core and the evaluator live in other packages (and the
    # evaluator pulls in heavier code); importing them on first use keeps this module standalone.
    if name in _DIFFUSION_NAMES:
        import gdiff.diffusion

        return getattr(gdiff.diffusion, name)
    if name in _EVALUATION_NAMES:
        import gdiff.evaluation

        return getattr(gdiff.evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- defaults


def diffusion_defaults() -> dict:
    """The reference's diffusion flags and defaults."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults() -> dict:
    """The reference's classifier flags and defaults."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )


def model_and_diffusion_defaults() -> dict:
    """The reference's model + diffusion flags and defaults."""
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults() -> dict:
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


_SR_KEYS = (
    "large_size",
    "small_size",
    "class_cond",
    "learn_sigma",
    "num_channels",
    "num_res_blocks",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "attention_resolutions",
    "dropout",
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
    "use_checkpoint",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_fp16",
)


def sr_model_and_diffusion_defaults() -> dict:
    """The reference's super-resolution flags: the model defaults plus large/small size."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    return {k: res[k] for k in _SR_KEYS}


# ----------------------------------------------------------------------------- argument checks


def _bind(fn: str, order: tuple, defaults: dict, args: tuple, kwargs: dict) -> dict:
    """Binds reference-style arguments, raising one TypeError naming every bad key.

    `order` lists the reference's parameters in positional order; those absent from `defaults`
    are required. The extras (`num_classes`, `dtype`, `attention_impl`) are keyword-only.
    """
    if len(args) > len(order):
        raise TypeError(f"{fn}() takes at most {len(order)} positional arguments, got {len(args)}")
    bound = dict(zip(order, args, strict=False))
    twice = sorted(set(bound) & set(kwargs))
    unknown = sorted(k for k in kwargs if k not in order and k not in _EXTRA_DEFAULTS)
    bound.update(kwargs)
    missing = [k for k in order if k not in bound and k not in defaults]
    problems = []
    if unknown:
        problems.append(f"unknown argument(s) {unknown}")
    if missing:
        problems.append(f"missing argument(s) {missing}")
    if twice:
        problems.append(f"argument(s) given twice {twice}")
    if problems:
        raise TypeError(f"{fn}(): " + "; ".join(problems))
    return {**_EXTRA_DEFAULTS, **defaults, **bound}


def _dtype(dtype, use_fp16: bool):
    """The compute dtype: explicit `dtype` wins; else the reference's fp16 maps to bfloat16."""
    if dtype is None:
        return jnp.bfloat16 if use_fp16 else jnp.float32
    return jnp.dtype(dtype).type


def _attention_ds(resolutions: str, image_size: int) -> tuple[int, ...]:
    """ "32,16,8" (resolutions in pixels) -> downsample rates, as the reference converts them."""
    return tuple(image_size // int(r) for r in str(resolutions).split(",") if r.strip())


def _default_channel_mult(image_size: int) -> tuple:
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in table:
        raise ValueError(f"unsupported image size: {image_size} (give channel_mult explicitly)")
    return table[image_size]


def _diffusion_kwargs(kw: dict) -> dict:
    return dict(
        steps=kw["diffusion_steps"],
        learn_sigma=kw["learn_sigma"],
        noise_schedule=kw["noise_schedule"],
        use_kl=kw["use_kl"],
        predict_xstart=kw["predict_xstart"],
        rescale_timesteps=kw["rescale_timesteps"],
        rescale_learned_sigmas=kw["rescale_learned_sigmas"],
        timestep_respacing=kw["timestep_respacing"],
    )


# ----------------------------------------------------------------------------- factories


def create_gaussian_diffusion(**kwargs):
    """The reference's `create_gaussian_diffusion` (keyword-only), from `gdiff.diffusion`."""
    import gdiff.diffusion

    return gdiff.diffusion.create_gaussian_diffusion(**kwargs)


_CREATE_MODEL_ORDER = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "channel_mult",
    "learn_sigma",
    "class_cond",
    "use_checkpoint",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "dropout",
    "resblock_updown",
    "use_fp16",
    "use_new_attention_order",
)
_CREATE_MODEL_DEFAULTS = dict(
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
)


def _unet_fields(kw: dict, size: int, channel_mult: tuple[int, ...]) -> dict:
    """UNetModel attributes from bound reference keywords, as create_model / sr_create_model
    pass them to the reference's UNetModel / SuperResModel."""
    return dict(
        image_size=size,
        in_channels=3,
        model_channels=int(kw["num_channels"]),
        out_channels=6 if kw["learn_sigma"] else 3,
        num_res_blocks=int(kw["num_res_blocks"]),
        attention_resolutions=_attention_ds(kw["attention_resolutions"], size),
        dropout=float(kw["dropout"]),
        channel_mult=channel_mult,
        num_classes=int(kw["num_classes"]) if kw["class_cond"] else None,
        use_checkpoint=bool(kw["use_checkpoint"]),
        num_heads=int(kw["num_heads"]),
        num_head_channels=int(kw["num_head_channels"]),
        num_heads_upsample=int(kw["num_heads_upsample"]),
        use_scale_shift_norm=bool(kw["use_scale_shift_norm"]),
        resblock_updown=bool(kw["resblock_updown"]),
        dtype=_dtype(kw["dtype"], kw["use_fp16"]),
        attention_impl=kw["attention_impl"],
    )


def create_model(*args, **kwargs) -> unet.UNetModel:
    """The reference's `create_model(image_size, num_channels, num_res_blocks, ...)`.

    Returns a `UNetModel` (3 input channels; 6 outputs with learn_sigma; `num_classes` labels
    when class_cond).
    """
    kw = _bind("create_model", _CREATE_MODEL_ORDER, _CREATE_MODEL_DEFAULTS, args, kwargs)
    size = int(kw["image_size"])
    if kw["channel_mult"] == "":
        channel_mult = _default_channel_mult(size)
    elif isinstance(kw["channel_mult"], str):
        channel_mult = tuple(int(m) for m in kw["channel_mult"].split(","))
    else:
        channel_mult = tuple(kw["channel_mult"])
    return unet.UNetModel(
        **_unet_fields(kw, size, channel_mult),
        use_new_attention_order=bool(kw["use_new_attention_order"]),
    )


def create_model_and_diffusion(**kwargs):
    """The reference's `create_model_and_diffusion`: every key of model_and_diffusion_defaults()
    is required. Returns `(UNetModel, diffusion)`."""
    order = tuple(model_and_diffusion_defaults())
    kw = _bind("create_model_and_diffusion", order, {}, (), kwargs)
    model = create_model(**{k: kw[k] for k in _CREATE_MODEL_ORDER}, **_extras(kw))
    return model, create_gaussian_diffusion(**_diffusion_kwargs(kw))


def _extras(kw: dict) -> dict:
    return {k: kw[k] for k in _EXTRA_DEFAULTS}


_CLASSIFIER_ORDER = tuple(classifier_defaults())


def create_classifier(*args, **kwargs) -> unet.EncoderUNetModel:
    """The reference's `create_classifier(image_size, classifier_use_fp16, classifier_width,
    classifier_depth, classifier_attention_resolutions, classifier_use_scale_shift_norm,
    classifier_resblock_updown, classifier_pool)`: all required. Returns an EncoderUNetModel
    with 64 channels per attention head and `num_classes` (default 1000) logits."""
    kw = _bind("create_classifier", _CLASSIFIER_ORDER, {}, args, kwargs)
    size = int(kw["image_size"])
    return unet.EncoderUNetModel(
        image_size=size,
        in_channels=3,
        model_channels=int(kw["classifier_width"]),
        out_channels=int(kw["num_classes"]),
        num_res_blocks=int(kw["classifier_depth"]),
        attention_resolutions=_attention_ds(kw["classifier_attention_resolutions"], size),
        channel_mult=_default_channel_mult(size),
        num_head_channels=64,
        use_scale_shift_norm=bool(kw["classifier_use_scale_shift_norm"]),
        resblock_updown=bool(kw["classifier_resblock_updown"]),
        pool=str(kw["classifier_pool"]),
        dtype=_dtype(kw["dtype"], kw["classifier_use_fp16"]),
        attention_impl=kw["attention_impl"],
    )


def create_classifier_and_diffusion(**kwargs):
    """The reference's `create_classifier_and_diffusion` -> `(EncoderUNetModel, diffusion)`."""
    order = tuple(classifier_and_diffusion_defaults())
    kw = _bind("create_classifier_and_diffusion", order, {}, (), kwargs)
    classifier = create_classifier(**{k: kw[k] for k in _CLASSIFIER_ORDER}, **_extras(kw))
    return classifier, create_gaussian_diffusion(**_diffusion_kwargs(kw))


_SR_MODEL_ORDER = (
    "large_size",
    "small_size",
    "num_channels",
    "num_res_blocks",
    "learn_sigma",
    "class_cond",
    "use_checkpoint",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "dropout",
    "resblock_updown",
    "use_fp16",
)


def sr_create_model(*args, **kwargs) -> unet.SuperResModel:
    """The reference's `sr_create_model(large_size, small_size, ...)`: all required.

    Returns a SuperResModel at `large_size` (the reference uses the 256 channel multipliers for
    512 too, and has none for 128).
    """
    kw = _bind("sr_create_model", _SR_MODEL_ORDER, {}, args, kwargs)
    size = int(kw["large_size"])
    table = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
    if size not in table:
        raise ValueError(f"unsupported large size: {size}")
    # The reference's sr_create_model leaves use_new_attention_order at its default (False).
    return unet.SuperResModel(**_unet_fields(kw, size, table[size]))


def sr_create_model_and_diffusion(**kwargs):
    """The reference's `sr_create_model_and_diffusion` -> `(SuperResModel, diffusion)`."""
    kw = _bind("sr_create_model_and_diffusion", _SR_KEYS, {}, (), kwargs)
    model = sr_create_model(**{k: kw[k] for k in _SR_MODEL_ORDER}, **_extras(kw))
    return model, create_gaussian_diffusion(**_diffusion_kwargs(kw))


# ----------------------------------------------------------------------------- flags

# Flags of the reference's scripts (sample, train, super-res, classifier) beyond the model and
# diffusion keys, so whole MODEL_FLAGS / SAMPLE_FLAGS / TRAIN_FLAGS strings parse.
_SCRIPT_FLAG_DEFAULTS = dict(
    clip_denoised=True,
    num_samples=10000,
    batch_size=16,
    use_ddim=False,
    model_path="",
    classifier_path="",
    classifier_scale=1.0,
    base_samples="",
    data_dir="",
    val_data_dir="",
    noised=True,
    iterations=150000,
    lr=3e-4,
    weight_decay=0.0,
    anneal_lr=False,
    microbatch=-1,
    schedule_sampler="uniform",
    resume_checkpoint="",
    log_interval=10,
    eval_interval=5,
    save_interval=10000,
    ema_rate="0.9999",
    fp16_scale_growth=1e-3,
    sigma_small=False,
)


def all_flag_defaults() -> dict:
    """Every flag the reference's scripts accept, with its default (and hence its type)."""
    res = dict(_SCRIPT_FLAG_DEFAULTS)
    res.update(classifier_defaults())
    res.update(sr_model_and_diffusion_defaults())
    res.update(model_and_diffusion_defaults())
    return res


def _str2bool(name: str, value: str) -> bool:
    v = value.lower()
    if v in ("yes", "true", "t", "y", "1"):
        return True
    if v in ("no", "false", "f", "n", "0"):
        return False
    raise TypeError(f"flag --{name} expects a boolean (True/False/1/0), got {value!r}")


def parse_flags(flags: str | list[str], defaults: dict | None = None) -> dict:
    """Turns a reference flag string into typed keyword arguments.

    Args:
      flags: e.g. "--image_size 64 --class_cond True --attention_resolutions 32,16,8" (also
        `--key=value`), or an already split list of tokens.
      defaults: the flags allowed and their types (from each default value's type); by default
        every flag of the reference's scripts (`all_flag_defaults()`).

    Returns:
      {flag name: value} for the flags given only (merge onto a defaults dict yourself).

    Raises:
      TypeError: naming every unknown flag, or a value that does not parse as the flag's type.
    """
    defaults = all_flag_defaults() if defaults is None else defaults
    tokens = shlex.split(flags) if isinstance(flags, str) else list(flags)
    pairs, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise TypeError(f"expected a --flag, got {tok!r}")
        if "=" in tok:
            name, value = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise TypeError(f"flag {tok} has no value")
            name, value = tok[2:], tokens[i + 1]
            i += 2
        pairs.append((name, value))
    unknown = [n for n, _ in pairs if n not in defaults]
    if unknown:
        raise TypeError(f"unknown flag(s) {unknown}")
    out = {}
    for name, value in pairs:
        default = defaults[name]
        if isinstance(default, bool):
            out[name] = _str2bool(name, value)
        elif isinstance(default, int | float) and default is not None:
            try:
                out[name] = type(default)(value)
            except ValueError as e:
                kind = type(default).__name__
                raise TypeError(f"flag --{name} expects {kind}, got {value!r}") from e
        else:
            out[name] = value
    return out
