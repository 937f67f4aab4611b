"""ImageNet 256x256 class-conditional ADM with classifier guidance (ADM-G).

Released checkpoint: `256x256_diffusion.pt` (openai/guided-diffusion README). Guided sampling with
the 256x256 classifier at scale 1.0, 250 steps.

    python main.py --mode=convert --config configs/released/imagenet256.py \
        --workdir workdir/imagenet256 --config.torch_checkpoint=models/256x256_diffusion.pt
    python main.py --mode=convert --config configs/released/imagenet256_classifier.py \
        --workdir workdir/imagenet256 --config.torch_checkpoint=models/256x256_classifier.pt
    python main.py --mode=sample --config configs/released/imagenet256.py \
        --workdir workdir/imagenet256 --config.sample.classifier_checkpoint=workdir/imagenet256

DPM-Solver++ (Lu et al. 2022) in 20 guided network evaluations instead of 250 steps, with the
solver authors' own setting for guided sampling of the ImageNet 256x256 model (2nd-order multistep,
20 steps, time_uniform, dynamic thresholding); its own output_dir keeps these samples apart from
the ancestral ones (a sampling run resumes only with the same settings). The classifier scale
stays 1.0 (tuned for 250 ancestral steps; the solver authors' ImageNet 256x256 example guides
at 8.0): --config.sample.classifier_scale changes it.

    python main.py --mode=sample --config configs/released/imagenet256.py \
        --workdir workdir/imagenet256 \
        --config.sample.classifier_checkpoint=workdir/imagenet256 \
        --config.sample.sampler=dpm_solver --config.sample.dpm_solver_algorithm_type=dpmsolver++ \
        --config.sample.dpm_solver_order=2 --config.sample.dpm_solver_steps=20 \
        --config.sample.dpm_solver_skip_type=time_uniform \
        --config.sample.dpm_solver_thresholding=true \
        --config.sample.output_dir=workdir/imagenet256/samples_dpm_solver

Expected parameter count: 553.8M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["imagenet256"]


def get_config() -> ml_collections.ConfigDict:
    config = released.base_config(data_name="imagenet2012")
    config.torch_checkpoint = f"models/{CHECKPOINT.file}"
    released.apply_flags(config, CHECKPOINT.all_flags)
    # Training hyperparameters: the paper's Table 11 (arXiv v4), ImageNet 256 column.
    config.optim.lr = 0.0001  # Table 11: 1e-4
    config.train.batch_size = 256  # Table 11: 256
    # Recompute each block's activations in the backward pass (the reference's use_checkpoint):
    # the least activation memory at this batch. Whether "dots" (less recomputation) fits too
    # is not yet measured on a GPU (benchmarks/run_all_gpu.sh remat).
    config.model.remat = "full"
    config.train.num_steps = 1980000  # Table 11: 1980K
    return config
