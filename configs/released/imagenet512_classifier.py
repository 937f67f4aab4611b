"""ImageNet 512x512 noise-aware classifier (guides imagenet512.py).

Released checkpoint: `512x512_classifier.pt` (openai/guided-diffusion README). Converts and trains
the noise-aware classifier; its diffusion and classifier flags come from `imagenet512.py`.

    python main.py --mode=convert --config configs/released/imagenet512_classifier.py \
        --workdir workdir/imagenet512 --config.torch_checkpoint=models/512x512_classifier.pt

Expected parameter count: 54.1M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from configs.released import imagenet512
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["imagenet512_classifier"]


def get_config() -> ml_collections.ConfigDict:
    config = released.as_classifier_config(
        imagenet512.get_config(), torch_checkpoint=f"models/{CHECKPOINT.file}"
    )
    # Classifier training hyperparameters of the paper's appendix table.
    config.optim.lr = 0.0003
    config.optim.weight_decay = 0.05
    config.train.classifier_batch_size = 256
    config.train.classifier_num_steps = 110000
    return config
