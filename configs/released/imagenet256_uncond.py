"""ImageNet 256x256 unconditional ADM, guided by the 256x256 classifier.

Released checkpoint: `256x256_diffusion_uncond.pt` (openai/guided-diffusion README). An
unconditional model needs a much larger guidance scale: 10.0 (paper Table 4).

    python main.py --mode=convert --config configs/released/imagenet256_uncond.py \
        --workdir workdir/imagenet256_uncond \
        --config.torch_checkpoint=models/256x256_diffusion_uncond.pt
    python main.py --mode=convert --config configs/released/imagenet256_classifier.py \
        --workdir workdir/imagenet256_uncond --config.torch_checkpoint=models/256x256_classifier.pt
    python main.py --mode=sample --config configs/released/imagenet256_uncond.py \
        --workdir workdir/imagenet256_uncond \
        --config.sample.classifier_checkpoint=workdir/imagenet256_uncond

Expected parameter count: 552.8M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["imagenet256_uncond"]


def get_config() -> ml_collections.ConfigDict:
    config = released.base_config(data_name="imagenet2012")
    config.torch_checkpoint = f"models/{CHECKPOINT.file}"
    released.apply_flags(config, CHECKPOINT.all_flags)
    # Training hyperparameters of the paper's appendix table for this model.
    config.optim.lr = 0.0001
    config.train.batch_size = 256
    # Recompute each block's activations in the backward pass (the reference's use_checkpoint):
    # the least activation memory at this batch. Whether "dots" (less recomputation) fits too
    # is not yet measured on a GPU (benchmarks/run_all_gpu.sh remat).
    config.model.remat = "full"
    config.train.num_steps = 1980000
    return config
