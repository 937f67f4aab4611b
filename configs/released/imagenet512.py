"""ImageNet 512x512 class-conditional ADM with classifier guidance (ADM-G).

Released checkpoint: `512x512_diffusion.pt` (openai/guided-diffusion README). Guided sampling with
the 512x512 classifier at scale 4.0, 250 steps.

    python main.py --mode=convert --config configs/released/imagenet512.py \
        --workdir workdir/imagenet512 --config.torch_checkpoint=models/512x512_diffusion.pt
    python main.py --mode=convert --config configs/released/imagenet512_classifier.py \
        --workdir workdir/imagenet512 --config.torch_checkpoint=models/512x512_classifier.pt
    python main.py --mode=sample --config configs/released/imagenet512.py \
        --workdir workdir/imagenet512 --config.sample.classifier_checkpoint=workdir/imagenet512

Expected parameter count: 559.4M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["imagenet512"]


def get_config() -> ml_collections.ConfigDict:
    config = released.base_config(data_name="imagenet2012")
    config.torch_checkpoint = f"models/{CHECKPOINT.file}"
    released.apply_flags(config, CHECKPOINT.all_flags)
    # Training hyperparameters of the paper's appendix table for this model.
    config.optim.lr = 3e-05
    config.train.batch_size = 256
    # Recompute each block's activations in the backward pass (the reference's use_checkpoint):
    # the least activation memory at this batch. Whether "dots" (less recomputation) fits too
    # is not yet measured on a GPU (benchmarks/run_all_gpu.sh remat).
    config.model.remat = "full"
    config.train.num_steps = 1940000
    return config
