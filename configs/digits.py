"""The embedded default: classifier guidance end to end on scikit-learn's digits, on a CPU.

    .venv/bin/python main.py --workdir workdir/digits
    # the same as: main.py --mode=pipeline --config configs/digits.py --workdir workdir/digits

What it reproduces: the paper's classifier-scale ablation (Dhariwal & Nichol 2021, Table 4 and
Fig. 4) on a toy scale, both halves. A class-conditional and an unconditional diffusion model
(`sweep.models`: the same network, trained with and without labels) and one noise-aware classifier
are trained on the 8x8 digits; the sampler then draws the same balanced labels from the same noise
for every model at every guidance scale (the conditional model's `sample.classifier_scale`, the
unconditional model's own, larger ones), and a separate clean-image classifier (trained on the
training digits, minus a held-back real-data row) measures every row against the held-out digits
through the same scoring engine as `--mode=sweep`. As in the paper, a larger classifier scale makes
the conditional model's samples more recognisably the requested class (accuracy and the guidance
classifier's log-probability rise) while they cover less of the real distribution (recall falls,
FID rises); and guidance turns the unconditional model into a class-conditional one (accuracy at
the requested labels from chance at scale 0 to 0.93 at 32), needing a larger scale than the
conditional model, with a worse FID at scale 1 than unguided, as in Table 4.

Then the guidance that came after the paper, on the conditional model (trained with 10% label
dropout, so one network serves every kind): classifier guidance in a noise-level interval,
classifier-free guidance, two-network guidance (the unconditional model as the guide) and
autoguidance (its own step-500 checkpoint as the guide), each at a few weights, at every step and
in the interval; results.md names the kind of lowest FID at a given accuracy and
guidance_frontier.png draws FID against accuracy per kind. Measured: at accuracy 1.0, two-network
guidance in the interval (FID 2.04 at w = 2) ahead of classifier guidance (2.28 at scale 4) and
classifier-free guidance (2.38 at w = 1.5).

Then the conditional model over its training: the `training` entry samples its checkpoints at
steps 500, 1000 and 1500 (`sample.checkpoint_steps`; `train.keep_every` keeps them) unguided and
at scale 1, and with its step-2000 rows results.md and training_steps.png give FID, sFID, recall
and accuracy against the step. Measured: sFID falls from 4.61 at step 500 to 3.14 at step 2000
and recall rises from 0.85 to 0.90, while this toy's FID lies below the real-digit row's from
step 500 on (1.51 there, 1.72 at step 2000).

Then it weighs quality against cost (`pipeline.solver_sweep_*`): the conditional model at scale 1
sampled with DDIM and with DPM-Solver++(2M) at NFE 5, 10, 15, 25 and 50, against the paper's 250
ancestral steps, over the same noise and labels (solver_sweep.md / .csv / .png); measured, its FID
comes within 5% of the 250-step row's at NFE 15 for DPM-Solver++ and at NFE 50 for DDIM.

Measured 2026-12-06 on a 2-core CPU (the README's first command in a fresh clone of commit
310a6c7, venv and install included, machine otherwise idle): 12 min 0.7 s wall; stages:
diffusion models 121 s + 126 s, classifier 36 s, evaluation network 10 s, sampling 40 guidance
rows x 300 digits 209 s, evaluation 13 s, solver sweep 11 rows x 300 digits 143 s. The measured
tables, plots and grids live in docs/digits_results/. A rerun skips finished stages; see
gdiff/jobs/digits.py for how to swap one stage (e.g. a longer-trained model).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    config = common.get_config()
    config.seed = 0

    data = config.data
    data.source = "digits"
    # The digits' native 8x8: on a CPU a 16x16 copy of the same information costs 5x per step.
    data.image_size = 8
    data.class_cond = True
    data.num_classes = 10
    data.random_flip = False  # digits are not mirror-symmetric
    data.eval_split = "test"

    model = config.model
    model.num_channels = 32
    model.channel_mult = (1, 2)  # 8x8 -> 4x4
    model.num_res_blocks = 1
    model.attention_resolutions = (4,)  # self-attention at the 4x4 level
    model.num_heads = 2
    model.learn_sigma = False  # DDIM sampling ignores learned variances; plain MSE trains fastest
    model.dropout = 0.0
    # Label dropout (classifier-free guidance's training): 10% of the conditional model's
    # training labels are the null class, so the one model serves classifier guidance (Table 4),
    # classifier-free guidance and the conditional half of two-network guidance and autoguidance.
    model.class_dropout = 0.1

    diffusion = config.diffusion
    diffusion.steps = 1000
    diffusion.noise_schedule = "cosine"
    # Predict x_0, not the noise: with a few minutes of training an eps-predicting model's small
    # errors at high noise are amplified ~1/sqrt(alpha_bar) into saturated per-channel colour casts
    # on these grey digits; an x_0 prediction starts from the (grey) data mean instead.
    diffusion.predict_xstart = True

    classifier = config.classifier
    classifier.width = 32
    classifier.depth = 1
    classifier.attention_resolutions = (4,)
    classifier.pool = "attention"
    classifier.channel_mult = (1, 2)

    optim = config.optim
    optim.lr = 2e-3
    optim.grad_clip = 1.0

    train = config.train
    train.batch_size = 32
    train.num_steps = 2000
    train.ema_rates = "0.995"  # short run: an average over the last ~200 steps
    train.log_every = 100
    train.save_every = 500
    train.sample_every = 0
    train.eval_every = 0
    train.max_to_keep = 1
    train.classifier_batch_size = 32
    train.classifier_num_steps = 1000

    sample = config.sample
    sample.num_samples = 300  # per scale; balanced labels: 30 of every digit
    sample.batch_size = 150  # per device; each batch runs all scales (900 rows) in one program
    sample.use_ddim = True
    sample.timestep_respacing = "ddim25"
    sample.classifier_scale = "0,0.5,1,2,4,8"  # the conditional model's scales
    sample.labels = "balanced"
    sample.seed = 0
    # DPM-Solver++(2M) of the solver sweep (pipeline.solver_sweep_* below; the scale sweep uses
    # DDIM): the solver authors' guided setting (multistep order 2, data prediction, steps uniform
    # in time). The x_0-predicting model is solved through the solver's model_type "x_start".
    sample.dpm_solver_order = 2
    sample.dpm_solver_algorithm_type = "dpmsolver++"
    sample.dpm_solver_skip_type = "time_uniform"
    sample.dpm_solver_lower_order_final = True
    # Dynamic thresholding of each x_0 prediction (ratio 0.995, max_val 1: the reference's
    # values). Guided, the prediction at high noise is unbounded (x_0 + sigma_t^2 / alpha_t *
    # scale * grad, alpha_t -> 0), and DDIM and the ancestral steps clip it to [-1, 1]
    # (sample.clip_denoised); with max_val 1 the thresholding is that clip whenever the 99.5%
    # quantile of |x_0| is within 1, and rescales the prediction otherwise. Without it this job's
    # 5-step DPM-Solver++ digits come out thick and saturated (measured 2026-12-06: FID 4.13,
    # recall 0.58 at NFE 5; with it 2.42, 0.85; the 250-step ancestral row 2.29, 0.83).
    sample.dpm_solver_thresholding = True
    sample.dpm_solver_thresholding_ratio = 0.995
    sample.dpm_solver_thresholding_max_val = 1.0

    # Table 4's two halves: the class-conditional model above, and the same network trained
    # without labels (same steps), guided by the same classifier over the same noise and labels.
    # Without labels the model needs larger scales to become class-conditional (the paper: 10.0
    # against 1.0), so its sweep reaches further.
    # Each trains in <workdir>/<name> and samples from there unless its sample.model_checkpoint is
    # set (--config.sweep.models.unconditional.sample.model_checkpoint=DIR).
    #
    # Then guidance beyond the classifier, every entry over the same noise and labels: entries
    # whose sample.model_checkpoint is "{workdir}/conditional" sample the conditional model with
    # other guidance (their rows name it as their model). Each output kind at w = 1.5, 2, 3, at
    # every step and only where the noise level sigma lies in (0.3, 5] (Kynkaanniemi et al.
    # 2024: no guidance at the highest noise, where it costs diversity, nor at the lowest):
    # classifier guidance in that interval, classifier-free guidance (the conditional model's
    # null label as the guide), two-network guidance (the unconditional model as the guide) and
    # autoguidance (the conditional model guided by its own step-500 checkpoint: the same
    # network, a quarter of the training; the conditional entry keeps that checkpoint).
    #
    # Then the conditional model over training: "training" samples its checkpoints at steps
    # 500, 1000 and 1500 (train.keep_every keeps them) unguided and at the paper's scale 1, over
    # the same noise and labels; with the conditional entry's rows at step 2000 they make the
    # report's FID-against-step curves (training_steps.png).
    conditional = "{workdir}/conditional"
    guided = {"guidance_scale": "1.5,2,3", "guidance_interval": "all;0.3,5"}
    config.sweep.models = ml_collections.ConfigDict(
        {
            "conditional": {"train": {"keep_every": 500}, "sample": {"model_checkpoint": ""}},
            "unconditional": {
                "model": {"class_cond": False, "class_dropout": 0.0},
                "sample": {"classifier_scale": "0,1,2,4,8,16,32", "model_checkpoint": ""},
            },
            "classifier_interval": {
                "sample": {
                    "model_checkpoint": conditional,
                    "classifier_scale": "1,2,4",
                    "guidance_interval": "0.3,5",
                }
            },
            "cfg": {"sample": {"model_checkpoint": conditional, "guidance": "cfg", **guided}},
            "two_network": {
                "sample": {
                    "model_checkpoint": conditional,
                    "guidance": "two_network",
                    "guide_checkpoint": "{workdir}/unconditional",
                    **guided,
                }
            },
            "autoguidance": {
                "sample": {
                    "model_checkpoint": conditional,
                    "guidance": "autoguidance",
                    "guide_checkpoint": "{workdir}/conditional/checkpoints/500",
                    **guided,
                }
            },
            "training": {
                "sample": {
                    "model_checkpoint": conditional,
                    "checkpoint_steps": "500,1000,1500",
                    "classifier_scale": "0,1",
                }
            },
        }
    )

    # Stage budgets and outputs of gdiff/jobs/digits.py.
    config.pipeline = pipeline = ml_collections.ConfigDict()
    pipeline.eval_classifier_steps = 300  # the clean-image evaluation network (feature space)
    pipeline.eval_classifier_batch_size = 128
    pipeline.eval_classifier_width = 32
    pipeline.eval_classifier_lr = 3e-3
    pipeline.grid_per_class = 10  # columns of each scale's grid (rows = classes)
    pipeline.grid_zoom = 4  # nearest-neighbour magnification of the grids
    # Quality against cost (the stage after the scale sweep): one model at its default guided
    # scale, sampled with DDIM and with DPM-Solver++ (the sample.dpm_solver_* settings above) at
    # each NFE, and with the paper's ancestral steps as the reference row, all over the scale
    # sweep's noise and labels. Scale 1 is the paper's guided scale for its conditional model
    # (Table 4: 1.0, against 10.0 for the unconditional one) and the middle of this job's
    # conditional sweep. "" skips the stage.
    pipeline.solver_sweep_model = "conditional"
    pipeline.solver_sweep_scale = 1.0
    pipeline.solver_sweep_nfe = "5,10,15,25,50"
    pipeline.solver_sweep_reference_steps = 250  # ancestral steps (respacing "250")
    return config
