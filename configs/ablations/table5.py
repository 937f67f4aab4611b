"""Table 5 of the paper, its 25-step rows: ADM-G with 25 DDIM steps on ImageNet 128, 256 and 512.

Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis", Table 5 (arXiv v4)
reports, for each guided ImageNet resolution, an "ADM-G (25 steps)" row: the class-conditional
model guided by its noise-aware classifier and sampled with DDIM over 25 steps (respacing `ddim25`,
the DDIM paper's uniform stride, as Appendix I says), at the scale Table 14 gives for 25-step DDIM,
50,000 samples (the paper's FID sample count). Here with the released checkpoints
(configs/released/imagenet{128,256,512}.py and their classifiers). Each resolution has its own
model, classifier and reference batch, so one run sweeps one of them: the config's argument picks
it (`table5.py:128`, `table5.py:256`, `table5.py:512`; default 256).

The paper's numbers (Table 5; the scale from Table 14), for comparison:

    | resolution | DDIM scale | FID  | sFID | precision | recall |
    |------------|------------|------|------|-----------|--------|
    | 128x128    | 1.25       | 5.98 | 7.04 | 0.78      | 0.51   |
    | 256x256    | 2.5        | 5.44 | 5.32 | 0.81      | 0.49   |
    | 512x512    | 9.0        | 8.41 | 9.67 | 0.83      | 0.47   |

Table 5's "ADM-G" rows (250 ancestral steps, Table 14's 250-step scales 0.5, 1.0 and 4.0; FID
2.97, 4.59 and 7.72) are what configs/released/imagenet{128,256,512}.py sample as they are. (The
released README's 25-step DDIM example for the 128x128 model guides at 1.0; Table 5's row uses
Table 14's 1.25.)

Commands for 256x256 (for 128 or 512, write that number for 256 throughout; the 512x512 reference
batch is VIRTUAL_imagenet512.npz). Convert the released files once, no PyTorch needed, as the
released configs do; then the sweep:

    python main.py --mode=convert --config configs/released/imagenet256.py \
        --workdir workdir/imagenet256 --config.torch_checkpoint=models/256x256_diffusion.pt
    python main.py --mode=convert --config configs/released/imagenet256_classifier.py \
        --workdir workdir/imagenet256 --config.torch_checkpoint=models/256x256_classifier.pt
    python main.py --mode=sweep --config configs/ablations/table5.py:256 \
        --workdir workdir/table5_256 \
        --config.sample.model_checkpoint=workdir/imagenet256 \
        --config.sample.classifier_checkpoint=workdir/imagenet256 \
        --config.eval.ref_batch=reference/VIRTUAL_imagenet256_labeled.npz \
        --config.eval.inception_weights=reference/classify_image_graph_def.pb

Output in the workdir: samples/scale_<s>/samples_50000x<R>x<R>x3.npz (it scores in --mode=evaluate
exactly as in the table), scale_sweep.csv / scale_sweep.md (one row: scale, sampler and NFE, FID,
sFID, IS, precision, recall, the guidance classifier's accuracy and log p(y|x) at the requested
labels) and scale_sweep.png. 50,000 guided samples at 25 steps are a tenth of the network calls of
the 250-step rows; an interrupted sweep resumes from the shards on disk, and
--config.sample.num_samples=10000 gives an answer sooner (FIDs from fewer samples are biased upwards
against the paper's).
"""

import ml_collections

from configs.released import imagenet128, imagenet256, imagenet512

# resolution -> (the released config, Table 14's 25-step DDIM scale, per-device batch). The batch
# is a guess that leaves room for the classifier's backward pass; gdiff has not measured the
# largest that fits on a GPU.
ROWS = {
    "128": (imagenet128, "1.25", 16),
    "256": (imagenet256, "2.5", 8),
    "512": (imagenet512, "9.0", 4),
}


def get_config(resolution: str = "256") -> ml_collections.ConfigDict:
    if resolution not in ROWS:
        raise ValueError(
            f"table5.py:{resolution}: Table 5's 25-step rows are at resolutions "
            f"{', '.join(ROWS)} (give e.g. configs/ablations/table5.py:256)"
        )
    base, scale, batch_size = ROWS[resolution]
    # The released model and classifier (the README's MODEL_FLAGS and classifier flags).
    config = base.get_config()
    s = config.sample
    s.num_samples = 50_000
    s.batch_size = batch_size
    # The reference's --use_ddim True --timestep_respacing ddim25 (the README's 25-step example).
    s.use_ddim = True
    s.timestep_respacing = "ddim25"
    s.eta = 0.0  # deterministic DDIM (the reference's default)
    s.clip_denoised = True
    s.classifier_scale = scale
    s.labels = "random"  # as classifier_sample.py (uniform over the 1000 classes)
    s.seed = 0
    config.eval.batch_size = 256
    return config
