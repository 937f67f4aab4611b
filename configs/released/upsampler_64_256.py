"""ImageNet 64x64 -> 256x256 super-resolution ADM (an ADM-U of Table 6).

Released checkpoint: `64_256_upsampler.pt` (openai/guided-diffusion README). Upsamples 64x64
samples (sample.base_samples) to 256x256.

    python main.py --mode=convert --config configs/released/upsampler_64_256.py \
        --workdir workdir/upsampler_64_256 --config.torch_checkpoint=models/64_256_upsampler.pt
    python main.py --mode=sample --config configs/released/upsampler_64_256.py \
        --workdir workdir/upsampler_64_256 --config.sample.base_samples=64_samples.npz

DPM-Solver++ (Lu et al. 2022) in 20 network evaluations instead of 250 steps: 2nd-order
multistep, 20 steps, time_uniform (the solver authors' multistep setting; they keep dynamic
thresholding for guided sampling and recommend a 3rd-order singlestep solver, which gdiff does not
have, for unguided sampling). Its own output_dir keeps these samples apart from the
ancestral ones (a sampling run resumes only with the same settings).

    python main.py --mode=sample --config configs/released/upsampler_64_256.py \
        --workdir workdir/upsampler_64_256 \
        --config.sample.base_samples=64_samples.npz \
        --config.sample.sampler=dpm_solver --config.sample.dpm_solver_algorithm_type=dpmsolver++ \
        --config.sample.dpm_solver_order=2 --config.sample.dpm_solver_steps=20 \
        --config.sample.dpm_solver_skip_type=time_uniform \
        --config.sample.output_dir=workdir/upsampler_64_256/samples_dpm_solver

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
    # Training hyperparameters: the paper's Table 13 (arXiv v4), ImageNet 64->256 column.
    config.optim.lr = 0.0001  # Table 13: 1e-4
    config.train.batch_size = 256  # Table 13: 256
    # Recompute each block's activations in the backward pass (the reference's use_checkpoint):
    # the least activation memory at this batch. Whether "dots" (less recomputation) fits too
    # is not yet measured on a GPU (benchmarks/run_all_gpu.sh remat).
    config.model.remat = "full"
    config.train.num_steps = 500000  # Table 13: 500K
    return config
