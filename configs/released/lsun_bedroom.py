"""LSUN bedroom 256x256 unconditional ADM.

Released checkpoint: `lsun_bedroom.pt` (openai/guided-diffusion README). Unguided; the README
samples these with all 1000 steps.

    python main.py --mode=convert --config configs/released/lsun_bedroom.py \
        --workdir workdir/lsun_bedroom --config.torch_checkpoint=models/lsun_bedroom.pt
    python main.py --mode=sample --config configs/released/lsun_bedroom.py \
        --workdir workdir/lsun_bedroom

Expected parameter count: 552.8M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released

MODEL_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
    "--dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear "
    "--num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown "
    "True --use_fp16 True --use_scale_shift_norm True"
)
SAMPLE_FLAGS = "--batch_size 4 --num_samples 100 --timestep_respacing 1000"


def get_config() -> ml_collections.ConfigDict:
    config = released.base_config(data_name="lsun/bedroom", num_classes=1)
    config.torch_checkpoint = "models/lsun_bedroom.pt"
    released.apply_flags(config, MODEL_FLAGS)
    released.apply_flags(config, SAMPLE_FLAGS)
    # Training hyperparameters of the paper's appendix table for this model.
    config.optim.lr = 0.0001
    config.train.batch_size = 256
    config.train.num_steps = 1920000
    return config
