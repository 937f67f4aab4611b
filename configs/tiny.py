"""The test/CI configuration: a few-channel UNet and classifier on 8x8 scikit-learn digits.

Everything is small enough to train for a few dozen steps on one CPU core in seconds, while still
going through every piece of the real path (class-conditional UNet with attention and learned
variances, hybrid loss, EMA, checkpoints, resume, the held-out classifier evaluation). Not an
experiment: the samples it makes are blobs.

    python main.py --mode=train --config configs/tiny.py --workdir /tmp/gdiff_tiny
    python main.py --mode=train_classifier --config configs/tiny.py --workdir /tmp/gdiff_tiny

Measured (2-core CPU, 2026-11-23, the first command above): the 40-step run takes ~33 s wall
including start-up and compilation, 12-48 steps/s after compilation; the logged hybrid loss goes
from 13.3 (mean of steps 1-10) to 0.35 (steps 31-40). The classifier beats chance (10%) on weakly
noised held-out digits within its 60 steps (tests/test_train_classifier.py checks it).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    config = common.get_config()
    config.seed = 0

    data = config.data
    data.source = "digits"
    data.image_size = 8
    data.class_cond = True
    data.num_classes = 10
    data.random_flip = False  # digits are not mirror-symmetric
    data.prefetch = 2

    model = config.model
    model.num_channels = 32  # the smallest width GroupNorm(32) allows
    model.channel_mult = (1, 1)
    model.num_res_blocks = 1
    model.attention_resolutions = (2,)  # attention at the 4x4 level
    model.num_heads = 2
    model.learn_sigma = True
    model.dropout = 0.0

    diffusion = config.diffusion
    diffusion.steps = 100
    diffusion.noise_schedule = "cosine"

    classifier = config.classifier
    classifier.width = 32
    classifier.depth = 1
    classifier.attention_resolutions = (2,)
    classifier.pool = "attention"
    classifier.channel_mult = (1, 1)
    classifier.num_head_channels = 32  # the reference fixes 64, wider than this classifier

    optim = config.optim
    optim.lr = 2e-3

    train = config.train
    train.batch_size = 16
    train.num_steps = 40
    train.ema_rates = "0.99,0.9"
    train.log_every = 10
    train.save_every = 20
    train.sample_every = 0
    train.eval_every = 20
    train.eval_batches = 2
    train.max_to_keep = 2
    train.classifier_batch_size = 32
    train.classifier_num_steps = 60

    sample = config.sample
    sample.num_samples = 16
    sample.batch_size = 2
    sample.timestep_respacing = "10"
    return config
