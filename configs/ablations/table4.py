"""Table 4 of the paper: classifier guidance on a conditional and an unconditional model.

Dhariwal & Nichol (2021), "Diffusion Models Beat GANs on Image Synthesis", Table 4 ("Effect of
classifier guidance on sample quality. Both conditional and unconditional models were trained for
2M iterations on ImageNet 256x256 with batch size 256"), with the released checkpoints: the
class-conditional `256x256_diffusion.pt` (configs/released/imagenet256.py) and the unconditional
`256x256_diffusion_uncond.pt` (configs/released/imagenet256_uncond.py), both guided by
`256x256_classifier.pt`, unguided and at scales 1.0 and 10.0, 250 sampling steps (the paper's
ImageNet setting), 50,000 samples per row (the paper's FID sample count). Both models are sampled
in one `--mode=sweep` over the same noise and the same random labels, so the rows differ by model
and scale alone; one table (rows: model x scale) and one plot come out.

The paper's numbers (Table 4; ar5iv.labs.arxiv.org/html/2105.05233), for comparison:

    | model         | scale         | FID   | sFID  | IS     | precision | recall |
    |---------------|---------------|-------|-------|--------|-----------|--------|
    | unconditional | 0 (unguided)  | 26.21 | 6.35  | 39.70  | 0.61      | 0.63   |
    | unconditional | 1.0           | 33.03 | 6.99  | 32.92  | 0.56      | 0.65   |
    | unconditional | 10.0          | 12.00 | 10.40 | 95.41  | 0.76      | 0.44   |
    | conditional   | 0 (unguided)  | 10.94 | 6.02  | 100.98 | 0.69      | 0.63   |
    | conditional   | 1.0           | 4.59  | 5.25  | 186.70 | 0.82      | 0.52   |
    | conditional   | 10.0          | 9.11  | 10.93 | 283.92 | 0.88      | 0.32   |

Commands (convert each released file once, no PyTorch needed; then the sweep). A named model of a
sweep is loaded from `<workdir>/<name>` unless `sweep.models.<name>.sample.model_checkpoint` is set;
the classifier from the workdir unless `sample.classifier_checkpoint` is set:

    python main.py --mode=convert --config configs/released/imagenet256.py \
        --workdir workdir/table4/conditional --config.torch_checkpoint=models/256x256_diffusion.pt
    python main.py --mode=convert --config configs/released/imagenet256_uncond.py \
        --workdir workdir/table4/unconditional \
        --config.torch_checkpoint=models/256x256_diffusion_uncond.pt
    python main.py --mode=convert --config configs/released/imagenet256_classifier.py \
        --workdir workdir/table4 --config.torch_checkpoint=models/256x256_classifier.pt
    python main.py --mode=sweep --config configs/ablations/table4.py --workdir workdir/table4 \
        --config.eval.ref_batch=reference/VIRTUAL_imagenet256_labeled.npz \
        --config.eval.inception_weights=reference/classify_image_graph_def.pb

Output in the workdir: samples/<model>/scale_<s>/samples_50000x256x256x3.npz for model in
{conditional, unconditional} and s in {0, 1, 10} (each one can be given to --mode=evaluate, which
prints the same numbers as the table's row),
scale_sweep.csv / scale_sweep.md (model, scale, FID, sFID, IS, precision, recall, and the guidance
classifier's accuracy and log p(y|x) at the requested labels) and scale_sweep.png. Six rows of
50,000 guided 256x256 samples at 250 steps are many GPU-days; an interrupted sweep resumes from the
shards on disk, and --config.sample.num_samples=10000 shows the trend sooner (FIDs from fewer
samples are biased upwards against the paper's).
"""

import ml_collections

from configs.released import imagenet256, imagenet256_uncond


def _differences(base: ml_collections.ConfigDict, other: ml_collections.ConfigDict) -> dict:
    """{group: {key: value}} where `other`'s model and diffusion groups differ from `base`'s
    (for the released 256x256 pair: model.class_cond only)."""
    out = {}
    for group in ("model", "diffusion"):
        diff = {k: v for k, v in other[group].items() if v != base[group][k]}
        if diff:
            out[group] = diff
    return out


def get_config() -> ml_collections.ConfigDict:
    # The conditional model's config (the README's flags; the 256x256 classifier's defaults).
    config = imagenet256.get_config()
    s = config.sample
    s.num_samples = 50_000
    s.batch_size = 8  # per device: one program holds batch_size x 3 scales of 256x256 rows
    s.timestep_respacing = "250"
    s.use_ddim = False
    s.clip_denoised = True
    s.classifier_scale = "0,1,10"  # unguided, Table 4's 1.0 and 10.0
    s.labels = "random"  # as classifier_sample.py (uniform over the 1000 classes)
    s.seed = 0
    config.eval.batch_size = 256
    unconditional = _differences(config, imagenet256_uncond.get_config())
    config.sweep.models = ml_collections.ConfigDict(
        {
            "conditional": {"sample": {"model_checkpoint": ""}},
            "unconditional": {**unconditional, "sample": {"model_checkpoint": ""}},
        }
    )
    return config
