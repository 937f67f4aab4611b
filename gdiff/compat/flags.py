"""The reference's flags: their defaults, their types, and where each one lives in a gdiff config.

One table (`TO_CONFIG`) says, for every flag of the reference's scripts (`SCRIPTS`: image_train,
super_res_train, classifier_train, image_sample, super_res_sample, classifier_sample, image_nll),
which config group and key holds it and how its value is typed there (a flag string "32,16,8"
becomes the tuple (32, 16, 8); `--use_fp16 True` becomes the bfloat16 compute dtype,
`--use_checkpoint True` the "full" `model.remat` policy). A few flags go elsewhere depending on the
script (`batch_size` is `sample.batch_size` for the sampling scripts, `train.batch_size` for
image_train, `train.classifier_batch_size` for classifier_train, `eval.nll_batch_size` for
image_nll): `SCRIPT_PLACES` holds those, and the script is an explicit argument of the mapping
(None: the sampling scripts' places, where the released configs' README strings go). Flags that
mean nothing in gdiff (`NO_PLACE`: model_path, classifier_path, fp16_scale_growth) are accepted
and `notes` says why, for the log. The reference-compatible factories (`gdiff.compat.openai`), the
released checkpoints' configs (configs/released), the command line's `--reference_flags` and the
benchmarks (`sampling_groups`: a reference run's groups as plain dicts) all go through it.

Pure Python: importing this module pulls in no JAX and no ml_collections.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


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


# The flags each of the reference's scripts adds to the model / diffusion / classifier keys, with
# the script's own defaults (its `create_argparser`).
_TRAIN_FLAGS = {  # image_train.py and super_res_train.py
    "data_dir": "",
    "schedule_sampler": "uniform",
    "lr": 1e-4,
    "weight_decay": 0.0,
    "lr_anneal_steps": 0,
    "batch_size": 1,
    "microbatch": -1,
    "ema_rate": "0.9999",
    "log_interval": 10,
    "save_interval": 10000,
    "resume_checkpoint": "",
    "use_fp16": False,
    "fp16_scale_growth": 1e-3,
}
_CLASSIFIER_TRAIN_FLAGS = {
    "data_dir": "",
    "val_data_dir": "",
    "noised": True,
    "iterations": 150000,
    "lr": 3e-4,
    "weight_decay": 0.0,
    "anneal_lr": False,
    "batch_size": 4,
    "microbatch": -1,
    "schedule_sampler": "uniform",
    "resume_checkpoint": "",
    "log_interval": 10,
    "eval_interval": 5,
    "save_interval": 10000,
}
_SAMPLE_FLAGS = {"clip_denoised": True, "num_samples": 10000, "batch_size": 16, "use_ddim": False}
_NLL_FLAGS = {
    "data_dir": "",
    "clip_denoised": True,
    "num_samples": 1000,
    "batch_size": 1,
    "model_path": "",
}

# The reference's scripts whose flag strings gdiff reads, in the order the README runs them.
SCRIPTS = (
    "image_train",
    "super_res_train",
    "classifier_train",
    "image_sample",
    "super_res_sample",
    "classifier_sample",
    "image_nll",
)


def script_defaults(script: str) -> dict:
    """The flags `script` accepts (scripts/<script>.py's argparser), with its defaults."""
    sample = {**_SAMPLE_FLAGS, "model_path": ""}
    table = {
        "image_train": lambda: {**_TRAIN_FLAGS, **model_and_diffusion_defaults()},
        "super_res_train": lambda: {**_TRAIN_FLAGS, **sr_model_and_diffusion_defaults()},
        "classifier_train": lambda: {
            **_CLASSIFIER_TRAIN_FLAGS,
            **classifier_and_diffusion_defaults(),
        },
        "image_sample": lambda: {**sample, **model_and_diffusion_defaults()},
        "super_res_sample": lambda: {
            **sample,
            "base_samples": "",
            **sr_model_and_diffusion_defaults(),
        },
        "classifier_sample": lambda: {
            **sample,
            "classifier_path": "",
            "classifier_scale": 1.0,
            **model_and_diffusion_defaults(),
            **classifier_defaults(),
        },
        "image_nll": lambda: {**_NLL_FLAGS, **model_and_diffusion_defaults()},
    }
    if script not in table:
        raise ValueError(f"unknown reference script {script!r}; one of {', '.join(SCRIPTS)}")
    return table[script]()


def all_flag_defaults() -> dict:
    """Every flag the reference's scripts accept (and `sigma_small`, a `create_gaussian_diffusion`
    argument), with a default of its type; where scripts differ, the first script's."""
    res = {"sigma_small": False}
    for script in reversed(SCRIPTS):
        res.update(script_defaults(script))
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


def remat_policy(use_checkpoint: bool) -> str:
    """The reference's use_checkpoint (recompute every block) -> gdiff's `model.remat`."""
    return "full" if use_checkpoint else "none"


class Place(NamedTuple):
    """Where a reference flag goes in a gdiff config."""

    group: str  # the config group; "" for a flag that means nothing in gdiff
    key: str
    convert: Callable[[Any], Any]  # the reference's value -> the typed config value
    note: str = ""  # said in the log when the flag is applied; for a flag with no place: why
    implies: Callable[[Any], dict[str, dict[str, Any]]] | None = None  # further keys it sets


# Where each flag lives. Flags keep their names inside their group, except the renamed ones below
# and the `classifier_<key>` flags, which become `classifier.<key>`.
_GROUP_OF = {
    "model": (
        "image_size num_channels num_res_blocks channel_mult attention_resolutions num_heads "
        "num_heads_upsample num_head_channels dropout class_cond learn_sigma "
        "use_scale_shift_norm resblock_updown use_new_attention_order small_size"
    ),
    "diffusion": (
        "noise_schedule use_kl predict_xstart rescale_timesteps rescale_learned_sigmas sigma_small"
    ),
    # timestep_respacing is a sampling choice in a gdiff config: the model trains on the whole
    # chain and samples on the respaced one (the training and nll scripts put it in `diffusion`).
    "sample": (
        "timestep_respacing classifier_scale batch_size num_samples use_ddim clip_denoised "
        "base_samples"
    ),
    "classifier": (
        "classifier_width classifier_depth classifier_attention_resolutions "
        "classifier_use_scale_shift_norm classifier_resblock_updown classifier_pool"
    ),
    "optim": "lr weight_decay anneal_lr",
    "train": "microbatch schedule_sampler resume_checkpoint",
}
# Flags whose config key has another name (large_size with small_size: a super-resolution model).
_RENAMED = {
    name: tuple(where.split("."))
    for name, where in (
        line.split()
        for line in """
            large_size          model.image_size
            use_fp16            model.dtype
            use_checkpoint      model.remat
            diffusion_steps     diffusion.steps
            classifier_use_fp16 classifier.dtype
            lr_anneal_steps     optim.anneal_lr
            ema_rate            train.ema_rates
            log_interval        train.log_every
            save_interval       train.save_every
            eval_interval       train.eval_every
            noised              train.classifier_noised
            iterations          train.classifier_num_steps
            data_dir            data.folder
            val_data_dir        data.eval_folder
        """.strip().splitlines()
    )
}
# Typed conversions; every other flag keeps the type of its reference default.
_TYPED = {
    "channel_mult": multipliers,
    "attention_resolutions": ints,
    "classifier_attention_resolutions": ints,
    "use_fp16": fp16_dtype,
    "classifier_use_fp16": fp16_dtype,
    "use_checkpoint": remat_policy,
    "classifier_scale": str,  # a scale or a comma-separated sweep in the config
    "lr_anneal_steps": lambda steps: int(steps) > 0,
}


def _folder_source(_) -> dict:
    # The reference reads only image folders.
    return {"data": {"source": "folder"}}


def _anneal_steps(steps) -> dict:
    # The reference anneals over lr_anneal_steps and stops training there.
    return {"train": {"num_steps": int(steps)}} if int(steps) > 0 else {}


_IMPLIES = {"data_dir": _folder_source, "lr_anneal_steps": _anneal_steps}
_PER_RANK = "(the reference's is per MPI rank: multiply it by the number of ranks)"
_NOTES = {
    "lr_anneal_steps": (
        "anneals optim.lr linearly to 0 over train.num_steps and stops there; 0 (the reference: "
        "no anneal, train until stopped) keeps train.num_steps"
    ),
    "microbatch": f"examples per micro-step over all devices and hosts {_PER_RANK}",
    "resume_checkpoint": "a gdiff training checkpoint (a workdir's checkpoints or one step)",
}
# Flags accepted for compatibility that mean nothing in gdiff, and why (said in the log).
NO_PLACE = {
    "model_path": (
        "gdiff reads converted checkpoints: convert the .pt once (--mode=convert "
        "--config.torch_checkpoint=<file>) and give the result as --config.sample.model_checkpoint "
        "(default: the workdir)"
    ),
    "classifier_path": (
        "gdiff reads converted checkpoints: convert the .pt once (--mode=convert with the "
        "classifier config) and give the result as --config.sample.classifier_checkpoint"
    ),
    "fp16_scale_growth": (
        "gdiff's reduced precision (--use_fp16 True) is bfloat16, which keeps float32's exponent "
        "range: there is no loss scale to grow"
    ),
}
_GLOBAL_BATCH = f"the global batch over all devices and hosts {_PER_RANK}"
_TRAINING = {
    "batch_size": ("train", "batch_size", _GLOBAL_BATCH),
    "timestep_respacing": ("diffusion", "timestep_respacing", ""),
}
# Where a script puts a flag elsewhere than `TO_CONFIG` does: (group, key, note). The training and
# nll scripts build their diffusion on the respaced chain, as the reference's do.
_BY_SCRIPT = {
    "image_train": _TRAINING,
    "super_res_train": _TRAINING,
    "classifier_train": {
        "batch_size": ("train", "classifier_batch_size", _GLOBAL_BATCH),
        "timestep_respacing": ("diffusion", "timestep_respacing", ""),
    },
    "image_nll": {
        "batch_size": ("eval", "nll_batch_size", ""),  # per device, as the reference's per rank
        "num_samples": ("eval", "nll_num_samples", ""),
        "clip_denoised": ("eval", "nll_clip_denoised", ""),
        "timestep_respacing": ("diffusion", "timestep_respacing", ""),
        "data_dir": ("data", "eval_folder", ""),  # the images --mode=nll evaluates
    },
}


def _table() -> dict[str, Place]:
    defaults = all_flag_defaults()
    places = dict(_RENAMED)
    for group, names in _GROUP_OF.items():
        for name in names.split():
            key = name.removeprefix("classifier_") if group == "classifier" else name
            places[name] = (group, key)
    table = {
        name: Place(
            group,
            key,
            _TYPED.get(name, type(defaults[name])),
            _NOTES.get(name, ""),
            _IMPLIES.get(name),
        )
        for name, (group, key) in places.items()
    }
    table.update({name: Place("", "", type(defaults[name]), why) for name, why in NO_PLACE.items()})
    return table


# reference flag -> its Place: group, key, reference value -> typed config value (and a note,
# and further keys it implies): the one table. This column is where the sampling scripts (and the
# released configs) put each flag; `SCRIPT_PLACES` holds where another script puts one elsewhere.
TO_CONFIG: dict[str, Place] = _table()
SCRIPT_PLACES: dict[str, dict[str, Place]] = {
    script: {
        name: TO_CONFIG[name]._replace(group=group, key=key, note=note)
        for name, (group, key, note) in moved.items()
    }
    for script, moved in _BY_SCRIPT.items()
}


def place(name: str, script: str | None = None) -> Place:
    """Where flag `name` of `script` (None: the sampling scripts' column) goes.

    Raises:
      KeyError: `name` is no flag of the reference's scripts.
      ValueError: an unknown script.
    """
    if script is not None and script not in SCRIPTS:
        raise ValueError(f"unknown reference script {script!r}; one of {', '.join(SCRIPTS)}")
    if name not in TO_CONFIG:
        raise KeyError(f"reference flag --{name} has no place in a gdiff config")
    return SCRIPT_PLACES.get(script, {}).get(name, TO_CONFIG[name])


def to_config(kwargs: Mapping[str, Any], script: str | None = None) -> dict[str, dict[str, Any]]:
    """Reference keyword arguments -> {group: {key: typed value}} (see `TO_CONFIG`).

    Args:
      kwargs: {flag name: value} as `parse_flags` returns them.
      script: the reference script the flags are for (`SCRIPTS`); it decides where the flags that
        differ between scripts go (e.g. `batch_size`: `sample.batch_size` by default,
        `train.batch_size` for image_train). None: the sampling scripts' places.

    Flags in `NO_PLACE` are left out (`notes` says why).

    Raises:
      KeyError: naming the first name that is no flag of the reference's scripts.
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, value in kwargs.items():
        p = place(name, script)
        if not p.group:
            continue
        groups.setdefault(p.group, {})[p.key] = p.convert(value)
        for group, values in (p.implies(value) if p.implies else {}).items():
            groups.setdefault(group, {}).update(values)
    return groups


def notes(kwargs: Mapping[str, Any], script: str | None = None) -> list[str]:
    """One line per flag of `kwargs` that the user should read about: where a flag means
    something else than in the reference (e.g. a global batch) or why it has no place."""
    lines = []
    for name, value in kwargs.items():
        p = place(name, script)
        if not p.group:
            lines.append(f"--{name}={value}: ignored: {p.note}")
        elif p.note:
            lines.append(f"--{name}={value} -> {p.group}.{p.key}: {p.note}")
    return lines


def write_config(config: Any, kwargs: Mapping[str, Any], script: str | None = None) -> None:
    """Writes reference keyword arguments into a gdiff config (any mapping of group mappings,
    e.g. an ml_collections ConfigDict), typed, where `TO_CONFIG` says for `script`."""
    for group, values in to_config(kwargs, script).items():
        config[group].update(values)


# Flags that name files or folders: their defaults ("") mean "none", never a value to write.
_PATH_FLAGS = frozenset(
    (
        "data_dir",
        "val_data_dir",
        "resume_checkpoint",
        "base_samples",
        "model_path",
        "classifier_path",
    )
)


# The number of classes the reference hard-codes (its script_util.NUM_CLASSES, ImageNet's): the
# label count of every released network. A gdiff config takes its data's (data.num_classes).
NUM_CLASSES = 1000
# Channels per attention head of the reference's classifier, which its `create_classifier` fixes
# (no flag sets it). Declared here once: configs/common.py's classifier.num_head_channels, the
# adapter (gdiff.compat.openai) and the benchmarks read it.
CLASSIFIER_HEAD_CHANNELS = 64
# What a script's networks fix without a flag (with_defaults writes it): the super-resolution
# model's and the classifier's channel multipliers come from the image size (gdiff's () = the
# reference's table), and the classifier's attention heads have CLASSIFIER_HEAD_CHANNELS channels.
SUPER_RES_FIXED = {"channel_mult": ()}
CLASSIFIER_FIXED = {"channel_mult": (), "num_head_channels": CLASSIFIER_HEAD_CHANNELS}
_FIXED_BY_SCRIPT = {
    "super_res_train": {"model": SUPER_RES_FIXED},
    "super_res_sample": {"model": SUPER_RES_FIXED},
    "classifier_train": {"classifier": CLASSIFIER_FIXED},
    "classifier_sample": {"classifier": CLASSIFIER_FIXED},
}


def write_flags(
    config: Any, flags: str | list[str], script: str | None = None, *, with_defaults: bool = False
) -> list[str]:
    """Writes a pasted reference flag string into `config`: what running `script` with it means.

    Args:
      config: a gdiff config (a mapping of group mappings, e.g. an ml_collections ConfigDict).
      flags: e.g. "$MODEL_FLAGS $DIFFUSION_FLAGS $TRAIN_FLAGS" of the reference's README.
      script: the reference script the string is for (`SCRIPTS`); only its flags are accepted.
        None: any script's flags, placed as the sampling scripts place them.
      with_defaults: first write the script's own defaults for every flag not given (except
        file and folder flags) and what the script's networks fix without a flag (the channel
        multipliers of the image size, the classifier's 64-channel heads), so the config
        describes the reference's run; otherwise flags not given keep the config's values. The
        number of classes stays the data's (the reference fixes 1000).

    Returns:
      The notes to show the user (`notes`), one line per flag that needs one.

    Raises:
      TypeError: an unknown flag (with the closest known one) or a value of the wrong type.
    """
    given = parse_flags(flags, script=script)
    kwargs = dict(given)
    if with_defaults:
        if script is None:
            raise ValueError("with_defaults needs the script whose defaults to write")
        defaults = script_defaults(script)
        kwargs = {k: v for k, v in defaults.items() if k not in _PATH_FLAGS} | given
        for group, values in _FIXED_BY_SCRIPT.get(script, {}).items():
            config[group].update(values)
    write_config(config, kwargs, script)
    return notes(kwargs, script)


# gdiff's choice of sampler and DPM-Solver's settings (no reference flag sets them;
# configs/common.py says what each means). "auto" keeps the reference's switch: --use_ddim picks
# DDIM, else ancestral steps. The solver's defaults are its reference's (`DPM_Solver.sample`:
# multistep DPM-Solver++ of order 2, time_uniform, lower_order_final; Imagen's thresholding at
# 0.995 and 1.0, off) at 20 steps.
SAMPLER_DEFAULTS = {
    "sampler": "auto",
    "dpm_solver_steps": 20,
    "dpm_solver_order": 2,
    "dpm_solver_algorithm_type": "dpmsolver++",
    "dpm_solver_skip_type": "time_uniform",
    "dpm_solver_lower_order_final": True,
    "dpm_solver_thresholding": False,
    "dpm_solver_thresholding_ratio": 0.995,
    "dpm_solver_thresholding_max_val": 1.0,
    # The guidance of each row (gdiff/sampling/guidance_rows.py): the reference's classifier
    # guidance at sample.classifier_scale, at every step.
    "guidance": "classifier",
    "guidance_scale": "1",
    "guidance_interval": "",
}
# The keys of the groups a sampling run is built from that no reference flag sets: what the
# reference's networks fix without a flag (`_FIXED_BY_SCRIPT`, `NUM_CLASSES`) and gdiff's own
# defaults, declared here once and read by configs/common.py (tests/test_released_configs.py checks
# that a released config and its plain groups agree). The groups of a reference run as plain
# dicts, for code that must not import ml_collections (the benchmarks).
SAMPLING_GROUP_DEFAULTS = {
    "model": {
        "num_classes": NUM_CLASSES,
        **SUPER_RES_FIXED,  # an image model's flags set channel_mult; an upsampler's is fixed
        "use_new_attention_order": False,  # sr_create_model has no such flag: False
        "small_size": 0,  # > 0 (a super-resolution model) only through --large_size/--small_size
        "attention_impl": "auto",
        "class_dropout": 0.0,  # the reference trains no null class (no classifier-free guidance)
    },
    "diffusion": {"sigma_small": False, "timestep_respacing": ""},
    "classifier": {"num_classes": NUM_CLASSES, **CLASSIFIER_FIXED, "attention_impl": "auto"},
    "sample": {"eta": 0.0, "seed": 0, **SAMPLER_DEFAULTS},
}
# The optimiser keys no reference flag sets, declared here once and read by configs/common.py: the
# reference trains with PyTorch's AdamW at its default betas and eps, and never clips gradients.
OPTIM_DEFAULTS = {"grad_clip": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8}


def sampling_flag_defaults() -> dict:
    """The sampling scripts' own flags that a sampling program reads (clip_denoised, use_ddim),
    at the scripts' defaults."""
    return {name: _SAMPLE_FLAGS[name] for name in ("clip_denoised", "use_ddim")}


def sampling_groups(kwargs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The `model`, `diffusion`, `classifier` and `sample` groups of a reference sampling run.

    Args:
      kwargs: every flag the run's networks and sampler read ({flag: value}, as `parse_flags`
        returns them merged onto the reference's defaults: `model_and_diffusion_defaults()` or
        `sr_model_and_diffusion_defaults()`, `classifier_defaults()`, the sampling flags).

    Returns:
      {group: {key: typed value}}: what `gdiff.sampling.sampler.build_sampler` reads, as the config
      of the same flags (configs/released) holds it, with `SAMPLING_GROUP_DEFAULTS` for the keys no
      flag sets.
    """
    groups = {group: dict(values) for group, values in SAMPLING_GROUP_DEFAULTS.items()}
    for group, values in to_config(kwargs).items():
        groups.setdefault(group, {}).update(values)
    return groups


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


def _unknown_flags_error(unknown: list[str], known: Mapping[str, Any], script: str | None):
    hints = []
    for name in unknown:
        others = [s for s in SCRIPTS if s != script and name in script_defaults(s)]
        close = difflib.get_close_matches(name, list(known), n=1)
        if others and script is not None:
            hints.append(f"--{name} is a flag of {', '.join(others)}, not of {script}")
        elif close:
            hints.append(f"--{name}: did you mean --{close[0]}?")
    return TypeError(f"unknown flag(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else ""))


def parse_flags(
    flags: str | list[str], defaults: dict | None = None, *, script: str | None = None
) -> dict:
    """Turns a reference flag string into typed keyword arguments.

    Args:
      flags: e.g. "--image_size 64 --class_cond True --attention_resolutions 32,16,8" (also
        `--key=value`), or an already split list of tokens.
      defaults: the flags allowed and their types (from each default value's type); by default
        those of `script`, or every flag of the reference's scripts (`all_flag_defaults()`).
      script: the reference script (`SCRIPTS`) whose flags are allowed, when `defaults` is None.

    Returns:
      {flag name: value} for the flags given only (merge onto a defaults dict yourself).

    Raises:
      TypeError: naming every unknown flag (with the closest known one, or the scripts that do
        have it), or a value that does not parse as the flag's type.
    """
    if defaults is None:
        defaults = all_flag_defaults() if script is None else script_defaults(script)
    pairs = _tokens(flags)
    unknown = [n for n, _ in pairs if n not in defaults]
    if unknown:
        raise _unknown_flags_error(unknown, defaults, script)
    return {name: _typed(name, value, defaults[name]) for name, value in pairs}
