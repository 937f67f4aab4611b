"""LSUN cat 256x256 unconditional ADM.

Released checkpoint: `lsun_cat.pt` (openai/guided-diffusion README). Unguided; the README samples
these with all 1000 steps.

    python main.py --mode=convert --config configs/released/lsun_cat.py \
        --workdir workdir/lsun_cat --config.torch_checkpoint=models/lsun_cat.pt
    python main.py --mode=sample --config configs/released/lsun_cat.py \
        --workdir workdir/lsun_cat

Expected parameter count: 552.8M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released


def get_config() -> ml_collections.ConfigDict:
    # Training iterations from the paper's appendix table for this model.
    return released.lsun_config("lsun_cat", category="cat", num_steps=200000)
