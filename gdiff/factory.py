"""The one place that reads `config.model`, `config.classifier` and `config.diffusion`.

Everything else (training, sampling, conversion) asks this module for networks, diffusions and
initial variables, so a config key means the same thing everywhere. Networks are built through the
reference-compatible factories of `gdiff.compat.openai`, so a config whose `model` group holds a
released checkpoint's MODEL_FLAGS builds exactly that checkpoint's architecture.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from gdiff.compat import openai
from gdiff.models import unet


def _get(group, key: str, default: Any) -> Any:
    return group.get(key, default) if hasattr(group, "get") else getattr(group, key, default)


def _compute_dtype(group, use_fp16: bool) -> str:
    """`use_fp16=True` (a reference flag) selects bfloat16; otherwise the group's `dtype`."""
    return "bfloat16" if use_fp16 else str(_get(group, "dtype", "float32") or "float32")


def build_model(config) -> nn.Module:
    """The diffusion network of `config.model`: a UNetModel, or a SuperResModel when `super_res`.

    Keys are the reference's MODEL_FLAGS plus `num_classes`, `dtype`, `super_res`, `small_size`
    (see configs/common.py). An empty `channel_mult` takes the reference's per-resolution default.
    """
    m = config.model
    common = dict(
        num_channels=int(m.num_channels),
        num_res_blocks=int(m.num_res_blocks),
        learn_sigma=bool(m.learn_sigma),
        class_cond=bool(m.class_cond),
        use_checkpoint=bool(m.use_checkpoint),
        attention_resolutions=str(m.attention_resolutions),
        num_heads=int(m.num_heads),
        num_head_channels=int(m.num_head_channels),
        num_heads_upsample=int(m.num_heads_upsample),
        use_scale_shift_norm=bool(m.use_scale_shift_norm),
        dropout=float(m.dropout),
        resblock_updown=bool(m.resblock_updown),
        use_fp16=bool(m.use_fp16),
        num_classes=int(_get(m, "num_classes", openai.NUM_CLASSES)),
        dtype=_compute_dtype(m, bool(m.use_fp16)),
        attention_impl=_get(m, "attention_impl", None) or None,
    )
    channel_mult = str(_get(m, "channel_mult", "") or "")
    if not _get(m, "super_res", False):
        return openai.create_model(
            image_size=int(m.image_size),
            channel_mult=channel_mult,
            use_new_attention_order=bool(m.use_new_attention_order),
            **common,
        )
    small_size = int(_get(m, "small_size", 0))
    if small_size <= 0:
        raise ValueError("model.super_res needs model.small_size (the low-resolution input size)")
    if not channel_mult:
        return openai.sr_create_model(large_size=int(m.image_size), small_size=small_size, **common)
    # An explicit channel_mult (sizes the reference's sr_create_model has no table for): build the
    # UNet with it and carry every attribute over to the super-resolution variant.
    base = openai.create_model(
        image_size=int(m.image_size),
        channel_mult=channel_mult,
        use_new_attention_order=bool(m.use_new_attention_order),
        **common,
    )
    fields = {
        f.name: getattr(base, f.name)
        for f in dataclasses.fields(unet.UNetModel)
        if f.init and f.name not in ("parent", "name")
    }
    return unet.SuperResModel(**fields)


def build_classifier(config) -> nn.Module:
    """The noise-aware classifier of `config.classifier` at `config.model.image_size`.

    The reference fixes the channel multipliers per resolution (64/128/256/512); for other sizes
    (tests, small data sets) `classifier.channel_mult`, else `model.channel_mult`, is used.
    """
    c = config.classifier
    size = int(config.model.image_size)
    kwargs = dict(
        image_size=size,
        classifier_use_fp16=bool(c.classifier_use_fp16),
        classifier_width=int(c.classifier_width),
        classifier_depth=int(c.classifier_depth),
        classifier_attention_resolutions=str(c.classifier_attention_resolutions),
        classifier_use_scale_shift_norm=bool(c.classifier_use_scale_shift_norm),
        classifier_resblock_updown=bool(c.classifier_resblock_updown),
        classifier_pool=str(c.classifier_pool),
        num_classes=int(_get(c, "num_classes", openai.NUM_CLASSES)),
        dtype=_compute_dtype(c, bool(c.classifier_use_fp16)),
        attention_impl=_get(c, "attention_impl", None) or None,
    )
    mult = str(_get(c, "channel_mult", "") or "")
    if not mult and size not in (64, 128, 256, 512):
        mult = str(_get(config.model, "channel_mult", "") or "")
        if not mult:
            raise ValueError(
                f"no classifier channel multipliers for image size {size}: the reference has "
                "them for 64/128/256/512 only; set classifier.channel_mult or model.channel_mult"
            )
    classifier = openai.create_classifier(**kwargs) if not mult else None
    if classifier is None:
        # Same construction as the reference's create_classifier, with the given multipliers.
        donor = openai.create_classifier(**{**kwargs, "image_size": 64})
        fields = {
            f.name: getattr(donor, f.name)
            for f in dataclasses.fields(unet.EncoderUNetModel)
            if f.init and f.name not in ("parent", "name")
        }
        fields.update(
            image_size=size,
            channel_mult=tuple(float(x) if "." in x else int(x) for x in mult.split(",")),
            attention_resolutions=tuple(
                size // int(r) for r in str(c.classifier_attention_resolutions).split(",")
            ),
            num_head_channels=int(_get(c, "num_head_channels", 64)),
        )
        classifier = unet.EncoderUNetModel(**fields)
    return classifier


def build_diffusion(config, timestep_respacing: str | None = None):
    """The Gaussian diffusion of `config.diffusion` (learn_sigma comes from `config.model`).

    `timestep_respacing` overrides `diffusion.timestep_respacing` (e.g. "250" or "ddim25" for
    sampling); None keeps the config's.
    """
    d = config.diffusion
    respacing = d.timestep_respacing if timestep_respacing is None else timestep_respacing
    return openai.create_gaussian_diffusion(
        steps=int(d.steps),
        learn_sigma=bool(config.model.learn_sigma),
        sigma_small=bool(_get(d, "sigma_small", False)),
        noise_schedule=str(d.noise_schedule),
        use_kl=bool(d.use_kl),
        predict_xstart=bool(d.predict_xstart),
        rescale_timesteps=bool(d.rescale_timesteps),
        rescale_learned_sigmas=bool(d.rescale_learned_sigmas),
        timestep_respacing=str(respacing or ""),
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
