"""LSUN bedroom 256x256 unconditional ADM.

Released checkpoint: `lsun_bedroom.pt` (openai/guided-diffusion README). Unguided; the README
samples these with all 1000 steps.

    python main.py --mode=convert --config configs/released/lsun_bedroom.py \
        --workdir workdir/lsun_bedroom --config.torch_checkpoint=models/lsun_bedroom.pt
    python main.py --mode=sample --config configs/released/lsun_bedroom.py \
        --workdir workdir/lsun_bedroom

Expected parameter count: 552.8M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released


def get_config() -> ml_collections.ConfigDict:
    # Training iterations from the paper's appendix table for this model.
    return released.lsun_config("lsun_bedroom", category="bedroom", num_steps=1920000)
