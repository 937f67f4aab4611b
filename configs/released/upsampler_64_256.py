"""ImageNet 64x64 -> 256x256 super-resolution ADM (the upsampler of Table 5).

Released checkpoint: `64_256_upsampler.pt` (openai/guided-diffusion README). Upsamples 64x64
samples (sample.base_samples) to 256x256.

    python main.py --mode=convert --config configs/released/upsampler_64_256.py \
        --workdir workdir/upsampler_64_256 --config.torch_checkpoint=models/64_256_upsampler.pt
    python main.py --mode=sample --config configs/released/upsampler_64_256.py \
        --workdir workdir/upsampler_64_256 --config.sample.base_samples=64_samples.npz

Expected parameter count: 312.1M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["upsampler_64_256"]


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
    config.train.num_steps = 500000
    return config
