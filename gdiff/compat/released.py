"""The checkpoints OpenAI released with "Diffusion Models Beat GANs on Image Synthesis".

One table (`CHECKPOINTS`) holds, for every released file, the flag strings the reference README
gives for it, verbatim: MODEL_FLAGS, the classifier flags it samples with, and SAMPLE_FLAGS (one
addition, `--classifier_use_fp16 True`, is explained at `_CLASSIFIER_FP16`). It is keyed by the
name of the gdiff config that reproduces the file (configs/released/<name>.py), and everything that
needs a released architecture reads it from here: those configs write the strings into a gdiff
config (`configs.released.apply_flags`), and the benchmarks sample with the same groups as plain
dicts (`sampling_groups`), built by the same sampler builder as `--mode=sample`.

Pure Python: importing this module pulls in no JAX and no ml_collections, so a machine with only
jax, flax, optax and numpy (the benchmarks' GPU image) can read it.
"""

from __future__ import annotations

import dataclasses

from gdiff.compat import flags


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One released file and the README's flags for it.

    A classifier file carries the flags of the diffusion model it guides: it was trained on that
    model's diffusion at that model's image size, and is sampled with it.
    """

    file: str  # the released file's name, e.g. "64x64_diffusion.pt"
    model_flags: str  # MODEL_FLAGS (for a classifier: those of the model it guides)
    classifier_flags: str = ""  # the classifier flags the README samples with ("": unguided)
    sample_flags: str = ""  # SAMPLE_FLAGS
    network: str = "model"  # which network the file holds: "model" or "classifier"

    @property
    def all_flags(self) -> str:
        """The README's flag strings for this file, joined into one."""
        parts = (self.model_flags, self.classifier_flags, self.sample_flags)
        return " ".join(p for p in parts if p)


def _classifier_of(model: Checkpoint, file: str) -> Checkpoint:
    """The noise-aware classifier released with `model`, saved as `file`."""
    return dataclasses.replace(model, file=file, network="classifier")


# The README's sampling flags for the ImageNet models and upsamplers (250 respaced steps).
_SAMPLE_FLAGS_250 = "--batch_size 4 --num_samples 100 --timestep_respacing 250"
# The README's CLASSIFIER_FLAGS for sampling a classifier-guided model set --classifier_use_fp16
# True; its one-line command per released model passes only the scale (and the 64x64 depth), which
# run as written would guide with a float32 classifier (the flag's default). gdiff samples as the
# CLASSIFIER_FLAGS say, for every guided model whose MODEL_FLAGS are fp16 too: the classifier then
# computes in bfloat16 like the model. The 512x512 model (--use_fp16 False) keeps both in float32.
# The classifier configs (training) set float32 back, as the README's classifier training flags
# leave --classifier_use_fp16 False (configs/released/__init__.py as_classifier_config).
_CLASSIFIER_FP16 = "--classifier_use_fp16 True"

_IMAGENET64 = Checkpoint(
    file="64x64_diffusion.pt",
    model_flags=(
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine "
        "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown "
        "True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
    ),
    classifier_flags=f"--classifier_scale 1.0 --classifier_depth 4 {_CLASSIFIER_FP16}",
    sample_flags=_SAMPLE_FLAGS_250,
)
_IMAGENET128 = Checkpoint(
    file="128x128_diffusion.pt",
    model_flags=(
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 "
        "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True"
    ),
    classifier_flags=f"--classifier_scale 0.5 {_CLASSIFIER_FP16}",
    sample_flags=_SAMPLE_FLAGS_250,
)
_IMAGENET256 = Checkpoint(
    file="256x256_diffusion.pt",
    model_flags=(
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True"
        " --use_scale_shift_norm True"
    ),
    classifier_flags=f"--classifier_scale 1.0 {_CLASSIFIER_FP16}",
    sample_flags=_SAMPLE_FLAGS_250,
)
_IMAGENET512 = Checkpoint(
    file="512x512_diffusion.pt",
    model_flags=(
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--image_size 512 --learn_sigma True --noise_schedule linear --num_channels 256 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 "
        "False --use_scale_shift_norm True"
    ),
    classifier_flags="--classifier_scale 4.0",
    sample_flags=_SAMPLE_FLAGS_250,
)

# The README's flags for its LSUN models (bedroom, cat, horse); the horse model trained without
# dropout differs only in `--dropout 0.0`. They are sampled unguided, with all 1000 steps.
LSUN_MODEL_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
    "--dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear "
    "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown "
    "True --use_fp16 True --use_scale_shift_norm True"
)
LSUN_SAMPLE_FLAGS = "--batch_size 4 --num_samples 100 --timestep_respacing 1000"


def _lsun(file: str, model_flags: str = LSUN_MODEL_FLAGS) -> Checkpoint:
    return Checkpoint(file=file, model_flags=model_flags, sample_flags=LSUN_SAMPLE_FLAGS)


# config name (configs/released/<name>.py) -> the released file and its README flags.
CHECKPOINTS: dict[str, Checkpoint] = {
    "imagenet64": _IMAGENET64,
    "imagenet64_classifier": _classifier_of(_IMAGENET64, "64x64_classifier.pt"),
    "imagenet128": _IMAGENET128,
    "imagenet128_classifier": _classifier_of(_IMAGENET128, "128x128_classifier.pt"),
    "imagenet256": _IMAGENET256,
    "imagenet256_classifier": _classifier_of(_IMAGENET256, "256x256_classifier.pt"),
    # The unconditional 256x256 model is guided by the same classifier, at a much larger scale.
    "imagenet256_uncond": Checkpoint(
        file="256x256_diffusion_uncond.pt",
        model_flags=(
            "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
            "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
            "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True"
            " --use_scale_shift_norm True"
        ),
        classifier_flags=f"--classifier_scale 10.0 {_CLASSIFIER_FP16}",
        sample_flags=_SAMPLE_FLAGS_250,
    ),
    "imagenet512": _IMAGENET512,
    "imagenet512_classifier": _classifier_of(_IMAGENET512, "512x512_classifier.pt"),
    "lsun_bedroom": _lsun("lsun_bedroom.pt"),
    "lsun_cat": _lsun("lsun_cat.pt"),
    "lsun_horse": _lsun("lsun_horse.pt"),
    "lsun_horse_nodropout": _lsun(
        "lsun_horse_nodropout.pt", LSUN_MODEL_FLAGS.replace("--dropout 0.1", "--dropout 0.0")
    ),
    # The upsamplers of the paper's Table 6 (arXiv v4; unguided).
    "upsampler_64_256": Checkpoint(
        file="64_256_upsampler.pt",
        model_flags=(
            "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
            "--large_size 256  --small_size 64 --learn_sigma True --noise_schedule linear "
            "--num_channels 192 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
            "--use_fp16 True --use_scale_shift_norm True"
        ),
        sample_flags=_SAMPLE_FLAGS_250,
    ),
    "upsampler_128_512": Checkpoint(
        file="128_512_upsampler.pt",
        model_flags=(
            "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 "
            "--large_size 512 --small_size 128 --learn_sigma True --noise_schedule linear "
            "--num_channels 192 --num_head_channels 64 --num_res_blocks 2 --resblock_updown "
            "True --use_fp16 True --use_scale_shift_norm True"
        ),
        sample_flags=_SAMPLE_FLAGS_250,
    ),
}


def get(name: str) -> Checkpoint:
    """The entry of `CHECKPOINTS` for `name`; a KeyError lists the known names."""
    if name not in CHECKPOINTS:
        raise KeyError(f"no released checkpoint {name!r}; known: {sorted(CHECKPOINTS)}")
    return CHECKPOINTS[name]


def model_and_diffusion_kwargs(name: str) -> dict:
    """The reference's keyword arguments that build the diffusion model of `name` (for a
    classifier: the model it guides): `model_and_diffusion_defaults()` (an upsampler's:
    `sr_model_and_diffusion_defaults()`) overridden by the README's MODEL_FLAGS.

    Pass them to `gdiff.compat.openai.create_model_and_diffusion` (an upsampler's to
    `sr_create_model_and_diffusion`).
    """
    given = flags.parse_flags(get(name).model_flags)
    if "large_size" in given:
        defaults = flags.sr_model_and_diffusion_defaults()
    else:
        defaults = flags.model_and_diffusion_defaults()
    return {**defaults, **given}


def classifier_kwargs(name: str) -> dict:
    """The reference's `create_classifier` keyword arguments of the classifier released with (or
    as) `name`: `classifier_defaults()` at the model's image size, overridden by the README's
    classifier flags (the guidance scale, a sampling choice, is left out)."""
    checkpoint = get(name)
    kwargs = flags.classifier_defaults()
    model = flags.parse_flags(checkpoint.model_flags)
    # An upsampler's image size (that of its data and config) is its large size.
    kwargs["image_size"] = model["image_size"] if "image_size" in model else model["large_size"]
    given = flags.parse_flags(checkpoint.classifier_flags)
    kwargs.update({k: v for k, v in given.items() if k in kwargs})
    return kwargs


def sampling_groups(name: str) -> dict[str, dict]:
    """The `model`, `diffusion`, `classifier` and `sample` groups that configs/released/<name>.py
    samples with, as plain dicts (no ml_collections): the reference's defaults overridden by the
    README's flags of `name` (`flags.sampling_groups`). `--mode=sample` with that config and the
    benchmarks hand the same groups to `gdiff.sampling.sampler.build_sampler`."""
    checkpoint = get(name)
    classifier = classifier_kwargs(name)
    del classifier["image_size"]  # the model's (it is the data's image size)
    sampling = flags.sampling_flag_defaults()
    sampling.update(flags.parse_flags(checkpoint.sample_flags))
    scale = flags.parse_flags(checkpoint.classifier_flags).get("classifier_scale")
    if scale is not None:
        sampling["classifier_scale"] = scale
    return flags.sampling_groups({**model_and_diffusion_kwargs(name), **classifier, **sampling})
