"""The base configuration every experiment file starts from.

Groups mirror the stages of the method: `data`, `model` (the diffusion UNet), `diffusion`,
`classifier` (the noise-aware classifier), `optim`, `train`, `sample`, `eval`, `sweep` (the
diffusion models a classifier-scale sweep compares). Values are typed (sizes as ints, channel
multipliers and attention resolutions as tuples, a compute dtype name); `gdiff/factory.py` builds
every network and diffusion from them. A fact is declared once: the image size, the number of
classes and class conditioning live in `data`, and `model` /
`classifier` refer to them. A reference flag string (the reference's MODEL_FLAGS, classifier and
sampling flags) is written into a config through one table, `gdiff.compat.flags.TO_CONFIG`
(`configs.released.apply_flags`). Every key the code reads is declared here, so each one can be
overridden on the command line (`--config.model.channel_mult="(1,2,2)"`).
"""

import ml_collections

from gdiff.compat import flags as ref_flags

# Defaults that code without ml_collections needs too (the benchmarks build sampling and training
# runs from plain dicts) are declared once, in gdiff.compat.flags, and read from there.
_SAMPLING = ref_flags.SAMPLING_GROUP_DEFAULTS


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Where a released PyTorch checkpoint lives, for --mode=convert.
    config.torch_checkpoint = ""
    # Which network --mode=convert converts: "model" or "classifier".
    config.convert_target = "model"
    # --mode=convert refuses to replace a finished parameter checkpoint unless this is set.
    config.convert_overwrite = False
    # jax.distributed.initialize(): "auto" initialises when the environment names a coordinator
    # (a TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS) or the keys below do; True forces it; False
    # never.
    config.distributed = "auto"
    # Where process 0 listens (host:port), how many processes and which one this is: unset ("" /
    # -1), JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else what JAX detects
    # (SLURM, Cloud TPU). gdiff.distributed.initialize_kwargs resolves them.
    config.coordinator_address = ""
    config.num_processes = -1
    config.process_id = -1

    config.data = data = ml_collections.ConfigDict()
    data.source = "digits"  # digits | tfds | folder
    data.name = ""  # tfds name, e.g. "imagenet2012" or "imagenet_resized/64x64"
    data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir
    data.folder = ""  # the reference's image-folder layout (class = file-name prefix before "_")
    data.eval_folder = ""  # held-out images in the same layout (classifier evaluation)
    data.train_split = "train"
    data.eval_split = "validation"
    # The three facts below are declared here once; the model and classifier groups refer to them
    # (ml_collections FieldReferences), so setting any of the linked keys sets all of them.
    data.image_size = 16  # training resolution (a super-resolution model's large size)
    data.num_classes = 10
    data.class_cond = True  # read labels (and condition the model on them)
    data.random_flip = True
    data.random_crop = False  # the classifier's augmentation in the reference
    # Unused since the input reads by index (gdiff/data/input_engine.py: a seeded index shuffle
    # per epoch, no buffer); kept so that existing command lines still parse.
    data.shuffle_buffer = 10_000
    data.prefetch = 2  # batches each process reads ahead (0: on demand)

    config.model = model = ml_collections.ConfigDict()
    # The ADM UNet (the reference's MODEL_FLAGS, typed; gdiff.compat.flags maps flag strings here).
    model.image_size = data.get_ref("image_size")
    model.num_classes = data.get_ref("num_classes")  # the reference hard-codes 1000
    model.class_cond = data.get_ref("class_cond")
    # Probability that a training example's label is replaced by the null class, for
    # classifier-free guidance; > 0 gives label_emb one extra row (the null class = num_classes).
    model.class_dropout = _SAMPLING["model"]["class_dropout"]
    model.num_channels = 32
    model.num_res_blocks = 1
    # () = the reference's multipliers for 64/128/256/512
    model.channel_mult = _SAMPLING["model"]["channel_mult"]
    model.attention_resolutions = (8,)  # in pixels, as the reference's flag
    model.num_heads = 4
    model.num_heads_upsample = -1
    model.num_head_channels = -1
    model.dropout = 0.0
    model.learn_sigma = True  # 2x output channels; the diffusion learns its variances
    # Activation rematerialisation of every ResBlock / AttentionBlock in the backward pass: "none";
    # "dots" keeps conv and matmul outputs and recomputes the norms and activations; "full"
    # recomputes everything (the reference's use_checkpoint). Training memory only: sampling
    # programs are the same under every policy.
    model.remat = "none"
    model.use_scale_shift_norm = True
    model.resblock_updown = False
    model.use_new_attention_order = _SAMPLING["model"]["use_new_attention_order"]
    model.dtype = "float32"  # compute dtype ("bfloat16": the reference's use_fp16); params float32
    # auto: cuDNN fused attention on a CUDA GPU with a 16-bit dtype, XLA elsewhere | xla | cudnn
    # (resolved by gdiff/factory.py when the network is built; a "cudnn" that cannot run fails)
    model.attention_impl = _SAMPLING["model"]["attention_impl"]
    # > 0: a SuperResModel upsampling from small_size to image_size, trained (like the reference's
    # super_res_train.py) on each batch area-downsampled to small_size as its low_res input.
    model.small_size = _SAMPLING["model"]["small_size"]

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.steps = 1000
    diffusion.noise_schedule = "cosine"
    diffusion.timestep_respacing = _SAMPLING["diffusion"]["timestep_respacing"]
    diffusion.use_kl = False
    diffusion.predict_xstart = False
    diffusion.rescale_timesteps = False
    diffusion.rescale_learned_sigmas = False
    diffusion.sigma_small = _SAMPLING["diffusion"]["sigma_small"]

    config.classifier = classifier = ml_collections.ConfigDict()
    # The noise-aware classifier (the reference's classifier_* flags, typed), at data.image_size.
    classifier.num_classes = data.get_ref("num_classes")
    classifier.width = 32
    classifier.depth = 1
    # () = the reference's multipliers for 64/128/256/512, which its create_classifier always uses
    classifier.channel_mult = ref_flags.CLASSIFIER_FIXED["channel_mult"]
    classifier.attention_resolutions = (8,)  # in pixels
    classifier.num_head_channels = ref_flags.CLASSIFIER_HEAD_CHANNELS  # the reference's, fixed
    classifier.use_scale_shift_norm = True
    classifier.resblock_updown = True
    classifier.pool = "attention"  # adaptive | attention | spatial | spatial_v2
    classifier.dtype = "float32"  # "bfloat16": the reference's classifier_use_fp16
    classifier.attention_impl = _SAMPLING["classifier"]["attention_impl"]  # as model's

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 1e-4
    optim.weight_decay = 0.0
    # Linear decay to 0 over train.num_steps (diffusion: set after each step, as the TrainLoop's
    # lr_anneal_steps, so steps 0 and 1 use lr) or train.classifier_num_steps (classifier: set
    # before each step, as classifier_train.py's anneal_lr).
    optim.anneal_lr = False
    # AdamW's betas and eps, and the global-norm clip (0 disables): the reference's settings.
    optim.grad_clip = ref_flags.OPTIM_DEFAULTS["grad_clip"]
    optim.b1 = ref_flags.OPTIM_DEFAULTS["b1"]
    optim.b2 = ref_flags.OPTIM_DEFAULTS["b2"]
    optim.eps = ref_flags.OPTIM_DEFAULTS["eps"]

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 64  # examples per step: the global batch (all devices of all hosts)
    train.microbatch = -1  # -1: no gradient accumulation; else examples per micro-step (global)
    train.num_steps = 1000
    train.ema_rates = "0.9999"
    train.schedule_sampler = "uniform"  # uniform | loss-second-moment
    train.log_every = 50
    train.save_every = 1000  # 0: no periodic saves (the last step and a preemption still save)
    train.sample_every = 0  # 0 disables the periodic sample grid
    train.eval_every = 0  # classifier held-out evaluation
    # Diffusion training: every fid_every steps, FID (sFID, IS, precision, recall) of
    # fid_samples unguided samples (--mode=sample's sampler and sample.* settings) against
    # eval.ref_batch in eval.inception_weights' features, logged as eval_fid etc. 0: off.
    train.fid_every = 0
    train.fid_samples = 1000
    train.eval_batches = 4  # held-out batches of train.classifier_batch_size per evaluation
    train.max_to_keep = 3
    # > 0: also keep every step that is a multiple of keep_every (with save_every dividing it),
    # beyond max_to_keep: the checkpoints at fixed iterations that ablations over training score
    # (--mode=sweep with sample.checkpoint_steps). 0: none.
    train.keep_every = 0
    # Where parameters, EMA copies and AdamW moments live (gdiff/train/sharding.py): "replicated"
    # (a full copy on every device) | "fsdp" (each array split over all devices along its largest
    # dimension the device count divides; arrays with fewer than fsdp_min_elements elements, or
    # no such dimension, replicated). The numerics are the replicated step's; checkpoints restore
    # under either layout and any device count. The start-up log gives the bytes per device.
    train.state_sharding = "replicated"
    train.fsdp_min_elements = 2**14  # 64 KiB of float32: biases and norm scales stay whole
    # Where a fresh workdir starts from: a gdiff training checkpoint (its directory or one step
    # folder), or a reference PyTorch run to continue (its model<step>.pt, or the folder: newest).
    train.resume_checkpoint = ""
    train.profile = False
    train.progress = True  # a per-step tqdm bar on process 0
    # Consecutive non-finite steps (each skipped) after which training stops with advice.
    train.max_nonfinite_steps = 20
    # Classifier training (--mode=train_classifier).
    train.classifier_noised = True
    train.classifier_batch_size = 64  # the global batch (all devices of all hosts)
    train.classifier_num_steps = 1000

    config.sample = sample = ml_collections.ConfigDict()
    sample.num_samples = 64
    # Examples per device in one sampling program (a multi-scale sweep runs each at every scale).
    sample.batch_size = 16
    # The sampler: "auto" (the reference's switch: use_ddim picks DDIM, else ancestral steps) |
    # ancestral | ddim | dpm_solver (DPM-Solver / DPM-Solver++, the dpm_solver_* keys below).
    # use_ddim=True (the reference's --use_ddim) with ancestral or dpm_solver is refused.
    sample.sampler = _SAMPLING["sample"]["sampler"]
    sample.use_ddim = False
    sample.eta = _SAMPLING["sample"]["eta"]  # DDIM's eta (0: deterministic)
    sample.clip_denoised = True  # ancestral and DDIM: clip each x_0 prediction to [-1, 1]
    # Ancestral and DDIM: overrides diffusion.timestep_respacing when set ("250", "ddim25"). The
    # DPM-Solver ignores both respacings: it solves on the model's full training chain
    # (diffusion.steps) in dpm_solver_steps steps.
    sample.timestep_respacing = ""
    # DPM-Solver (sample.sampler=dpm_solver; gdiff/diffusion/dpm_solver.py): a multistep ODE solver
    # on the training chain's betas (log-SNR clipped at -5.1, as its reference). The network sees
    # the solver's time t_input = (t - 1/N) * 1000 mapped to its own scale: t_input * steps / 1000
    # (exactly t_input for 1000 steps, or with rescale_timesteps); the noise is its first 3 output
    # channels (an x_0-predicting model's output is converted to that noise first), and guidance
    # scales the noise by -sigma_t * cond_fn.
    sample.dpm_solver_steps = _SAMPLING["sample"]["dpm_solver_steps"]  # = model evaluations (NFE)
    sample.dpm_solver_order = _SAMPLING["sample"]["dpm_solver_order"]  # 1 (= DDIM), 2 or 3
    # dpmsolver++ (data prediction; for guided sampling) | dpmsolver (noise prediction)
    sample.dpm_solver_algorithm_type = _SAMPLING["sample"]["dpm_solver_algorithm_type"]
    # time_uniform | logSNR | time_quadratic: how the steps are spaced between t = 1 and 1/N
    sample.dpm_solver_skip_type = _SAMPLING["sample"]["dpm_solver_skip_type"]
    # Lower the order over the last steps of solves with fewer than 10 steps (stabilises them).
    sample.dpm_solver_lower_order_final = _SAMPLING["sample"]["dpm_solver_lower_order_final"]
    # Imagen's dynamic thresholding of each x_0 prediction (dpmsolver++ only): the ratio-quantile
    # of |x_0| per sample, at least max_val, clips and rescales it.
    sample.dpm_solver_thresholding = _SAMPLING["sample"]["dpm_solver_thresholding"]
    sample.dpm_solver_thresholding_ratio = _SAMPLING["sample"]["dpm_solver_thresholding_ratio"]
    sample.dpm_solver_thresholding_max_val = _SAMPLING["sample"]["dpm_solver_thresholding_max_val"]
    sample.classifier_scale = "0"  # a number or comma list (sweep); < 0: away from the label
    # Guidance beyond the classifier (gdiff/sampling/guidance_rows.py), every row in one program
    # over the same noise: kinds, comma-separated: classifier | cfg (the null label of a model
    # trained with model.class_dropout) | two_network (an unconditional guide_checkpoint) |
    # autoguidance (a weaker guide_checkpoint of the same model), the last three optionally
    # "+classifier" (classifier_scale on top). Their weights w: u + w (c - u), 1 = no guidance.
    sample.guidance = _SAMPLING["sample"]["guidance"]
    sample.guidance_scale = _SAMPLING["sample"]["guidance_scale"]  # a number or comma list
    # "" = every step; "lo,hi" = only where the noise level sigma lies in (lo, hi]; several
    # intervals separated by ";" ("all" = every step), each crossed with every row above.
    sample.guidance_interval = _SAMPLING["sample"]["guidance_interval"]
    # The guide network of two_network / autoguidance: a gdiff checkpoint (converted or trained;
    # a training directory's step or EMA as sample.guide_ema_rate says, "" = its slowest EMA).
    sample.guide_checkpoint = ""
    sample.guide_ema_rate = ""
    sample.labels = "random"  # random | balanced | an int | a comma-separated list
    sample.model_checkpoint = ""  # orbax checkpoint dir (converted or trained); default: workdir
    # --mode=sweep over training: steps of the model's training run ("100000,200000,300000"),
    # each sampled at every guidance row (the table gains a `step` column and
    # training_steps.png, metrics against the step). "": its newest step (or its parameters).
    sample.checkpoint_steps = ""
    sample.classifier_checkpoint = ""
    sample.ema_rate = ""  # which EMA params to sample from ("" = the slowest of train.ema_rates)
    sample.base_samples = ""  # super-resolution: .npz of low-resolution samples
    sample.output_dir = ""  # default: <workdir>/samples
    sample.seed = _SAMPLING["sample"]["seed"]
    # An output directory holding another run (other weights or settings) is refused; True moves
    # it aside (<dir>.replaced-<time>, nothing deleted) and starts afresh.
    sample.restart = False

    config.eval = ev = ml_collections.ConfigDict()
    ev.ref_batch = ""
    ev.sample_batch = ""
    ev.inception_weights = ""  # pt_inception-2015-12-05 state dict or classify_image_graph_def.pb
    # Images per Inception forward on each host, split over its own devices (rounded up to a
    # multiple of their count): every host evaluates its files by itself.
    ev.batch_size = 64
    ev.resize = "legacy"  # legacy: TF1 bilinear as the reference evaluator; halfpixel: pytorch-fid
    ev.is_split_size = 5000  # Inception Score chunk size, as the reference evaluator
    ev.output = ""  # where the metrics JSON goes (default: next to the sample batch)
    # --mode=nll (the reference's image_nll.py): bits/dim of data.eval_split under the model of
    # sample.model_checkpoint (default: the workdir) / sample.ema_rate.
    ev.nll_num_samples = 1000
    ev.nll_batch_size = 1  # per device, as the reference's per rank
    ev.nll_clip_denoised = True
    ev.nll_output_dir = ""  # default: <workdir>/nll

    config.sweep = sweep = ml_collections.ConfigDict()
    # The diffusion models of a classifier-scale sweep (--mode=sweep, the digits pipeline), all
    # guided by the one classifier over the same noise and labels: name -> overrides of the
    # model / diffusion / optim / train / sample groups, e.g. {"unconditional": {"model":
    # {"class_cond": False}, "sample": {"classifier_scale": "0,1,10"}}}. A named model lives in
    # <workdir>/<name> unless its sample.model_checkpoint says otherwise ("{workdir}/<other>":
    # another entry's model, sampled with this entry's guidance; sample.guide_checkpoint may use
    # "{workdir}" too); entries sharing one checkpoint with other sample.sampler / steps settings
    # compare samplers (rows name each's sampler and NFE). Empty: the config's own model alone
    # (gdiff/jobs/sweep.py).
    sweep.models = ml_collections.ConfigDict()
    return config
