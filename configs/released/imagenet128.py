"""ImageNet 128x128 class-conditional ADM with classifier guidance (ADM-G).

Released checkpoint: `128x128_diffusion.pt` (openai/guided-diffusion README). Guided sampling with
the 128x128 classifier at scale 0.5, 250 steps.

    python main.py --mode=convert --config configs/released/imagenet128.py \
        --workdir workdir/imagenet128 --config.torch_checkpoint=models/128x128_diffusion.pt
    python main.py --mode=convert --config configs/released/imagenet128_classifier.py \
        --workdir workdir/imagenet128 --config.torch_checkpoint=models/128x128_classifier.pt
    python main.py --mode=sample --config configs/released/imagenet128.py \
        --workdir workdir/imagenet128 --config.sample.classifier_checkpoint=workdir/imagenet128

DPM-Solver++ (Lu et al. 2022) in 20 guided network evaluations instead of 250 steps, with the
solver authors' own setting for guided sampling of the ImageNet 256x256 model (2nd-order multistep,
20 steps, time_uniform, dynamic thresholding); its own output_dir keeps these samples apart from
the ancestral ones (a sampling run resumes only with the same settings). The classifier scale
stays 0.5 (tuned for 250 ancestral steps; the solver authors' ImageNet 256x256 example guides
at 8.0): --config.sample.classifier_scale changes it.

    python main.py --mode=sample --config configs/released/imagenet128.py \
        --workdir workdir/imagenet128 \
        --config.sample.classifier_checkpoint=workdir/imagenet128 \
        --config.sample.sampler=dpm_solver --config.sample.dpm_solver_algorithm_type=dpmsolver++ \
        --config.sample.dpm_solver_order=2 --config.sample.dpm_solver_steps=20 \
        --config.sample.dpm_solver_skip_type=time_uniform \
        --config.sample.dpm_solver_thresholding=true \
        --config.sample.output_dir=workdir/imagenet128/samples_dpm_solver

Expected parameter count: 421.5M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released
from gdiff.compat import released as ref_released

CHECKPOINT = ref_released.CHECKPOINTS["imagenet128"]


def get_config() -> ml_collections.ConfigDict:
    config = released.base_config(data_name="imagenet2012")
    config.torch_checkpoint = f"models/{CHECKPOINT.file}"
    released.apply_flags(config, CHECKPOINT.all_flags)
    # Training hyperparameters: the paper's Table 11 (arXiv v4), ImageNet 128 column.
    config.optim.lr = 0.0001  # Table 11: 1e-4
    config.train.batch_size = 256  # Table 11: 256
    config.train.num_steps = 4360000  # Table 11: 4360K
    return config
