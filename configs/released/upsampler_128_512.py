"""ImageNet 128x128 -> 512x512 super-resolution ADM (the upsampler of Table 5).

Released checkpoint: `128_512_upsampler.pt` (openai/guided-diffusion README). Upsamples 128x128
samples (sample.base_samples) to 512x512.

    python main.py --mode=convert --config configs/released/upsampler_128_512.py \
        --workdir workdir/upsampler_128_512 --config.torch_checkpoint=models/128_512_upsampler.pt
    python main.py --mode=sample --config configs/released/upsampler_128_512.py \
        --workdir workdir/upsampler_128_512 --config.sample.base_samples=128_samples.npz

Expected parameter count: 309.3M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["upsampler_128_512"]


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
    config.train.num_steps = 1050000
    return config
