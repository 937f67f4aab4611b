"""ImageNet 64x64 noise-aware classifier (guides imagenet64.py).

Released checkpoint: `64x64_classifier.pt` (openai/guided-diffusion README). Converts and trains
the noise-aware classifier; its diffusion and classifier flags come from `imagenet64.py`.

    python main.py --mode=convert --config configs/released/imagenet64_classifier.py \
        --workdir workdir/imagenet64 --config.torch_checkpoint=models/64x64_classifier.pt

Expected parameter count: 65.4M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from configs.released import imagenet64
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["imagenet64_classifier"]


def get_config() -> ml_collections.ConfigDict:
    config = released.as_classifier_config(
        imagenet64.get_config(), torch_checkpoint=f"models/{CHECKPOINT.file}"
    )
    # Classifier training hyperparameters of the paper's appendix table.
    config.optim.lr = 0.0006
    config.optim.weight_decay = 0.05
    config.train.classifier_batch_size = 1024
    config.train.classifier_num_steps = 300000
    return config
