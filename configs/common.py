"""The base configuration every experiment file starts from.

Groups mirror the stages of the method: `data`, `model` (the diffusion UNet), `diffusion`,
`classifier` (the noise-aware classifier), `optim`, `train`, `sample`, `eval`. Keys inside `model`,
`diffusion` and `classifier` carry the reference implementation's own names (its `MODEL_FLAGS`,
`DIFFUSION_FLAGS` and `CLASSIFIER_FLAGS`), so a reference flag string maps onto them one to one
(`gdiff.compat.openai.parse_flags`). Experiment files override groups and call `lock`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Where a released PyTorch checkpoint lives, for --mode=convert.
    config.torch_checkpoint = ""
    # Which network --mode=convert converts: "model" or "classifier".
    config.convert_target = "model"
    # jax.distributed.initialize(): "auto" initialises when the environment names a coordinator
    # (a TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS); True forces it; False never.
    config.distributed = "auto"

    config.data = data = ml_collections.ConfigDict()
    data.source = "digits"  # digits | tfds | folder
    data.name = ""  # tfds name, e.g. "imagenet2012" or "imagenet_resized/64x64"
    data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir
    data.folder = ""  # the reference's image-folder layout (class = file-name prefix before "_")
    data.train_split = "train"
    data.eval_split = "validation"
    data.image_size = 16
    data.class_cond = True
    data.num_classes = 10
    data.random_flip = True
    data.random_crop = False  # the classifier's augmentation in the reference
    data.shuffle_buffer = 10_000
    data.prefetch = 2

    config.model = model = ml_collections.ConfigDict()
    # The reference's model_and_diffusion_defaults() model keys.
    model.image_size = 16
    model.num_channels = 32
    model.num_res_blocks = 1
    model.num_heads = 4
    model.num_heads_upsample = -1
    model.num_head_channels = -1
    model.attention_resolutions = "8"
    model.channel_mult = ""
    model.dropout = 0.0
    model.class_cond = True
    model.use_checkpoint = False
    model.use_scale_shift_norm = True
    model.resblock_updown = False
    model.use_fp16 = False
    model.use_new_attention_order = False
    model.learn_sigma = True
    # gdiff's own additions.
    model.num_classes = 10  # the reference hard-codes 1000 (ImageNet)
    model.dtype = "float32"  # compute dtype; "bfloat16" for mixed precision (params stay float32)
    model.super_res = False  # SuperResModel: image_size is the large size
    model.small_size = 0  # low-resolution input size for super_res

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.steps = 1000
    diffusion.noise_schedule = "cosine"
    diffusion.timestep_respacing = ""
    diffusion.use_kl = False
    diffusion.predict_xstart = False
    diffusion.rescale_timesteps = False
    diffusion.rescale_learned_sigmas = False
    diffusion.sigma_small = False

    config.classifier = classifier = ml_collections.ConfigDict()
    # The reference's classifier_defaults() keys (image_size comes from model.image_size).
    classifier.classifier_use_fp16 = False
    classifier.classifier_width = 32
    classifier.classifier_depth = 1
    classifier.classifier_attention_resolutions = "8"
    classifier.classifier_use_scale_shift_norm = True
    classifier.classifier_resblock_updown = True
    classifier.classifier_pool = "attention"
    classifier.num_classes = 10
    # The reference hard-codes these two; small images need smaller values.
    classifier.num_head_channels = 64
    classifier.channel_mult = ""  # "" = the reference's table for 64/128/256/512
    classifier.dtype = "float32"

    config.optim = optim = ml_collections.ConfigDict()
    optim.lr = 1e-4
    optim.weight_decay = 0.0
    optim.anneal_lr = False  # linear decay to 0 over train.num_steps (the reference's classifiers)
    optim.grad_clip = 0.0  # 0 disables; the reference does not clip
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 64  # global batch (all devices of all hosts)
    train.microbatch = -1  # -1: no gradient accumulation; else examples per micro-step (global)
    train.num_steps = 1000
    train.ema_rates = "0.9999"
    train.schedule_sampler = "uniform"  # uniform | loss-second-moment
    train.log_every = 50
    train.save_every = 1000
    train.sample_every = 0  # 0 disables the periodic sample grid
    train.eval_every = 0  # classifier held-out evaluation
    train.eval_batches = 4
    train.max_to_keep = 3
    train.resume_checkpoint = ""
    train.profile = False
    train.progress = True  # a per-step tqdm bar on process 0
    # Classifier training (--mode=train_classifier).
    train.classifier_noised = True
    train.classifier_batch_size = 64
    train.classifier_num_steps = 1000

    config.sample = sample = ml_collections.ConfigDict()
    sample.num_samples = 64
    sample.batch_size = 16  # per device
    sample.use_ddim = False
    sample.eta = 0.0
    sample.clip_denoised = True
    sample.timestep_respacing = ""  # overrides diffusion.timestep_respacing when set
    sample.classifier_scale = "0"  # a number, or a comma-separated list for a sweep
    sample.labels = "random"  # random | balanced | an int | a comma-separated list
    sample.model_checkpoint = ""  # orbax checkpoint dir (converted or trained); default: workdir
    sample.classifier_checkpoint = ""
    sample.ema_rate = ""  # which EMA params to sample from ("" = the first of train.ema_rates)
    sample.base_samples = ""  # super-resolution: .npz of low-resolution samples
    sample.output_dir = ""  # default: <workdir>/samples
    sample.seed = 0

    config.eval = ev = ml_collections.ConfigDict()
    ev.ref_batch = ""
    ev.sample_batch = ""
    ev.inception_weights = ""  # pt_inception-2015-12-05 state dict or classify_image_graph_def.pb
    ev.batch_size = 64
    ev.resize = "legacy"  # legacy: TF1 bilinear as the reference evaluator; halfpixel: pytorch-fid
    ev.is_split_size = 5000  # Inception Score chunk size, as the reference evaluator
    ev.output = ""  # where the metrics JSON goes (default: next to the sample batch)
    return config
