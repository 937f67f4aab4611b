"""ImageNet 128x128 class-conditional ADM with classifier guidance (ADM-G).

Released checkpoint: `128x128_diffusion.pt` (openai/guided-diffusion README). Guided sampling with
the 128x128 classifier at scale 0.5, 250 steps.

    python main.py --mode=convert --config configs/released/imagenet128.py \
        --workdir workdir/imagenet128 --config.torch_checkpoint=models/128x128_diffusion.pt
    python main.py --mode=convert --config configs/released/imagenet128_classifier.py \
        --workdir workdir/imagenet128 --config.torch_checkpoint=models/128x128_classifier.pt
    python main.py --mode=sample --config configs/released/imagenet128.py \
        --workdir workdir/imagenet128 --config.sample.classifier_checkpoint=workdir/imagenet128

Expected parameter count: 421.5M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["imagenet128"]


def get_config() -> ml_collections.ConfigDict:
    config = released.base_config(data_name="imagenet2012")
    config.torch_checkpoint = f"models/{CHECKPOINT.file}"
    released.apply_flags(config, CHECKPOINT.all_flags)
    # Training hyperparameters of the paper's appendix table for this model.
    config.optim.lr = 0.0001
    config.train.batch_size = 256
    config.train.num_steps = 4360000
    return config
