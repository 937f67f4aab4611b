"""The checkpoints OpenAI released with "Diffusion Models Beat GANs on Image Synthesis".

One table (`CHECKPOINTS`) holds, for every released file, the flag strings the reference README
gives for it, verbatim: MODEL_FLAGS, the classifier flags it samples with, and SAMPLE_FLAGS. It is
keyed by the name of the gdiff config that reproduces the file (configs/released/<name>.py), and
everything that needs a released architecture reads it from here: those configs write the strings
into a gdiff config (`configs.released.apply_flags`), and the benchmarks build the reference's
networks from them (`model_and_diffusion_kwargs`, `classifier_kwargs`, then `gdiff.compat.openai`).

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

_IMAGENET64 = Checkpoint(
    file="64x64_diffusion.pt",
    model_flags=(
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine "
        "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown "
        "True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
    ),
    classifier_flags="--classifier_scale 1.0 --classifier_depth 4",
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
    classifier_flags="--classifier_scale 0.5",
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
    classifier_flags="--classifier_scale 1.0",
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
        classifier_flags="--classifier_scale 10.0",
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
    # The upsamplers of the paper's Table 5 (unguided).
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
    kwargs["image_size"] = flags.parse_flags(checkpoint.model_flags)["image_size"]
    given = flags.parse_flags(checkpoint.classifier_flags)
    kwargs.update({k: v for k, v in given.items() if k in kwargs})
    return kwargs
