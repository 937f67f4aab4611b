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

DPM-Solver++ (Lu et al. 2022) in 20 guided network evaluations instead of 250 steps, with the
solver authors' own setting for guided sampling of the ImageNet 256x256 model (2nd-order multistep,
20 steps, time_uniform, dynamic thresholding); its own output_dir keeps these samples apart from
the ancestral ones (a sampling run resumes only with the same settings). The classifier scale
stays 10.0 (tuned for 250 ancestral steps; the solver authors' ImageNet 256x256 example guides
at 8.0): --config.sample.classifier_scale changes it.

    python main.py --mode=sample --config configs/released/imagenet256_uncond.py \
        --workdir workdir/imagenet256_uncond \
        --config.sample.classifier_checkpoint=workdir/imagenet256_uncond \
        --config.sample.sampler=dpm_solver --config.sample.dpm_solver_algorithm_type=dpmsolver++ \
        --config.sample.dpm_solver_order=2 --config.sample.dpm_solver_steps=20 \
        --config.sample.dpm_solver_skip_type=time_uniform \
        --config.sample.dpm_solver_thresholding=true \
        --config.sample.output_dir=workdir/imagenet256_uncond/samples_dpm_solver

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
    # Training hyperparameters: Table 11 (arXiv v4) has one ImageNet 256 column; Table 4 says the
    # conditional and unconditional 256x256 models were trained alike (2M iterations, batch 256).
    config.optim.lr = 0.0001  # Table 11: 1e-4
    config.train.batch_size = 256  # Table 11 and Table 4: 256
    # Recompute each block's activations in the backward pass (the reference's use_checkpoint):
    # the least activation memory at this batch. Whether "dots" (less recomputation) fits too
    # is not yet measured on a GPU (benchmarks/run_all_gpu.sh remat).
    config.model.remat = "full"
    config.train.num_steps = 1980000  # Table 11: 1980K (Table 4 rounds it to "2M")
    return config
