"""Fig. 4 of the paper: sample quality against the classifier scale, ImageNet 128x128.

Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis", Fig. 4 (arXiv v4:
"Change in sample quality as we vary scale of the classifier gradients for a class-conditional
ImageNet 128x128 model"): beyond scale 1.0, precision and IS rise while recall falls, and FID and
sFID are best at an intermediate scale. Fig. 5 plots the same sweep against BigGAN-deep's
truncation (FID against IS, precision against recall), also on ImageNet 128x128. Here the released
class-conditional 128x128 model (configs/released/imagenet128.py) and its noise-aware classifier
(configs/released/imagenet128_classifier.py) are sampled at every scale in ONE compiled program over
the SAME noise and random labels, 250 sampling steps (the paper's ImageNet setting), so the rows
differ by the scale alone. The paper's text does not list the scales the figure plots; this sweep
runs from unguided to 10.0 (Table 4's largest scale), through 0.5 (Table 14's 250-step scale for
this model) and 1.0.

Two points of the curves are in the paper's Table 5 (arXiv v4; 50,000 samples, 250 steps), for
comparison:

    | scale           | FID  | sFID | precision | recall |
    |-----------------|------|------|-----------|--------|
    | 0 (ADM)         | 5.91 | 5.09 | 0.70      | 0.65   |
    | 0.5 (ADM-G)     | 2.97 | 5.09 | 0.78      | 0.59   |

Commands (convert the released files once, no PyTorch needed, as configs/released/imagenet128.py
does; then the sweep):

    python main.py --mode=convert --config configs/released/imagenet128.py \
        --workdir workdir/imagenet128 --config.torch_checkpoint=models/128x128_diffusion.pt
    python main.py --mode=convert --config configs/released/imagenet128_classifier.py \
        --workdir workdir/imagenet128 --config.torch_checkpoint=models/128x128_classifier.pt
    python main.py --mode=sweep --config configs/ablations/fig4.py --workdir workdir/fig4 \
        --config.sample.model_checkpoint=workdir/imagenet128 \
        --config.sample.classifier_checkpoint=workdir/imagenet128 \
        --config.eval.ref_batch=reference/VIRTUAL_imagenet128_labeled.npz \
        --config.eval.inception_weights=reference/classify_image_graph_def.pb

Output in the workdir: samples/scale_<s>/samples_<N>x128x128x3.npz per scale (each one scores in
--mode=evaluate exactly as in the table), scale_sweep.csv and scale_sweep.md (scale, FID, sFID, IS,
precision, recall, the guidance classifier's accuracy and log p(y|x) at the requested labels) and
scale_sweep.png (each metric against the scale: Fig. 4's panels). The default, 10,000 samples per
scale at 8 scales (80,000 guided 128x128 samples at 250 steps, many GPU-hours), gives FIDs biased
upwards against 50,000-sample FIDs (the trend across scales is what the figure shows); set
--config.sample.num_samples=50000 for numbers comparable with Table 5. An interrupted sweep resumes
from the shards on disk.
"""

import ml_collections

from configs.released import imagenet128


def get_config() -> ml_collections.ConfigDict:
    # The released 128x128 model and classifier (the README's MODEL_FLAGS, classifier defaults,
    # --timestep_respacing 250; the classifier guides in bfloat16 as the README's sampling flags).
    config = imagenet128.get_config()
    s = config.sample
    s.num_samples = 10_000
    s.batch_size = 8  # per device, per scale: one program holds batch_size x len(scales) rows
    s.timestep_respacing = "250"  # the paper's guided-sampling setting
    s.use_ddim = False
    s.clip_denoised = True
    s.classifier_scale = "0,0.5,1,2,4,6,8,10"
    s.labels = "random"  # as classifier_sample.py (uniform over the 1000 classes)
    s.seed = 0
    config.eval.batch_size = 256
    return config
