"""Pasted flag strings of the reference's scripts drive a gdiff config (gdiff.compat.flags).

Every flag of image_train, super_res_train, classifier_train, image_sample, super_res_sample,
classifier_sample and image_nll lands on a declared config key or is accepted with a reason; the
README examples (guided-diffusion's, and improved-diffusion's for image_train / super_res_train,
which guided-diffusion's README points to) give the configs those runs describe.
"""

import pytest

from configs import common, tiny
from gdiff import cli
from gdiff.compat import flags

# The reference's create_argparser flags of each script, beyond model/diffusion/classifier keys.
SCRIPT_FLAGS = {
    "image_train": "data_dir schedule_sampler lr weight_decay lr_anneal_steps batch_size "
    "microbatch ema_rate log_interval save_interval resume_checkpoint use_fp16 fp16_scale_growth",
    "super_res_train": "data_dir schedule_sampler lr weight_decay lr_anneal_steps batch_size "
    "microbatch ema_rate log_interval save_interval resume_checkpoint use_fp16 fp16_scale_growth "
    "large_size small_size",
    "classifier_train": "data_dir val_data_dir noised iterations lr weight_decay anneal_lr "
    "batch_size microbatch schedule_sampler resume_checkpoint log_interval eval_interval "
    "save_interval classifier_width classifier_pool",
    "image_sample": "clip_denoised num_samples batch_size use_ddim model_path",
    "super_res_sample": "clip_denoised num_samples batch_size use_ddim base_samples model_path",
    "classifier_sample": "clip_denoised num_samples batch_size use_ddim model_path "
    "classifier_path classifier_scale classifier_depth",
    "image_nll": "data_dir clip_denoised num_samples batch_size model_path",
}

# guided-diffusion README: training the 128x128 classifier.
CLASSIFIER_TRAIN = (
    "--data_dir path/to/imagenet "
    "--iterations 300000 --anneal_lr True --batch_size 256 --lr 3e-4 --save_interval 10000 "
    "--weight_decay 0.05 "
    "--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
    "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
    "--classifier_use_scale_shift_norm True"
)
# guided-diffusion README: 25-step DDIM from the 128x128 classifier-guided model.
CLASSIFIER_SAMPLE = (
    "--model_path /path/to/model.pt --classifier_path path/to/classifier.pt "
    "--attention_resolutions 32,16,8 --class_cond True --image_size 128 --learn_sigma True "
    "--num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
    "--use_scale_shift_norm True "
    "--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
    "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
    "--classifier_use_scale_shift_norm True --classifier_scale 1.0 --classifier_use_fp16 True "
    "--batch_size 4 --num_samples 50000 --timestep_respacing ddim25 --use_ddim True"
)
# improved-diffusion README (guided-diffusion's README sends training there): class-conditional
# ImageNet-64, with the microbatch its text suggests for one GPU.
IMAGE_TRAIN = (
    "--data_dir path/to/images "
    "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True "
    "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False "
    "--rescale_timesteps False "
    "--lr 3e-4 --batch_size 2048 --microbatch 16"
)
# improved-diffusion README: the L_vlb objective.
IMAGE_TRAIN_VLB = (
    "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
    "--diffusion_steps 4000 --noise_schedule cosine --use_kl True "
    "--lr 1e-4 --batch_size 128 --schedule_sampler loss-second-moment"
)
# improved-diffusion README: the 256x256 upsampler.
SUPER_RES_TRAIN = (
    "--num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True "
    "--diffusion_steps 4000 --noise_schedule linear --rescale_learned_sigmas False "
    "--rescale_timesteps False "
    "--lr 3e-4 --batch_size 256"
)


def _locked(config):
    config.lock()  # a flag that named an undeclared key would raise, not add it
    return config


@pytest.mark.parametrize("script", flags.SCRIPTS)
def test_every_flag_of_every_script_has_a_declared_place_or_a_reason(script):
    defaults = flags.script_defaults(script)
    assert set(SCRIPT_FLAGS[script].split()) <= set(defaults)
    for name, value in defaults.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        parsed = flags.parse_flags(f"--{name}={text}", script=script)
        config = _locked(common.get_config())
        flags.write_config(config, parsed, script)  # raises on an undeclared key
        place = flags.place(name, script)
        if place.group:
            assert config[place.group][place.key] == place.convert(parsed[name]), name
        else:
            assert name in flags.NO_PLACE
            assert flags.notes(parsed, script) == [f"--{name}={value}: ignored: {place.note}"]


def test_the_place_of_a_flag_depends_on_the_script():
    where = {s: flags.place("batch_size", s)[:2] for s in flags.SCRIPTS}
    assert where == {
        "image_train": ("train", "batch_size"),
        "super_res_train": ("train", "batch_size"),
        "classifier_train": ("train", "classifier_batch_size"),
        "image_sample": ("sample", "batch_size"),
        "super_res_sample": ("sample", "batch_size"),
        "classifier_sample": ("sample", "batch_size"),
        "image_nll": ("eval", "nll_batch_size"),
    }
    assert flags.place("batch_size") == flags.TO_CONFIG["batch_size"]  # today's: the samplers'
    assert flags.place("timestep_respacing")[:2] == ("sample", "timestep_respacing")
    assert flags.place("timestep_respacing", "image_train")[:2] == (
        "diffusion",
        "timestep_respacing",
    )
    assert flags.place("data_dir", "image_nll")[:2] == ("data", "eval_folder")
    assert flags.place("iterations", "classifier_train")[:2] == ("train", "classifier_num_steps")
    with pytest.raises(ValueError, match="unknown reference script 'image_trian'"):
        flags.place("lr", "image_trian")


def test_unknown_flags_name_the_closest_or_the_script_that_has_them():
    with pytest.raises(TypeError, match="--lr_anneal_step: did you mean --lr_anneal_steps"):
        flags.parse_flags("--lr_anneal_step 10", script="image_train")
    with pytest.raises(TypeError, match="--iterations is a flag of classifier_train, not of image"):
        flags.parse_flags("--iterations 10", script="image_train")
    with pytest.raises(TypeError, match="--classifier_scale is a flag of classifier_sample"):
        flags.parse_flags("--classifier_scale 1", script="image_sample")
    with pytest.raises(TypeError, match="expects float"):
        flags.parse_flags("--lr fast", script="image_train")


def test_classifier_train_readme_flags():
    config = _locked(common.get_config())
    notes = flags.write_flags(config, CLASSIFIER_TRAIN, "classifier_train")
    assert (config.data.source, config.data.folder) == ("folder", "path/to/imagenet")
    assert config.data.image_size == config.model.image_size == 128
    assert config.train.classifier_num_steps == 300000 and config.train.classifier_batch_size == 256
    assert config.optim.anneal_lr and config.optim.lr == 3e-4 and config.optim.weight_decay == 0.05
    assert config.train.save_every == 10000
    c = config.classifier
    assert (c.attention_resolutions, c.depth, c.width, c.pool) == ((32, 16, 8), 2, 128, "attention")
    assert c.resblock_updown and c.use_scale_shift_norm
    assert config.train.batch_size == common.get_config().train.batch_size  # not the diffusion's
    assert notes == [f"--batch_size=256 -> train.classifier_batch_size: {flags._GLOBAL_BATCH}"]


def test_classifier_sample_readme_flags():
    config = _locked(common.get_config())
    notes = flags.write_flags(config, CLASSIFIER_SAMPLE, "classifier_sample")
    s = config.sample
    assert (s.batch_size, s.num_samples, s.timestep_respacing, s.use_ddim) == (
        4,
        50000,
        "ddim25",
        True,
    )
    assert s.classifier_scale == "1.0"
    assert config.model.dtype == config.classifier.dtype == "bfloat16"
    assert (config.model.num_channels, config.model.image_size) == (256, 128)
    assert config.diffusion.timestep_respacing == ""  # the model's own chain is untouched
    assert [n.split(":")[0] for n in notes] == [
        "--model_path=/path/to/model.pt",
        "--classifier_path=path/to/classifier.pt",
    ]
    assert all("ignored: gdiff reads converted checkpoints" in n for n in notes)


def test_image_train_readme_flags():
    config = _locked(common.get_config())
    notes = flags.write_flags(config, IMAGE_TRAIN, "image_train")
    assert (config.data.source, config.data.folder) == ("folder", "path/to/images")
    assert (config.model.image_size, config.model.num_channels, config.model.num_res_blocks) == (
        64,
        192,
        3,
    )
    assert config.model.learn_sigma and config.model.class_cond and config.data.class_cond
    d = config.diffusion
    assert (d.steps, d.noise_schedule, d.rescale_learned_sigmas, d.rescale_timesteps) == (
        4000,
        "cosine",
        False,
        False,
    )
    assert (config.optim.lr, config.train.batch_size, config.train.microbatch) == (3e-4, 2048, 16)
    assert config.sample.batch_size == common.get_config().sample.batch_size
    assert len(notes) == 2 and "per MPI rank" in notes[0] and "per MPI rank" in notes[1]
    vlb = _locked(common.get_config())
    flags.write_flags(vlb, IMAGE_TRAIN_VLB, "image_train")
    assert vlb.diffusion.use_kl and vlb.train.schedule_sampler == "loss-second-moment"


def test_super_res_train_readme_flags_with_the_scripts_defaults():
    config = _locked(tiny.get_config())
    flags.write_flags(config, SUPER_RES_TRAIN, "super_res_train", with_defaults=True)
    # large_size / small_size were not given: the script's defaults (256 from 64) apply.
    assert (config.model.image_size, config.model.small_size) == (256, 64)
    assert (config.model.num_channels, config.train.batch_size, config.optim.lr) == (192, 256, 3e-4)
    assert config.diffusion.steps == 4000 and config.diffusion.noise_schedule == "linear"
    # The rest is the reference's defaults, not the tiny config's.
    assert config.model.attention_resolutions == (16, 8) and config.model.channel_mult == ()
    assert config.train.ema_rates == "0.9999" and config.train.log_every == 10
    assert (
        not config.optim.anneal_lr and config.train.num_steps == tiny.get_config().train.num_steps
    )
    assert config.data.source == "digits"  # data_dir was not given: no folder is invented
    with pytest.raises(ValueError, match="needs the script"):
        flags.write_flags(config, "", None, with_defaults=True)


def test_lr_anneal_steps_sets_the_anneal_and_the_length():
    config = _locked(common.get_config())
    notes = flags.write_flags(
        config, "--lr_anneal_steps 5000 --fp16_scale_growth 1e-3", "image_train"
    )
    assert config.optim.anneal_lr and config.train.num_steps == 5000
    assert notes[0].startswith("--lr_anneal_steps=5000 -> optim.anneal_lr: anneals")
    assert "bfloat16" in notes[1] and "ignored" in notes[1]
    flags.write_flags(config, "--lr_anneal_steps 0", "image_train")
    assert not config.optim.anneal_lr and config.train.num_steps == 5000


def test_image_nll_flags_and_the_command_line():
    config = _locked(tiny.get_config())
    cli.apply_reference_flags(
        config,
        "--data_dir held/out --num_samples 12 --batch_size 3 --clip_denoised False "
        "--timestep_respacing 10 --model_path m.pt",
        "image_nll",
        False,
    )
    ev = config.eval
    assert (ev.nll_num_samples, ev.nll_batch_size, ev.nll_clip_denoised) == (12, 3, False)
    assert (config.data.source, config.data.eval_folder) == ("folder", "held/out")
    assert config.diffusion.timestep_respacing == "10"
    assert "nll" in cli.MODES
    with pytest.raises(cli.UsageError, match="needs --reference_script"):
        cli.apply_reference_flags(config, "--lr 1", None, False)
    with pytest.raises(cli.UsageError, match="did you mean --num_samples"):
        cli.apply_reference_flags(config, "--num_sample 3", "image_nll", False)
    cli.apply_reference_flags(config, None, None, False)  # nothing given: nothing to do


def test_default_mapping_is_todays():
    """No script: the sampling scripts' places, where the released configs' strings go."""
    kw = flags.parse_flags("--batch_size 4 --num_samples 100 --timestep_respacing 250")
    assert flags.to_config(kw) == {
        "sample": {"batch_size": 4, "num_samples": 100, "timestep_respacing": "250"}
    }
    assert flags.to_config({"model_path": "x.pt"}) == {}


def test_with_defaults_the_classifier_is_the_references():
    config = _locked(tiny.get_config())
    flags.write_flags(config, CLASSIFIER_TRAIN, "classifier_train", with_defaults=True)
    c = config.classifier
    assert (c.channel_mult, c.num_head_channels) == ((), 64)
    assert config.train.eval_every == 5 and config.train.classifier_noised
    assert config.data.eval_folder == ""  # val_data_dir not given: no held-out folder invented


def test_use_checkpoint_is_the_full_remat_policy():
    """The reference's use_checkpoint (recompute every block) lands on gdiff's model.remat."""
    assert flags.to_config({"use_checkpoint": True}) == {"model": {"remat": "full"}}
    assert flags.to_config({"use_checkpoint": False}) == {"model": {"remat": "none"}}
    config = tiny.get_config()
    flags.write_flags(config, "--use_checkpoint True", "image_train")
    assert config.model.remat == "full" and "use_checkpoint" not in config.model
