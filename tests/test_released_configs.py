"""Released-checkpoint configs: the reference README's flags (gdiff.compat.released) and the
released parameter counts.

Counts come from the modules the configs build (`jax.eval_shape`, nothing allocated). The four
the task states are checked by default; the rest (also derived from the reference architecture
and matching the paper's Table 11-13 sizes) are marked slow because each trace takes seconds.
"""

import ast
import importlib
import pathlib
import shlex

import numpy as np
import pytest

from gdiff import cli, factory
from gdiff.compat import flags, openai, released
from gdiff.sampling import sampler as sampler_lib

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


def test_every_released_config_has_its_readme_entry():
    assert set(released.CHECKPOINTS) == set(ALL)


@pytest.mark.parametrize("name", sorted(ALL))
def test_config_carries_the_readme_flags(name):
    config = _config(name)
    checkpoint = released.CHECKPOINTS[name]
    for key, value in openai.parse_flags(checkpoint.all_flags).items():
        group, field, typed = flags.TO_CONFIG[key][:3]
        if key == "classifier_use_fp16" and name.endswith("_classifier"):
            # A classifier config trains, and classifier_train.py's flags leave it in float32;
            # the README's sampling flags (the diffusion config) guide in bfloat16.
            assert config.classifier.dtype == "float32"
            continue
        assert config[group][field] == typed(value), key
    # Typed as the factory reads them: tuples of pixels, a compute dtype name.
    assert isinstance(config.model.attention_resolutions, tuple)
    assert config.model.dtype == (
        "bfloat16" if "--use_fp16 True" in checkpoint.model_flags else "float32"
    )
    if "--large_size" in checkpoint.model_flags:
        assert config.model.small_size > 0 and config.data.image_size == config.model.image_size
    assert config.torch_checkpoint == f"models/{checkpoint.file}"
    assert config.convert_target == checkpoint.network
    assert checkpoint.network == ("classifier" if name.endswith("_classifier") else "model")


def test_guidance_scales_and_sampling_defaults():
    scales = {"imagenet64": "1.0", "imagenet128": "0.5", "imagenet256": "1.0",
              "imagenet256_uncond": "10.0", "imagenet512": "4.0", "lsun_bedroom": "0"}  # fmt: skip
    for name, scale in scales.items():
        assert _config(name).sample.classifier_scale == scale, name
    assert _config("imagenet64").classifier.depth == 4
    assert _config("imagenet128").classifier.depth == 2
    assert _config("imagenet256").sample.timestep_respacing == "250"
    assert _config("lsun_cat").sample.timestep_respacing == "1000"


def test_reference_kwargs_of_the_readme_flags():
    """The kwargs that the reference's factories take, from the table (what benchmarks/ builds)."""
    kw = released.model_and_diffusion_kwargs("imagenet64")
    assert set(kw) == set(flags.model_and_diffusion_defaults())
    assert (kw["num_channels"], kw["num_res_blocks"], kw["dropout"]) == (192, 3, 0.1)
    assert released.classifier_kwargs("imagenet64_classifier") == {
        **flags.classifier_defaults(),
        "image_size": 64,
        "classifier_depth": 4,
        "classifier_use_fp16": True,
    }
    assert released.classifier_kwargs("imagenet256")["image_size"] == 256
    sr = released.model_and_diffusion_kwargs("upsampler_128_512")
    assert set(sr) == set(flags.SR_KEYS)
    assert (sr["large_size"], sr["small_size"]) == (512, 128)
    with pytest.raises(KeyError, match="imagenet64"):
        released.get("imagenet65")


def _program(groups, guided: bool):
    """What a sampling run's program is made of: networks, diffusion, sampler options."""
    sampler, model, classifier = sampler_lib.build_sampler(groups, guided=guided)
    d = sampler.diffusion
    return model, classifier, sampler.options, (d.num_timesteps, d.model_var_type), d


@pytest.mark.parametrize("name", sorted(n for n in ALL if not n.endswith("_classifier")))
def test_plain_dict_groups_build_the_configs_sampling_program(name):
    """`released.sampling_groups` (no ml_collections: what the benchmarks build) and the
    config's own groups (what --mode=sample builds) give the same networks, dtypes, attention,
    diffusion and sampler options, through the one builder. (A `*_classifier` config converts
    and trains the classifier, in float32; the diffusion config is the one that samples.)"""
    config = _config(name)
    groups = {g: config[g] for g in ("model", "diffusion", "classifier", "sample")}
    guided = config.sample.classifier_scale != "0"  # the LSUN models and upsamplers: unguided
    *ours, diffusion = _program(released.sampling_groups(name), guided)
    *theirs, expected = _program(groups, guided)
    assert ours == theirs
    np.testing.assert_array_equal(diffusion.timestep_map, expected.timestep_map)
    np.testing.assert_array_equal(diffusion.betas, expected.betas)
    # Every key of the plain groups holds the config's value.
    for group, values in released.sampling_groups(name).items():
        for key, value in values.items():
            if (
                group in ("model", "classifier")
                and key == "num_classes"
                and not config.model.class_cond
            ):
                continue  # an unconditional model reads no class count (LSUN configs: 1)
            if (group, key) == ("model", "remat"):
                continue  # a training setting (the 256/512 configs recompute), not a sampling one
            assert config[group][key] == value, f"{group}.{key}"


def _docstring_commands(path):
    """The `python main.py ...` commands of a config file's docstring, as argv lists."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    lines = doc.replace("\\\n", " ").splitlines()
    return [shlex.split(x.strip())[1:] for x in lines if x.strip().startswith("python main.py")]


@pytest.mark.parametrize(
    "path",
    sorted(pathlib.Path(cli.CONFIG_DIR).glob("released/[!_]*.py"))
    + sorted(pathlib.Path(cli.CONFIG_DIR).glob("ablations/*.py")),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_docstring_commands_name_only_keys_the_config_has(path):
    """Each command a config's docstring gives (ancestral, DPM-Solver++, sweep) resolves its config
    and names only existing `--config.<key>`s, as `gdiff` checks before it runs anything."""
    commands = _docstring_commands(path)
    assert commands, path
    for argv in commands:
        cli.prepare_argv(argv)  # raises UsageError on an unknown config or key
    if path.parent.name == "released" and not path.stem.endswith("_classifier"):
        assert any("--config.sample.sampler=dpm_solver" in argv for argv in commands), path


def test_paper_ablations_sample_the_released_models():
    """fig4: the released 128x128 model, 250 ancestral steps; table5:<R>: Table 14's 25-step
    DDIM scale on the released RxR model."""
    from configs.ablations import fig4, table5

    config = fig4.get_config()
    assert config.model.to_dict() == _config("imagenet128").model.to_dict()
    assert (config.sample.timestep_respacing, config.sample.use_ddim) == ("250", False)
    for resolution, scale in (("128", "1.25"), ("256", "2.5"), ("512", "9.0")):
        config = cli.load_config(cli.resolve_config(f"ablations/table5:{resolution}"))
        assert config.model.to_dict() == _config(f"imagenet{resolution}").model.to_dict()
        s = config.sample
        assert (s.classifier_scale, s.timestep_respacing, s.use_ddim) == (scale, "ddim25", True)
        assert s.num_samples == 50_000
    with pytest.raises(ValueError, match="128, 256, 512"):
        table5.get_config("64")
