"""Classifier-scale ablation on the released ImageNet 64x64 models (ADM-G).

The guidance-scale trade-off of Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image
Synthesis", on the smallest released guided model: as the scale grows, IS and precision rise
while recall falls, and FID is best at a moderate scale. This is NOT a figure of the paper: its
Fig. 4 (arXiv v4) sweeps the class-conditional 128x128 model (configs/ablations/fig4.py), and its
Table 4, the conditional and unconditional 256x256 models, is configs/ablations/table4.py; its
Table 5 has no guided 64x64 row (Table 14 lists scale 1.0 for this model, the scale the released
README samples it with). Here the class-conditional 64x64 model and its noise-aware classifier are
swept over several scales, a quarter of the 128x128 sweep's pixels per sample; every scale is
sampled in ONE compiled program over the SAME noise and labels, so the differences between rows of
the table come from the scale alone.

Needs the converted released checkpoints (--mode=convert of 64x64_diffusion.pt and
64x64_classifier.pt), the reference batch VIRTUAL_imagenet64_labeled.npz and the FID Inception
weights (pt_inception-2015-12-05 or classify_image_graph_def.pb). Command:

    python main.py --mode=sweep --config configs/ablations/classifier_scale.py \
        --workdir workdir/ablation_scale64 \
        --config.sample.model_checkpoint=checkpoints/64x64_diffusion \
        --config.sample.classifier_checkpoint=checkpoints/64x64_classifier \
        --config.eval.ref_batch=reference/VIRTUAL_imagenet64_labeled.npz \
        --config.eval.inception_weights=reference/pt_inception-2015-12-05.pth

Output in the workdir: samples/scale_<s>/samples_<N>x64x64x3.npz per scale (each one scores in
--mode=evaluate exactly as in the table), scale_sweep.csv and scale_sweep.md (model, scale, FID,
sFID, IS, precision, recall, the guidance classifier's accuracy and log p(y|x) at the requested
labels) and scale_sweep.png (metrics vs scale). The paper's numbers use 50,000 samples
and 250 sampling steps; the default here (10,000 samples per scale, 250 steps, 6 scales: 60,000
guided samples, many GPU-hours) gives FIDs biased upwards relative to 50k-sample FIDs (the trend
across scales is what this ablation shows); set --config.sample.num_samples=50000 for
paper-comparable numbers. An interrupted sweep resumes from the shards on disk.
"""

import ml_collections

from configs.released import imagenet64


def get_config() -> ml_collections.ConfigDict:
    # The released 64x64 model and classifier (configs/released/imagenet64.py: the README's
    # MODEL_FLAGS, --classifier_depth 4, --timestep_respacing 250).
    config = imagenet64.get_config()
    s = config.sample
    s.num_samples = 10_000
    s.batch_size = 32  # per device, per scale: one program holds batch_size x len(scales) rows
    s.timestep_respacing = "250"  # the paper's guided-sampling setting
    s.use_ddim = False
    s.clip_denoised = True
    s.classifier_scale = "0,0.5,1,2,4,10"
    s.labels = "random"  # as classifier_sample.py (uniform over the 1000 classes)
    s.seed = 0
    config.eval.batch_size = 256
    return config
