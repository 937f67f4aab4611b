"""ImageNet 64x64 class-conditional ADM with classifier guidance (ADM-G).

Released checkpoint: `64x64_diffusion.pt` (openai/guided-diffusion README). Guided sampling with
the 64x64 classifier at scale 1.0, 250 steps.

    python main.py --mode=convert --config configs/released/imagenet64.py \
        --workdir workdir/imagenet64 --config.torch_checkpoint=models/64x64_diffusion.pt
    python main.py --mode=convert --config configs/released/imagenet64_classifier.py \
        --workdir workdir/imagenet64 --config.torch_checkpoint=models/64x64_classifier.pt
    python main.py --mode=sample --config configs/released/imagenet64.py \
        --workdir workdir/imagenet64 --config.sample.classifier_checkpoint=workdir/imagenet64

Expected parameter count: 295.9M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released

MODEL_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
    "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine "
    "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown "
    "True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
)
CLASSIFIER_FLAGS = "--classifier_scale 1.0 --classifier_depth 4"
SAMPLE_FLAGS = "--batch_size 4 --num_samples 100 --timestep_respacing 250"


def get_config() -> ml_collections.ConfigDict:
    config = released.base_config(data_name="imagenet_resized/64x64", num_classes=1000)
    config.torch_checkpoint = "models/64x64_diffusion.pt"
    released.apply_flags(config, MODEL_FLAGS)
    released.apply_flags(config, CLASSIFIER_FLAGS)
    released.apply_flags(config, SAMPLE_FLAGS)
    # Training hyperparameters of the paper's appendix table for this model.
    config.optim.lr = 0.0003
    config.train.batch_size = 2048
    config.train.num_steps = 540000
    return config
