"""Released-checkpoint configs: the reference README's flags and the released parameter counts.

Counts come from the modules the configs build (`jax.eval_shape`, nothing allocated). The four
the task states are checked by default; the rest (also derived from the reference architecture
and matching the paper's Table 11-13 sizes) are marked slow because each trace takes seconds.
"""

import importlib

import pytest

from gdiff import factory
from gdiff.compat import openai

# name -> exact parameter count of the module the config builds.
COUNTS = {
    "imagenet64": 295_904_454,
    "imagenet256": 553_838_086,
    "imagenet64_classifier": 65_438_568,
    "imagenet256_classifier": 54_096_360,
}
SLOW_COUNTS = {
    "imagenet128": 421_529_606,
    "imagenet128_classifier": 42_568_040,
    "imagenet256_uncond": 552_814_086,
    "imagenet512": 558_997_638,
    "imagenet512_classifier": 54_448_360,
    "upsampler_64_256": 311_795_910,
    "upsampler_128_512": 308_835_270,
    "lsun_bedroom": 552_814_086,
    "lsun_cat": 552_814_086,
    "lsun_horse": 552_814_086,
    "lsun_horse_nodropout": 552_814_086,
}
ALL = {**COUNTS, **SLOW_COUNTS}


def _config(name):
    return importlib.import_module(f"configs.released.{name}").get_config()


def _count(name):
    config = _config(name)
    if config.convert_target == "classifier":
        return factory.param_count(factory.build_classifier(config))
    return factory.param_count(factory.build_model(config))


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_param_count_equals_released(name):
    assert _count(name) == COUNTS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_COUNTS))
def test_param_count_equals_released_slow(name):
    assert _count(name) == SLOW_COUNTS[name]


@pytest.mark.parametrize("name", sorted(ALL))
def test_config_carries_the_readme_flags(name):
    config = _config(name)
    module = importlib.import_module(f"configs.released.{name}")
    base = (
        module
        if hasattr(module, "MODEL_FLAGS")
        else importlib.import_module(f"configs.released.{name.removesuffix('_classifier')}")
    )
    for key, value in openai.parse_flags(base.MODEL_FLAGS).items():
        if key == "diffusion_steps":
            assert config.diffusion.steps == value
        elif key == "noise_schedule":
            assert config.diffusion.noise_schedule == value
        elif key == "large_size":
            assert config.model.image_size == value and config.model.super_res
        elif key == "small_size":
            assert config.model.small_size == value
        else:
            assert config.model[key] == value, key
    assert config.torch_checkpoint.endswith(".pt")
    assert config.convert_target == ("classifier" if name.endswith("_classifier") else "model")


def test_guidance_scales_and_sampling_defaults():
    scales = {"imagenet64": "1.0", "imagenet128": "0.5", "imagenet256": "1.0",
              "imagenet256_uncond": "10.0", "imagenet512": "4.0", "lsun_bedroom": "0"}  # fmt: skip
    for name, scale in scales.items():
        assert _config(name).sample.classifier_scale == scale, name
    assert _config("imagenet64").classifier.classifier_depth == 4
    assert _config("imagenet128").classifier.classifier_depth == 2
    assert _config("imagenet256").sample.timestep_respacing == "250"
    assert _config("lsun_cat").sample.timestep_respacing == "1000"
