"""Classifier guidance against two-network guidance on the released 256x256 models.

The released class-conditional `256x256_diffusion.pt` and unconditional
`256x256_diffusion_uncond.pt` share architecture and schedule (they differ in model.class_cond
alone), so the unconditional model is the guide u of two-network guidance (EDM2's construction,
u + w (c - u)) with no training. One `--mode=sweep` compares, over the same noise and the same
random labels (gdiff/sampling/guidance_rows.py; gdiff/jobs/sweep.py):

  - conditional: the conditional model guided by `256x256_classifier.pt` at classifier scales
    0 (unguided), 1 and 10 (Table 4's conditional half; configs/ablations/table4.py);
  - two_network: the conditional model guided by the unconditional one at w = 1.5, 2, 3, at every
    step and only where the noise level sigma lies in (0.28, 5.42] (the interval Kynkaanniemi et
    al. 2024 found for EDM2; outside it these steps cost one UNet evaluation instead of two).

Every row: 250 ancestral steps, 50,000 samples (the paper's FID setting). The table
(scale_sweep.md: model, guidance, scale, FID, sFID, IS, precision, recall, the classifier's
accuracy and log p(y|x) at the requested labels), the metrics against the scale
(scale_sweep.png) and FID against accuracy, one curve per guidance kind (guidance_frontier.png),
with a sentence naming the kind of lowest FID at a given accuracy. No figure of this ablation has
been measured yet (it is many GPU-days; --config.sample.num_samples=10000 shows the trend
sooner, its FIDs biased upwards).

Commands (convert each released file once; then the sweep):

    python main.py --mode=convert --config configs/released/imagenet256.py \\
        --workdir workdir/guidance_kinds/conditional \\
        --config.torch_checkpoint=models/256x256_diffusion.pt
    python main.py --mode=convert --config configs/released/imagenet256_uncond.py \\
        --workdir workdir/guidance_kinds/unconditional \\
        --config.torch_checkpoint=models/256x256_diffusion_uncond.pt
    python main.py --mode=convert --config configs/released/imagenet256_classifier.py \\
        --workdir workdir/guidance_kinds --config.torch_checkpoint=models/256x256_classifier.pt
    python main.py --mode=sweep --config configs/ablations/guidance_kinds.py \\
        --workdir workdir/guidance_kinds \\
        --config.eval.ref_batch=reference/VIRTUAL_imagenet256_labeled.npz \\
        --config.eval.inception_weights=reference/classify_image_graph_def.pb
"""

import ml_collections

from configs.ablations import table4


def get_config() -> ml_collections.ConfigDict:
    config = table4.get_config()  # the conditional model, 250 steps, 50,000 random labels
    s = config.sample
    s.batch_size = 8  # per device: one program holds batch_size x 6 rows of 256x256 images
    config.sweep.models = ml_collections.ConfigDict(
        {
            "conditional": {"sample": {"model_checkpoint": "", "classifier_scale": "0,1,10"}},
            "two_network": {
                "sample": {
                    # The conditional entry's converted model, guided by the unconditional one.
                    "model_checkpoint": "{workdir}/conditional",
                    "guidance": "two_network",
                    "guide_checkpoint": "{workdir}/unconditional",
                    "guidance_scale": "1.5,2,3",
                    "guidance_interval": "all;0.28,5.42",
                }
            },
        }
    )
    return config
