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
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["imagenet64"]


def get_config() -> ml_collections.ConfigDict:
    config = released.base_config(data_name="imagenet_resized/64x64")
    config.torch_checkpoint = f"models/{CHECKPOINT.file}"
    released.apply_flags(config, CHECKPOINT.all_flags)
    # Training hyperparameters of the paper's appendix table for this model.
    config.optim.lr = 0.0003
    config.train.batch_size = 2048
    config.train.num_steps = 540000
    return config
