"""Configs of the checkpoints OpenAI released with "Diffusion Models Beat GANs on Image Synthesis".

Each file takes the reference README's flag strings (MODEL_FLAGS, classifier flags, SAMPLE_FLAGS)
from `gdiff.compat.released.CHECKPOINTS` and applies them with `apply_flags`, so the architecture is
exactly the one the released `.pt` file was saved from; training hyperparameters follow the paper's
appendix Tables 11-13 (arXiv v4: diffusion models, classifiers, upsamplers), each value commented
with its source where it is set (the README gives none).
Workflow (one workdir per resolution):

    python main.py --mode=convert --config configs/released/<name>.py --workdir W \
        --config.torch_checkpoint=models/<file>.pt          # -> W/model_params
    python main.py --mode=convert --config configs/released/<name>_classifier.py --workdir W \
        --config.torch_checkpoint=models/<classifier>.pt    # -> W/classifier_params
    python main.py --mode=sample --config configs/released/<name>.py --workdir W \
        --config.sample.classifier_checkpoint=W
"""

import ml_collections
from absl import logging

from configs import common
from gdiff.compat import flags as ref_flags
from gdiff.compat import released as ref_released


def apply_flags(config: ml_collections.ConfigDict, flags: str, script: str | None = None) -> None:
    """Writes a reference flag string (MODEL_FLAGS / classifier flags / SAMPLE_FLAGS) into config.

    Each flag goes where `gdiff.compat.flags.TO_CONFIG` says, typed: model flags to `config.model`
    (`large_size` / `small_size` make it a super-resolution model), diffusion flags to
    `config.diffusion`, `classifier_*` flags to `config.classifier`, `classifier_scale` and the
    sampling flags to `config.sample` (or, for another reference `script`, where that script puts
    them). Flags that mean nothing in gdiff (`model_path`, ...) are logged with the reason; an
    unknown flag raises TypeError naming the closest known one.
    """
    for line in ref_flags.write_flags(config, flags, script):
        logging.info("reference flag %s", line)


def base_config(
    *, data_name: str, num_classes: int = ref_flags.NUM_CLASSES
) -> ml_collections.ConfigDict:
    """common.get_config() with ImageNet/LSUN-scale data (default: the reference's ImageNet
    classes) and the reference's classifier defaults."""
    config = common.get_config()
    config.data.source = "tfds"
    config.data.name = data_name
    config.data.num_classes = num_classes
    # The reference's classifier_defaults() (its image size is the data's).
    defaults = ref_flags.classifier_defaults()
    del defaults["image_size"]
    config.classifier.update(ref_flags.to_config(defaults)["classifier"])
    return config


def as_classifier_config(config: ml_collections.ConfigDict, *, torch_checkpoint: str):
    """Turns a diffusion config into the config of its noise-aware classifier.

    Same data, diffusion (the classifier is trained on inputs noised by it) and classifier group;
    `--mode=convert` converts the classifier and `--mode=train_classifier` trains it. The
    classifier computes in float32 here, as the README's classifier training flags leave
    `--classifier_use_fp16` at False; the diffusion config guides with it in bfloat16, as the
    README's classifier sampling flags say (gdiff.compat.released._CLASSIFIER_FP16).
    """
    config.convert_target = "classifier"
    config.torch_checkpoint = torch_checkpoint
    config.optim.anneal_lr = True
    config.classifier.dtype = "float32"
    return config


def lsun_config(name: str, *, category: str, num_steps: int) -> ml_collections.ConfigDict:
    """An unconditional LSUN 256x256 ADM: tfds `lsun/<category>`, the README's LSUN flags.

    Args:
      name: the released checkpoint's entry in `gdiff.compat.released.CHECKPOINTS` ("lsun_cat";
        models/<its file> is the default to convert).
      category: the LSUN category ("bedroom", "cat", "horse").
      num_steps: training iterations of the paper's Table 11 footnote (arXiv v4) for this model.
    """
    checkpoint = ref_released.get(name)
    config = base_config(data_name=f"lsun/{category}", num_classes=1)
    config.torch_checkpoint = f"models/{checkpoint.file}"
    apply_flags(config, checkpoint.all_flags)
    config.optim.lr = 0.0001  # Table 11 (arXiv v4), LSUN column: 1e-4
    config.train.batch_size = 256  # Table 11, LSUN column: 256
    # Recompute each block's activations in the backward pass (the reference's use_checkpoint):
    # the least activation memory at this batch. Whether "dots" (less recomputation) fits too
    # is not yet measured on a GPU (benchmarks/run_all_gpu.sh remat).
    config.model.remat = "full"
    config.train.num_steps = num_steps
    return config
