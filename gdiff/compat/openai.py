"""The reference-compatible front door: OpenAI guided-diffusion's `script_util` names, in Flax.

Someone holding a released checkpoint and its `MODEL_FLAGS` string does

    kw = parse_flags(MODEL_FLAGS + " " + DIFFUSION_FLAGS)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **kw})
    variables = convert_state_dict(model, load_torch_state_dict("256x256_diffusion.pt"))

A thin adapter: the reference's keyword arguments are checked (same names and defaults as the
reference; an unknown or missing key raises `TypeError` naming every offender), translated into a
gdiff config group through `gdiff.compat.flags.TO_CONFIG`, and built by `gdiff.factory`, the same
code that builds every network from a gdiff config. Extra optional keywords everywhere a network
is built: `num_classes` (default 1000, the reference's hard-coded ImageNet), `dtype` (compute
dtype; `use_fp16=True`, and for a classifier `classifier_use_fp16=True`, selects bfloat16 when
`dtype` is not given) and `attention_impl` ("auto" | "xla" | "cudnn", as the config's
`model.attention_impl`: "auto" takes cuDNN's fused attention on a CUDA GPU with a 16-bit dtype,
XLA elsewhere; see `gdiff.factory.resolve_attention_impl`).

The diffusion and evaluation names of ../shared/CONTRACT.md are re-exported here.
"""

from typing import Any

import jax.numpy as jnp

from gdiff import diffusion, evaluation, factory
from gdiff.checkpoints.torch_file import load_torch_state_dict
from gdiff.compat import flags
from gdiff.compat.convert import convert_state_dict
from gdiff.compat.flags import (
    classifier_and_diffusion_defaults,
    classifier_defaults,
    diffusion_defaults,
    model_and_diffusion_defaults,
    parse_flags,
    sr_model_and_diffusion_defaults,
)
from gdiff.diffusion.dpm_solver import dpm_solver_sample  # section 8
from gdiff.models import unet

# The diffusion and evaluation names of ../shared/CONTRACT.md (sections 4, 5 and 7), re-exported.
GaussianDiffusion = diffusion.GaussianDiffusion
SpacedDiffusion = diffusion.SpacedDiffusion
ModelMeanType = diffusion.ModelMeanType
ModelVarType = diffusion.ModelVarType
LossType = diffusion.LossType
create_gaussian_diffusion = diffusion.create_gaussian_diffusion
get_named_beta_schedule = diffusion.get_named_beta_schedule
space_timesteps = diffusion.space_timesteps
normal_kl = diffusion.normal_kl
discretized_gaussian_log_likelihood = diffusion.discretized_gaussian_log_likelihood
approx_standard_normal_cdf = diffusion.approx_standard_normal_cdf
classifier_cond_fn = diffusion.classifier_cond_fn
create_fid_inception = evaluation.create_fid_inception
convert_fid_inception_state_dict = evaluation.convert_fid_inception_state_dict
load_fid_inception_graph_def = evaluation.load_fid_inception_graph_def
fid_inception_features = evaluation.fid_inception_features
frechet_distance = evaluation.frechet_distance
inception_score = evaluation.inception_score
precision_recall = evaluation.precision_recall

NUM_CLASSES = flags.NUM_CLASSES
# The extra keywords' defaults: the reference's classes, the flags' dtype, the config's attention.
_EXTRA_DEFAULTS = {
    "num_classes": NUM_CLASSES,
    "dtype": None,
    "attention_impl": flags.SAMPLING_GROUP_DEFAULTS["model"]["attention_impl"],
}
_REQUIRED = object()

# The reference's `create_model` parameters in positional order, with their defaults.
_CREATE_MODEL_PARAMS = dict(
    image_size=_REQUIRED,
    num_channels=_REQUIRED,
    num_res_blocks=_REQUIRED,
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
# The reference's `sr_create_model` parameters in positional order, all required.
_SR_MODEL_PARAMS = (
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
_CLASSIFIER_PARAMS = tuple(classifier_defaults())

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "NUM_CLASSES",
    "SpacedDiffusion",
    "approx_standard_normal_cdf",
    "classifier_and_diffusion_defaults",
    "classifier_cond_fn",
    "classifier_defaults",
    "convert_fid_inception_state_dict",
    "convert_state_dict",
    "create_classifier",
    "create_classifier_and_diffusion",
    "create_fid_inception",
    "create_gaussian_diffusion",
    "create_model",
    "create_model_and_diffusion",
    "diffusion_defaults",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_sample",
    "fid_inception_features",
    "frechet_distance",
    "get_named_beta_schedule",
    "inception_score",
    "load_fid_inception_graph_def",
    "load_torch_state_dict",
    "model_and_diffusion_defaults",
    "normal_kl",
    "parse_flags",
    "precision_recall",
    "space_timesteps",
    "sr_create_model",
    "sr_create_model_and_diffusion",
    "sr_model_and_diffusion_defaults",
]


def _bind(fn: str, params: dict | tuple, args: tuple, kwargs: dict) -> dict:
    """Binds reference-style arguments, raising one TypeError naming every bad key.

    `params` maps the reference's parameters, in positional order, to their defaults (`_REQUIRED`
    for none; a tuple means all required). The extras (`num_classes`, `dtype`, `attention_impl`)
    are keyword-only.
    """
    if isinstance(params, tuple):
        params = dict.fromkeys(params, _REQUIRED)
    if len(args) > len(params):
        raise TypeError(f"{fn}() takes at most {len(params)} positional arguments, got {len(args)}")
    bound = dict(zip(params, args, strict=False))
    twice = sorted(set(bound) & set(kwargs))
    unknown = sorted(k for k in kwargs if k not in params and k not in _EXTRA_DEFAULTS)
    bound.update(kwargs)
    missing = [k for k, d in params.items() if k not in bound and d is _REQUIRED]
    problems = []
    if unknown:
        problems.append(f"unknown argument(s) {unknown}")
    if missing:
        problems.append(f"missing argument(s) {missing}")
    if twice:
        problems.append(f"argument(s) given twice {twice}")
    if problems:
        raise TypeError(f"{fn}(): " + "; ".join(problems))
    defaults = {k: d for k, d in params.items() if d is not _REQUIRED}
    return {**_EXTRA_DEFAULTS, **defaults, **bound}


def _group(kw: dict, group: str, **fixed: Any) -> dict:
    """The config group `group` that the bound reference arguments `kw` describe (through
    flags.TO_CONFIG), completed by `fixed` values and the adapter's extras."""
    ref = {k: v for k, v in kw.items() if flags.TO_CONFIG.get(k, ("",))[0] == group}
    values = flags.to_config(ref)[group]
    values.update(fixed)
    if kw["dtype"] is not None:  # an explicit compute dtype wins over the reference's fp16 flag
        values["dtype"] = jnp.dtype(kw["dtype"]).name
    values.update(num_classes=int(kw["num_classes"]), attention_impl=kw["attention_impl"])
    return values


def _diffusion(kw: dict):
    return create_gaussian_diffusion(
        steps=kw["diffusion_steps"],
        learn_sigma=kw["learn_sigma"],
        noise_schedule=kw["noise_schedule"],
        use_kl=kw["use_kl"],
        predict_xstart=kw["predict_xstart"],
        rescale_timesteps=kw["rescale_timesteps"],
        rescale_learned_sigmas=kw["rescale_learned_sigmas"],
        timestep_respacing=kw["timestep_respacing"],
    )


def _pick(kw: dict, params) -> dict:
    """The arguments of one factory (its reference parameters plus the extras) out of `kw`."""
    return {k: kw[k] for k in (*params, *_EXTRA_DEFAULTS)}


def create_model(*args, **kwargs) -> unet.UNetModel:
    """The reference's `create_model(image_size, num_channels, num_res_blocks, ...)`.

    Returns a `UNetModel` (3 input channels; 6 outputs with learn_sigma; `num_classes` labels
    when class_cond).
    """
    kw = _bind("create_model", _CREATE_MODEL_PARAMS, args, kwargs)
    return factory.unet_from_group(_group(kw, "model", small_size=0))


def create_model_and_diffusion(**kwargs):
    """The reference's `create_model_and_diffusion`: every key of model_and_diffusion_defaults()
    is required. Returns `(UNetModel, diffusion)`."""
    kw = _bind("create_model_and_diffusion", tuple(model_and_diffusion_defaults()), (), kwargs)
    return create_model(**_pick(kw, _CREATE_MODEL_PARAMS)), _diffusion(kw)


def create_classifier(*args, **kwargs) -> unet.EncoderUNetModel:
    """The reference's `create_classifier(image_size, classifier_use_fp16, classifier_width,
    classifier_depth, classifier_attention_resolutions, classifier_use_scale_shift_norm,
    classifier_resblock_updown, classifier_pool)`: all required. Returns an EncoderUNetModel
    with the channel multipliers and attention-head width the reference fixes
    (`flags.CLASSIFIER_FIXED`) and `num_classes` (default 1000) logits, computing in bfloat16
    when `classifier_use_fp16` is True (as `use_fp16` does for the model)."""
    kw = _bind("create_classifier", _CLASSIFIER_PARAMS, args, kwargs)
    group = _group(kw, "classifier", **flags.CLASSIFIER_FIXED)
    return factory.classifier_from_group(group, int(kw["image_size"]))


def create_classifier_and_diffusion(**kwargs):
    """The reference's `create_classifier_and_diffusion` -> `(EncoderUNetModel, diffusion)`."""
    params = tuple(classifier_and_diffusion_defaults())
    kw = _bind("create_classifier_and_diffusion", params, (), kwargs)
    return create_classifier(**_pick(kw, _CLASSIFIER_PARAMS)), _diffusion(kw)


def sr_create_model(*args, **kwargs) -> unet.SuperResModel:
    """The reference's `sr_create_model(large_size, small_size, ...)`: all required.

    Returns a SuperResModel at `large_size` (the reference uses the 256 channel multipliers for
    512 too, and has none for 128; it leaves `use_new_attention_order` at False).
    """
    kw = _bind("sr_create_model", _SR_MODEL_PARAMS, args, kwargs)
    group = _group(kw, "model", **flags.SUPER_RES_FIXED, use_new_attention_order=False)
    return factory.unet_from_group(group)


def sr_create_model_and_diffusion(**kwargs):
    """The reference's `sr_create_model_and_diffusion` -> `(SuperResModel, diffusion)`."""
    kw = _bind("sr_create_model_and_diffusion", flags.SR_KEYS, (), kwargs)
    return sr_create_model(**_pick(kw, _SR_MODEL_PARAMS)), _diffusion(kw)
