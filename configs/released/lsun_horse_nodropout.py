"""LSUN horse 256x256 unconditional ADM trained without dropout.

Released checkpoint: `lsun_horse_nodropout.pt` (openai/guided-diffusion README). Unguided; the
README samples it with all 1000 steps.

    python main.py --mode=convert --config configs/released/lsun_horse_nodropout.py \
        --workdir workdir/lsun_horse_nodropout \
        --config.torch_checkpoint=models/lsun_horse_nodropout.pt
    python main.py --mode=sample --config configs/released/lsun_horse_nodropout.py \
        --workdir workdir/lsun_horse_nodropout

DPM-Solver++ (Lu et al. 2022) in 20 network evaluations instead of 1000 steps: 2nd-order
multistep, 20 steps, time_uniform (the solver authors' multistep setting; they keep dynamic
thresholding for guided sampling and recommend a 3rd-order singlestep solver, which gdiff does not
have, for unguided sampling). Its own output_dir keeps these samples apart from the
ancestral ones (a sampling run resumes only with the same settings).

    python main.py --mode=sample --config configs/released/lsun_horse_nodropout.py \
        --workdir workdir/lsun_horse_nodropout \
        --config.sample.sampler=dpm_solver --config.sample.dpm_solver_algorithm_type=dpmsolver++ \
        --config.sample.dpm_solver_order=2 --config.sample.dpm_solver_steps=20 \
        --config.sample.dpm_solver_skip_type=time_uniform \
        --config.sample.output_dir=workdir/lsun_horse_nodropout/samples_dpm_solver

Expected parameter count: 552.8M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released


def get_config() -> ml_collections.ConfigDict:
    # Table 11 (arXiv v4) footnote: 250K iterations for LSUN horse; the paper states no separate
    # count for the no-dropout horse model (Table 5's "ADM" horse row), so it takes the same.
    # gdiff had 2.5M here, which neither the paper nor the README states.
    return released.lsun_config("lsun_horse_nodropout", category="horse", num_steps=250000)
