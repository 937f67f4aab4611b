"""LSUN horse 256x256 unconditional ADM trained without dropout.

Released checkpoint: `lsun_horse_nodropout.pt` (openai/guided-diffusion README). Unguided; the
README samples it with all 1000 steps.

    python main.py --mode=convert --config configs/released/lsun_horse_nodropout.py \
        --workdir workdir/lsun_horse_nodropout \
        --config.torch_checkpoint=models/lsun_horse_nodropout.pt
    python main.py --mode=sample --config configs/released/lsun_horse_nodropout.py \
        --workdir workdir/lsun_horse_nodropout

Expected parameter count: 552.8M (checked by tests/test_released_configs.py).
"""

import ml_collections

from configs import released


def get_config() -> ml_collections.ConfigDict:
    # Training iterations from the paper's appendix table for this model.
    return released.lsun_config("lsun_horse_nodropout", category="horse", num_steps=2500000)
