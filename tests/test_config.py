"""The typed config: facts declared once, typed command-line overrides, the flag table, and the
reference adapter building exactly what the factory builds from the same values."""

import pytest
from absl import flags as absl_flags
from ml_collections import config_flags

from configs import common, tiny
from gdiff import factory
from gdiff.compat import flags, openai


def _parse(*overrides: str):
    # config_flags registers the --config.<key> override flags from the argv it is given.
    argv = ["prog", "--config=configs/tiny.py", *overrides]
    values = absl_flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv, lock_config=True)
    values(argv)
    return values.config


def test_image_size_classes_and_conditioning_are_one_fact_each():
    config = common.get_config()
    config.model.image_size = 32
    config.classifier.num_classes = 7
    config.model.class_cond = False
    assert config.data.image_size == 32 and config.model.image_size == 32
    assert config.data.num_classes == config.model.num_classes == 7
    assert config.data.class_cond is False
    config.model.channel_mult = config.classifier.channel_mult = (1, 2)
    config.classifier.attention_resolutions = (16,)
    classifier = factory.build_classifier(config)
    assert classifier.image_size == 32 and classifier.out_channels == 7
    assert factory.build_model(config).num_classes is None  # unconditional


def test_command_line_overrides_typed_and_formerly_undeclared_keys():
    config = _parse(
        "--config.model.channel_mult=(1,2,2)",
        "--config.model.attention_resolutions=(4,2)",
        "--config.data.num_classes=5",
        "--config.data.eval_folder=/data/held_out",
        "--config.train.max_nonfinite_steps=3",
    )
    assert config.model.channel_mult == (1, 2, 2)
    assert config.classifier.num_classes == 5 and config.model.num_classes == 5
    assert config.data.eval_folder == "/data/held_out"
    assert config.train.max_nonfinite_steps == 3
    model = factory.build_model(config)
    assert model.channel_mult == (1, 2, 2) and model.attention_resolutions == (2, 4)
    with pytest.raises(AttributeError, match='Did you mean "dtype"'):
        _parse("--config.model.dtyp=bfloat16")


def test_flag_table_places_and_types():
    assert flags.TO_CONFIG["classifier_width"][:2] == ("classifier", "width")
    assert flags.TO_CONFIG["classifier_scale"][:2] == ("sample", "classifier_scale")
    assert flags.TO_CONFIG["diffusion_steps"][:2] == ("diffusion", "steps")
    groups = flags.to_config(
        flags.parse_flags(
            "--attention_resolutions 32,16,8 --channel_mult 0.5,1,2 --use_fp16 True "
            "--classifier_use_fp16 False --large_size 256 --small_size 64 --classifier_scale 2"
        )
    )
    assert groups["model"] == {
        "attention_resolutions": (32, 16, 8),
        "channel_mult": (0.5, 1, 2),
        "dtype": "bfloat16",
        "image_size": 256,
        "small_size": 64,
    }
    assert groups["classifier"] == {"dtype": "float32"}
    assert groups["sample"] == {"classifier_scale": "2.0"}
    assert flags.to_config({"lr": 1e-4}) == {"optim": {"lr": 1e-4}}
    with pytest.raises(KeyError, match="--learning_rate has no place"):
        flags.to_config({"learning_rate": 1e-4})
    with pytest.raises(TypeError, match="did you mean --num_channels"):
        flags.parse_flags("--num_chanels 64")


@pytest.mark.parametrize(
    "ref",
    [
        "--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
        "--attention_resolutions 16 --class_cond True --learn_sigma True --use_fp16 True",
        "--image_size 64 --num_channels 64 --num_res_blocks 2 --resblock_updown True "
        "--num_head_channels 32 --use_new_attention_order True --dropout 0.1",
    ],
)
def test_adapter_builds_what_the_factory_builds_from_the_same_config(ref):
    kw = {**flags.model_and_diffusion_defaults(), **flags.parse_flags(ref)}
    model, diffusion = openai.create_model_and_diffusion(**kw, num_classes=10)
    config = tiny.get_config()
    flags.write_config(config, kw)
    config.data.num_classes = 10
    config.diffusion.timestep_respacing = config.sample.timestep_respacing
    assert factory.build_model(config) == model
    native = factory.build_diffusion(config)
    assert native.num_timesteps == diffusion.num_timesteps
    assert (native.betas == diffusion.betas).all()
    assert native.model_var_type == diffusion.model_var_type


def test_classifier_without_a_reference_table_needs_multipliers():
    config = tiny.get_config()
    config.classifier.channel_mult = ()
    with pytest.raises(ValueError, match="unsupported image size: 8"):
        factory.build_classifier(config)
