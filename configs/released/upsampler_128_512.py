"""ImageNet 128x128 -> 512x512 super-resolution ADM (an ADM-U of Table 6).

Released checkpoint: `128_512_upsampler.pt` (openai/guided-diffusion README). Upsamples 128x128
samples (sample.base_samples) to 512x512.

    python main.py --mode=convert --config configs/released/upsampler_128_512.py \
        --workdir workdir/upsampler_128_512 --config.torch_checkpoint=models/128_512_upsampler.pt
    python main.py --mode=sample --config configs/released/upsampler_128_512.py \
        --workdir workdir/upsampler_128_512 --config.sample.base_samples=128_samples.npz

DPM-Solver++ (Lu et al. 2022) in 20 network evaluations instead of 250 steps: 2nd-order
multistep, 20 steps, time_uniform (the solver authors' multistep setting; they keep dynamic
thresholding for guided sampling and recommend a 3rd-order singlestep solver, which gdiff does not
have, for unguided sampling). Its own output_dir keeps these samples apart from the
ancestral ones (a sampling run resumes only with the same settings).

    python main.py --mode=sample --config configs/released/upsampler_128_512.py \
        --workdir workdir/upsampler_128_512 \
        --config.sample.base_samples=128_samples.npz \
        --config.sample.sampler=dpm_solver --config.sample.dpm_solver_algorithm_type=dpmsolver++ \
        --config.sample.dpm_solver_order=2 --config.sample.dpm_solver_steps=20 \
        --config.sample.dpm_solver_skip_type=time_uniform \
        --config.sample.output_dir=workdir/upsampler_128_512/samples_dpm_solver

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
    # Training hyperparameters: the paper's Table 13 (arXiv v4), ImageNet 128->512 column.
    config.optim.lr = 0.0001  # Table 13: 1e-4
    config.train.batch_size = 256  # Table 13: 256
    # Recompute each block's activations in the backward pass (the reference's use_checkpoint):
    # the least activation memory at this batch. Whether "dots" (less recomputation) fits too
    # is not yet measured on a GPU (benchmarks/run_all_gpu.sh remat).
    config.model.remat = "full"
    config.train.num_steps = 1050000  # Table 13: 1050K
    return config
