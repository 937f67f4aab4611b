"""Configs of the checkpoints OpenAI released with "Diffusion Models Beat GANs on Image Synthesis".

Each file holds the reference README's flag strings verbatim (MODEL_FLAGS, classifier flags,
SAMPLE_FLAGS; the four LSUN files share LSUN_MODEL_FLAGS below) and applies them with
`apply_flags`, so the architecture is exactly the one the released `.pt` file was saved from;
training hyperparameters follow the paper's appendix tables.
Workflow (one workdir per resolution):

    python main.py --mode=convert --config configs/released/<name>.py --workdir W \
        --config.torch_checkpoint=models/<file>.pt          # -> W/model_params
    python main.py --mode=convert --config configs/released/<name>_classifier.py --workdir W \
        --config.torch_checkpoint=models/<classifier>.pt    # -> W/classifier_params
    python main.py --mode=sample --config configs/released/<name>.py --workdir W \
        --config.sample.classifier_checkpoint=W
"""

import ml_collections

from configs import common

# Where each reference flag lives in a gdiff config. Model flags keep their names in `model`.
_DIFFUSION_FLAGS = {
    "diffusion_steps": "steps",
    "noise_schedule": "noise_schedule",
    "use_kl": "use_kl",
    "predict_xstart": "predict_xstart",
    "rescale_timesteps": "rescale_timesteps",
    "rescale_learned_sigmas": "rescale_learned_sigmas",
    "sigma_small": "sigma_small",
}
_SAMPLE_FLAGS = {
    "timestep_respacing": "timestep_respacing",
    "batch_size": "batch_size",
    "num_samples": "num_samples",
    "use_ddim": "use_ddim",
    "clip_denoised": "clip_denoised",
}


def apply_flags(config: ml_collections.ConfigDict, flags: str) -> None:
    """Writes a reference flag string (MODEL_FLAGS / CLASSIFIER_FLAGS / SAMPLE_FLAGS) into config.

    Model flags go to `config.model` (`large_size`/`small_size` make it a super-resolution model),
    diffusion flags to `config.diffusion`, `classifier_*` flags to `config.classifier`,
    `classifier_scale` and the sampling flags to `config.sample`. Flags of the reference's
    classifier script that only name files (`classifier_path`, `model_path`) are rejected: paths
    are given on the command line.
    """
    from gdiff.compat import openai  # deferred: config files should load without jax when unused

    for key, value in openai.parse_flags(flags).items():
        if key in _DIFFUSION_FLAGS:
            config.diffusion[_DIFFUSION_FLAGS[key]] = value
        elif key in _SAMPLE_FLAGS:
            config.sample[_SAMPLE_FLAGS[key]] = value
        elif key == "classifier_scale":
            config.sample.classifier_scale = str(value)
        elif key.startswith("classifier_"):
            config.classifier[key] = value
        elif key == "large_size":
            config.model.image_size = value
            config.model.super_res = True
        elif key == "small_size":
            config.model.small_size = value
            config.model.super_res = True
        elif key == "image_size" or key in config.model:
            config.model[key] = value
        else:
            raise KeyError(f"reference flag --{key} has no place in a released config")
    config.data.image_size = int(config.model.image_size)
    config.data.class_cond = bool(config.model.class_cond)


def base_config(*, data_name: str, num_classes: int = 1000) -> ml_collections.ConfigDict:
    """common.get_config() with ImageNet/LSUN-scale data, model and classifier defaults."""
    config = common.get_config()
    config.data.source = "tfds"
    config.data.name = data_name
    config.data.num_classes = num_classes
    config.model.num_classes = num_classes
    config.classifier.num_classes = num_classes
    from gdiff.compat import openai  # deferred, as in apply_flags

    # The reference's classifier_defaults() (image_size comes from model.image_size).
    defaults = openai.classifier_defaults()
    del defaults["image_size"]
    config.classifier.update(defaults)
    config.sample.classifier_scale = "0"
    config.optim.weight_decay = 0.0
    config.train.ema_rates = "0.9999"
    return config


def as_classifier_config(config: ml_collections.ConfigDict, *, torch_checkpoint: str):
    """Turns a diffusion config into the config of its noise-aware classifier.

    Same data, diffusion (the classifier is trained on inputs noised by it) and classifier group;
    `--mode=convert` converts the classifier and `--mode=train_classifier` trains it.
    """
    config.convert_target = "classifier"
    config.torch_checkpoint = torch_checkpoint
    config.optim.anneal_lr = True
    return config


# The reference README's flags for its LSUN models (bedroom, cat, horse); the horse model trained
# without dropout differs only in `--dropout 0.0`.
LSUN_MODEL_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
    "--dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear "
    "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown "
    "True --use_fp16 True --use_scale_shift_norm True"
)
LSUN_SAMPLE_FLAGS = "--batch_size 4 --num_samples 100 --timestep_respacing 1000"


def lsun_config(
    category: str, *, checkpoint: str, num_steps: int, model_flags: str = LSUN_MODEL_FLAGS
) -> ml_collections.ConfigDict:
    """An unconditional LSUN 256x256 ADM: tfds `lsun/<category>`, the README's LSUN flags.

    Args:
      category: the LSUN category ("bedroom", "cat", "horse").
      checkpoint: the released file's name (models/<checkpoint>.pt is the default to convert).
      num_steps: training iterations of the paper's appendix table for this model.
      model_flags: the model's flags (LSUN_MODEL_FLAGS but for lsun_horse_nodropout).
    """
    config = base_config(data_name=f"lsun/{category}", num_classes=1)
    config.torch_checkpoint = f"models/{checkpoint}.pt"
    apply_flags(config, model_flags)
    apply_flags(config, LSUN_SAMPLE_FLAGS)
    config.optim.lr = 0.0001
    config.train.batch_size = 256
    config.train.num_steps = num_steps
    return config
