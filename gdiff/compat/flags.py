"""The reference's flags: their defaults, their types, and where each one lives in a gdiff config.

One table (`TO_CONFIG`) says, for every flag of the reference's `script_util` and sampling scripts
that has a meaning in a gdiff config, which config group and key holds it and how its value is
typed there (a flag string "32,16,8" becomes the tuple (32, 16, 8); `--use_fp16 True` becomes the
bfloat16 compute dtype). The reference-compatible factories (`gdiff.compat.openai`), the released
checkpoints' configs (configs/released) and the benchmarks all go through it.

Pure Python: importing this module pulls in no JAX and no ml_collections.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Callable, Mapping
from typing import Any


def diffusion_defaults() -> dict:
    """The reference's diffusion flags and defaults."""
    return {
        "learn_sigma": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": False,
        "rescale_learned_sigmas": False,
    }


def classifier_defaults() -> dict:
    """The reference's classifier flags and defaults."""
    return {
        "image_size": 64,
        "classifier_use_fp16": False,
        "classifier_width": 128,
        "classifier_depth": 2,
        "classifier_attention_resolutions": "32,16,8",
        "classifier_use_scale_shift_norm": True,
        "classifier_resblock_updown": True,
        "classifier_pool": "attention",
    }


def model_and_diffusion_defaults() -> dict:
    """The reference's model + diffusion flags and defaults."""
    res = {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "num_head_channels": -1,
        "attention_resolutions": "16,8",
        "channel_mult": "",
        "dropout": 0.0,
        "class_cond": False,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "use_fp16": False,
        "use_new_attention_order": False,
    }
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults() -> dict:
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


# The keys of the reference's `sr_model_and_diffusion_defaults()`, in its order.
SR_KEYS = (
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
    return {k: res[k] for k in SR_KEYS}


# Flags of the reference's scripts (sample, train, super-res, classifier) beyond the model and
# diffusion keys, so whole MODEL_FLAGS / SAMPLE_FLAGS / TRAIN_FLAGS strings parse.
SCRIPT_FLAG_DEFAULTS = {
    "clip_denoised": True,
    "num_samples": 10000,
    "batch_size": 16,
    "use_ddim": False,
    "model_path": "",
    "classifier_path": "",
    "classifier_scale": 1.0,
    "base_samples": "",
    "data_dir": "",
    "val_data_dir": "",
    "noised": True,
    "iterations": 150000,
    "lr": 3e-4,
    "weight_decay": 0.0,
    "anneal_lr": False,
    "microbatch": -1,
    "schedule_sampler": "uniform",
    "resume_checkpoint": "",
    "log_interval": 10,
    "eval_interval": 5,
    "save_interval": 10000,
    "ema_rate": "0.9999",
    "fp16_scale_growth": 1e-3,
    "sigma_small": False,
}


def all_flag_defaults() -> dict:
    """Every flag the reference's scripts accept, with its default (and hence its type)."""
    res = dict(SCRIPT_FLAG_DEFAULTS)
    res.update(classifier_defaults())
    res.update(sr_model_and_diffusion_defaults())
    res.update(model_and_diffusion_defaults())
    return res


# ----------------------------------------------------------------------------- typed values


def ints(value: str | tuple | list) -> tuple[int, ...]:
    """ "32,16,8" -> (32, 16, 8); "" -> (); a sequence passes through as a tuple of ints."""
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


def multipliers(value: str | tuple | list) -> tuple:
    """A `channel_mult` flag: "1,1,2" -> (1, 1, 2), "0.5,1" -> (0.5, 1); "" -> () (the
    reference's per-resolution table)."""
    if isinstance(value, str):
        return tuple(float(v) if "." in v else int(v) for v in value.split(",") if v.strip())
    return tuple(value)


def fp16_dtype(use_fp16: bool) -> str:
    """The reference's fp16 switch -> gdiff's compute dtype (bfloat16: same range as float32)."""
    return "bfloat16" if use_fp16 else "float32"


# Where each flag lives. Flags keep their names inside their group, except the renamed ones below
# and the `classifier_<key>` flags, which become `classifier.<key>`.
_GROUP_OF = {
    "model": (
        "image_size num_channels num_res_blocks channel_mult attention_resolutions num_heads "
        "num_heads_upsample num_head_channels dropout class_cond learn_sigma use_checkpoint "
        "use_scale_shift_norm resblock_updown use_new_attention_order small_size"
    ),
    "diffusion": (
        "noise_schedule use_kl predict_xstart rescale_timesteps rescale_learned_sigmas sigma_small"
    ),
    # timestep_respacing is a sampling choice in a gdiff config: the model trains on the whole
    # chain and samples on the respaced one.
    "sample": "timestep_respacing classifier_scale batch_size num_samples use_ddim clip_denoised",
    "classifier": (
        "classifier_width classifier_depth classifier_attention_resolutions "
        "classifier_use_scale_shift_norm classifier_resblock_updown classifier_pool"
    ),
}
_RENAMED = {
    "large_size": ("model", "image_size"),  # with small_size: a super-resolution model
    "use_fp16": ("model", "dtype"),
    "diffusion_steps": ("diffusion", "steps"),
    "classifier_use_fp16": ("classifier", "dtype"),
}
# Typed conversions; every other flag keeps the type of its reference default.
_TYPED = {
    "channel_mult": multipliers,
    "attention_resolutions": ints,
    "classifier_attention_resolutions": ints,
    "use_fp16": fp16_dtype,
    "classifier_use_fp16": fp16_dtype,
    "classifier_scale": str,  # a scale or a comma-separated sweep in the config
}


def _table() -> dict[str, tuple[str, str, Callable[[Any], Any]]]:
    defaults = all_flag_defaults()
    places = dict(_RENAMED)
    for group, names in _GROUP_OF.items():
        for name in names.split():
            key = name.removeprefix("classifier_") if group == "classifier" else name
            places[name] = (group, key)
    return {
        name: (group, key, _TYPED.get(name, type(defaults[name])))
        for name, (group, key) in places.items()
    }


# reference flag -> (config group, key, reference value -> typed config value): the one table.
TO_CONFIG: dict[str, tuple[str, str, Callable[[Any], Any]]] = _table()


def to_config(kwargs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Reference keyword arguments -> {group: {key: typed value}} (see `TO_CONFIG`).

    Raises:
      KeyError: naming the first flag that has no place in a gdiff config.
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, value in kwargs.items():
        if name not in TO_CONFIG:
            raise KeyError(f"reference flag --{name} has no place in a gdiff config")
        group, key, convert = TO_CONFIG[name]
        groups.setdefault(group, {})[key] = convert(value)
    return groups


def write_config(config: Any, kwargs: Mapping[str, Any]) -> None:
    """Writes reference keyword arguments into a gdiff config (any mapping of group mappings,
    e.g. an ml_collections ConfigDict), typed, where `TO_CONFIG` says."""
    for group, values in to_config(kwargs).items():
        config[group].update(values)


# ----------------------------------------------------------------------------- parsing


def _str2bool(name: str, value: str) -> bool:
    v = value.lower()
    if v in ("yes", "true", "t", "y", "1"):
        return True
    if v in ("no", "false", "f", "n", "0"):
        return False
    raise TypeError(f"flag --{name} expects a boolean (True/False/1/0), got {value!r}")


def _tokens(flags: str | list[str]) -> list[tuple[str, str]]:
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
    return pairs


def _typed(name: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        return _str2bool(name, value)
    if isinstance(default, int | float):
        try:
            return type(default)(value)
        except ValueError as e:
            raise TypeError(f"flag --{name} expects {type(default).__name__}, got {value!r}") from e
    return value


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
      TypeError: naming every unknown flag (with the closest known one), or a value that does not
        parse as the flag's type.
    """
    defaults = all_flag_defaults() if defaults is None else defaults
    pairs = _tokens(flags)
    unknown = [n for n, _ in pairs if n not in defaults]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(defaults), n=1)
            if close:
                hints.append(f"--{name}: did you mean --{close[0]}?")
        raise TypeError(f"unknown flag(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else ""))
    return {name: _typed(name, value, defaults[name]) for name, value in pairs}
