"""ImageNet 128x128 noise-aware classifier (guides imagenet128.py).

Released checkpoint: `128x128_classifier.pt` (openai/guided-diffusion README). Converts and trains
the noise-aware classifier; its diffusion and classifier flags come from `imagenet128.py`.

    python main.py --mode=convert --config configs/released/imagenet128_classifier.py \
        --workdir workdir/imagenet128 --config.torch_checkpoint=models/128x128_classifier.pt

Expected parameter count: 43.3M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from configs.released import imagenet128
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["imagenet128_classifier"]


def get_config() -> ml_collections.ConfigDict:
    config = released.as_classifier_config(
        imagenet128.get_config(), torch_checkpoint=f"models/{CHECKPOINT.file}"
    )
    # Classifier training hyperparameters: the paper's Table 12 (arXiv v4), ImageNet 128 column,
    # identical to the README's example TRAIN_FLAGS for this classifier. (Table 12's footnote: the
    # classifier that guided the base model of the 128->512 upsampling stack was a different one,
    # batch size 1024 and learning rate 6e-5.)
    config.optim.lr = 0.0003  # Table 12 and README: 3e-4
    config.optim.weight_decay = 0.05  # Table 12 and README: 0.05
    config.train.classifier_batch_size = 256  # Table 12 and README: 256
    config.train.classifier_num_steps = 300000  # Table 12: 300K; README: --iterations 300000
    return config
