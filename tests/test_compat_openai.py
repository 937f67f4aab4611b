"""The reference-compatible front door: defaults, factories, flag parsing, lazy re-exports."""

import jax.numpy as jnp
import pytest

from gdiff.compat import openai
from gdiff.models import unet


def test_defaults_have_the_reference_keys():
    assert set(openai.diffusion_defaults()) == {
        "learn_sigma", "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl",
        "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas",
    }  # fmt: skip
    assert openai.model_and_diffusion_defaults()["num_channels"] == 128
    assert openai.classifier_defaults()["classifier_attention_resolutions"] == "32,16,8"
    sr = openai.sr_model_and_diffusion_defaults()
    assert sr["large_size"] == 256 and sr["small_size"] == 64 and "image_size" not in sr


def test_parse_flags_types_values_like_the_reference():
    kw = openai.parse_flags(
        "--image_size 64 --class_cond true --use_fp16 0 --dropout 0.1 "
        "--attention_resolutions 32,16,8 --classifier_scale=2 --learn_sigma True"
    )
    assert kw == {
        "image_size": 64, "class_cond": True, "use_fp16": False, "dropout": 0.1,
        "attention_resolutions": "32,16,8", "classifier_scale": 2.0, "learn_sigma": True,
    }  # fmt: skip
    with pytest.raises(TypeError, match=r"\['bogus', 'nope'\]"):
        openai.parse_flags("--bogus 1 --image_size 64 --nope 2")
    with pytest.raises(TypeError, match="boolean"):
        openai.parse_flags("--class_cond maybe")


def test_create_model_and_diffusion_checks_keys():
    kw = openai.model_and_diffusion_defaults()
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['colour'\]"):
        openai.create_model_and_diffusion(**kw, colour=1)
    del kw["num_channels"], kw["dropout"]
    with pytest.raises(TypeError, match=r"missing argument\(s\) \['num_channels', 'dropout'\]"):
        openai.create_model_and_diffusion(**kw)
    with pytest.raises(TypeError, match="classifier_width"):
        openai.create_classifier(image_size=64)


def test_factories_map_reference_flags_onto_modules():
    flags = openai.parse_flags(
        "--attention_resolutions 32,16,8 --class_cond True --image_size 64 --learn_sigma True "
        "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 --use_fp16 True"
    )
    model, diffusion = openai.create_model_and_diffusion(
        **{**openai.model_and_diffusion_defaults(), **flags}
    )
    assert isinstance(model, unet.UNetModel)
    assert model.attention_resolutions == (2, 4, 8)
    assert model.channel_mult == (1, 2, 3, 4) and model.out_channels == 6
    assert model.num_classes == 1000 and model.dtype == jnp.bfloat16
    assert diffusion.num_timesteps == 1000
    small = openai.create_model(image_size=32, num_channels=32, num_res_blocks=1,
                                channel_mult="1,2", class_cond=True, num_classes=10,
                                dtype="float32", use_fp16=True)  # fmt: skip
    assert small.num_classes == 10 and small.dtype == jnp.float32  # explicit dtype wins
    clf = openai.create_classifier(**{**openai.classifier_defaults(), "image_size": 128})
    assert clf.channel_mult == (1, 1, 2, 3, 4) and clf.num_head_channels == 64
    with pytest.raises(ValueError, match="unsupported image size"):
        openai.create_model(image_size=48, num_channels=32, num_res_blocks=1)


def test_lazy_reexports_resolve():
    assert callable(openai.classifier_cond_fn)
    assert callable(openai.get_named_beta_schedule)
    assert hasattr(openai.ModelMeanType, "EPSILON")
    with pytest.raises(AttributeError):
        openai.not_a_name  # noqa: B018
