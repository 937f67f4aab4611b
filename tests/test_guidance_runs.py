"""Guidance kinds and intervals as a user runs them: `--mode=sample` rows (folders, manifest
pins, resume), `--mode=sweep` rows compared on one table and frontier plot, and the one-line
errors of bad guidance settings."""

import json
import math

import jax
import numpy as np
import pytest
from conftest import perturbed

from configs import tiny as tiny_config
from gdiff import errors, factory
from gdiff.checkpoints import store
from gdiff.engine import manifest as manifest_lib
from gdiff.evaluation import ClassifierExtractor, SmallClassifier, metrics, report
from gdiff.jobs import sample as sample_run
from gdiff.jobs import sweep
from gdiff.sampling import guidance_rows, sample_files

N = 8


def _tiny(**model):
    config = tiny_config.get_config()
    config.classifier.num_head_channels = 32
    config.model.class_dropout = 0.1
    for k, v in model.items():
        config.model[k] = v
    return config


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny conditional model with a null class, an unconditional one (the guide of
    two-network guidance; a parameter checkpoint records no settings: its class conditioning
    is read off its parameters), and a classifier, as parameter checkpoints."""
    root = tmp_path_factory.mktemp("guidance_ckpts")
    for name, model in (
        ("model", {}),
        ("uncond", {"class_cond": False, "class_dropout": 0.0}),
    ):
        net = factory.build_model(_tiny(**model))
        variables = perturbed(factory.init_variables(net, jax.random.key(len(name))), 3, 0.1)
        store.save_params(root / name, variables["params"], metadata={})
    cls = factory.init_variables(factory.build_classifier(_tiny()), jax.random.key(9))
    store.save_params(root / "cls", perturbed(cls, 1, 0.2)["params"], metadata={})
    return root


def _config(ckpts, out, **sample):
    config = _tiny()
    s = config.sample
    s.num_samples = N
    s.batch_size = 1
    s.timestep_respacing = "3"
    s.labels = "balanced"
    s.model_checkpoint = str(ckpts / "model")
    s.classifier_checkpoint = str(ckpts / "cls")
    s.guide_checkpoint = str(ckpts / "uncond")
    s.output_dir = str(out)
    for k, v in sample.items():
        s[k] = v
    return config


def test_rows_from_the_sample_keys():
    config = _tiny()
    s = config.sample
    # The default: the reference's classifier rows, folders scale_<s>, equal to their scales.
    s.classifier_scale = "0,2"
    rows = guidance_rows.parse_rows(s)
    assert rows == (0.0, 2.0) and [r.folder() for r in rows] == ["scale_0", "scale_2"]
    s.guidance = "classifier,cfg,two_network+classifier"
    s.classifier_scale = "1"
    s.guidance_scale = "2,3"
    s.guidance_interval = "all;0.3,5"
    rows = guidance_rows.parse_rows(s)
    folders = [r.folder() for r in rows]
    assert folders == [
        "scale_1",
        "scale_1_sigma_0.3-5",
        "cfg_2",
        "cfg_3",
        "cfg_2_sigma_0.3-5",
        "cfg_3_sigma_0.3-5",
        "two_network_2+classifier_1",
        "two_network_3+classifier_1",
        "two_network_2+classifier_1_sigma_0.3-5",
        "two_network_3+classifier_1_sigma_0.3-5",
    ]
    assert rows[-1].settings() == {
        "kind": "two_network",
        "weight": 3.0,
        "classifier_scale": 1.0,
        "interval": ["0.3", "5"],
    }
    assert rows[-1].method() == "two_network+classifier 1, sigma in (0.3, 5]"
    arrays = guidance_rows.row_arrays(rows, 2)
    np.testing.assert_array_equal(arrays["guide_kinds"][::2], [0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(arrays["guide_scales"][::2], [1, 1, 2, 3, 2, 3, 2, 3, 2, 3])
    np.testing.assert_array_equal(arrays["scales"][::2], [1, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    assert arrays["sigma_hi"][0] == math.inf and arrays["sigma_lo"][2] == np.float32(0.3)
    # The reference's rows keep the reference's batch: no guide or interval arrays.
    s.guidance, s.guidance_interval = "classifier", ""
    assert set(guidance_rows.row_arrays(guidance_rows.parse_rows(s), 1)) == {"scales"}


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("guidance", "cfgg", "is not a guidance kind"),
        ("guidance", "classifier+classifier", "is not a guidance kind"),
        ("guidance_interval", "5,0.3", "not an interval"),
        ("guidance_interval", "0.3", "is not 'lo,hi'"),
        ("guidance_scale", "2,2", "repeats a scale"),
        ("guidance_scale", "x", "sample.guidance_scale"),
    ],
)
def test_bad_guidance_settings_are_named(key, value, match):
    config = _tiny()
    config.sample.guidance = "cfg"
    config.sample[key] = value
    with pytest.raises(errors.ConfigError, match=match):
        guidance_rows.parse_rows(config.sample)


def test_missing_null_class_or_guide_is_refused_before_sampling(ckpts, tmp_path):
    config = _config(ckpts, tmp_path / "a", guidance="cfg", guidance_scale="2")
    config.model.class_dropout = 0.0
    with pytest.raises(errors.ConfigError, match="model.class_dropout"):
        sample_run.run(config, str(tmp_path))
    config = _config(ckpts, tmp_path / "b", guidance="autoguidance", guide_checkpoint="")
    with pytest.raises(errors.ConfigError, match="sample.guide_checkpoint"):
        sample_run.run(config, str(tmp_path))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_kind_in_one_run_resumable_and_pinned(ckpts, tmp_path):
    config = _config(
        ckpts,
        tmp_path / "out",
        guidance="classifier,cfg,two_network",
        classifier_scale="0,2",
        guidance_scale="3",
        guidance_interval="all;0.5,8",
    )
    paths = sample_run.run(config, str(tmp_path))
    assert sorted(p.parent.name for p in paths.values()) == sorted(
        [
            "scale_0",
            "scale_2",
            "scale_0_sigma_0.5-8",
            "scale_2_sigma_0.5-8",
            "cfg_3",
            "cfg_3_sigma_0.5-8",
            "two_network_3",
            "two_network_3_sigma_0.5-8",
        ]
    )
    images = {p.parent.name: sample_files.read_sample_file(p)[0] for p in paths.values()}
    # Same noise everywhere: scale 0 guides nothing, whatever its interval.
    np.testing.assert_array_equal(images["scale_0"], images["scale_0_sigma_0.5-8"])
    for a, b in [
        ("scale_2", "scale_0"),
        ("cfg_3", "scale_0"),
        ("two_network_3", "scale_0"),
        ("cfg_3", "two_network_3"),
        ("cfg_3", "cfg_3_sigma_0.5-8"),
    ]:
        assert np.abs(images[a].astype(int) - images[b]).mean() > 0.5, (a, b)
    manifest = manifest_lib.read(tmp_path / "out")
    assert manifest["guide_weights"]["sha256"] and manifest["guide_model"]["class_cond"] is False
    assert len(manifest["guidance_rows"]) == 8
    # A rerun finds every row merged; another guide network is another run, refused.
    assert sample_run.run(config, str(tmp_path)) == paths
    config.sample.guide_checkpoint = str(ckpts / "model")  # autoguidance-like: itself
    with pytest.raises(errors.ConfigMismatchError, match="guide_weights.sha256"):
        sample_run.run(config, str(tmp_path))


def test_sweep_compares_kinds_on_one_table(ckpts, tmp_path):
    config = _config(ckpts, tmp_path / "samples", classifier_scale="0,2")
    config.sample.model_checkpoint = ""
    config.sweep.models = {
        "conditional": {},  # ConfigDicts sort their keys: the table does not follow them
        "cfg": {
            "sample": {
                "model_checkpoint": "{workdir}/conditional",
                "guidance": "cfg",
                "guidance_scale": "1,3",
                "guidance_interval": "all;0.5,8",
            }
        },
    }
    # "{workdir}/conditional": the cfg entry samples the conditional entry's model.
    (tmp_path / "conditional").mkdir()
    (tmp_path / "conditional" / "model_params").symlink_to(ckpts / "model")
    small = SmallClassifier(num_classes=10, width=8)
    extractor = ClassifierExtractor(
        small, small.init(jax.random.key(2), np.zeros((1, 8, 8, 3), np.float32)), batch_size=8
    )
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    feats = extractor(ref)
    mu, sigma = metrics.compute_statistics(feats["pool"])
    mu_s, sigma_s = metrics.compute_statistics(feats["spatial"])
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    config.eval.ref_batch = str(tmp_path / "ref.npz")
    rows = sweep.run(config, str(tmp_path), extractor=extractor)
    got = [(r["model"], r["guidance"], r["scale"]) for r in rows]
    assert got == [
        ("conditional", "classifier", 0.0),
        ("conditional", "classifier", 2.0),
        ("conditional", "cfg", 1.0),
        ("conditional", "cfg", 3.0),
        ("conditional", "cfg, sigma in (0.5, 8]", 1.0),
        ("conditional", "cfg, sigma in (0.5, 8]", 3.0),
    ]
    # w = 1 is the conditional model alone, with or without an interval: the same samples
    # as classifier scale 0, so the same scores.
    for k in ("fid", "precision", "recall", "classifier_accuracy"):
        assert rows[2][k] == rows[0][k] == rows[4][k], k
    assert rows[3]["fid"] != rows[2]["fid"]
    table = report.read_csv(tmp_path / sweep.TABLE_CSV)
    assert list(table[0])[:3] == ["model", "guidance", "scale"]
    assert (tmp_path / sweep.FRONTIER_PLOT).stat().st_size > 10_000
    text = (tmp_path / sweep.TABLE_MD).read_text()
    assert "the lowest FID is conditional, " in text and "Guidance sweep" in text
    record = json.loads((tmp_path / "samples" / "cfg" / manifest_lib.RUN_FILE).read_text())
    assert (
        record["model_weights"]["sha256"]
        == manifest_lib.read(tmp_path / "samples" / "conditional")["model_weights"]["sha256"]
    )


def test_sampling_line_names_each_entrys_guidance():
    from configs import digits as digits_config

    config = digits_config.get_config()
    config.sweep.models.cfg.sample.guidance = "cfg+classifier"
    models = {m.name: m for m in sweep.sweep_models(config, "workdir/d")}
    said = {name: sweep.guide_description(m) for name, m in models.items()}
    assert said["classifier_interval"] == (
        "classifier_interval: classifier at scales 1,2,4, intervals '0.3,5'"
    )
    assert said["cfg"] == (
        "cfg: cfg+classifier at w = 1.5,2,3, classifier scales 0,0.5,1,2,4,8, intervals 'all;0.3,5'"
    )
    assert said["two_network"].endswith("guide network workdir/d/unconditional")
    assert said["conditional"] == said["training@500"] == ""  # classifier guidance alone


def test_released_guidance_kinds_config_pairs_the_256_models():
    from configs.ablations import guidance_kinds

    models = sweep.sweep_models(guidance_kinds.get_config(), "workdir/gk")
    by_name = {m.name: m for m in models}
    two = by_name["two_network"].config.sample
    assert two.model_checkpoint == "workdir/gk/conditional"
    assert two.guide_checkpoint == "workdir/gk/unconditional"
    assert by_name["two_network"].label == "conditional"  # its rows sample the conditional model
    rows = guidance_rows.parse_rows(two)
    assert [r.folder() for r in rows][-1] == "two_network_3_sigma_0.28-5.42"
    assert len(rows) == 6 and guidance_rows.parse_rows(by_name["conditional"].config.sample) == (
        0.0,
        1.0,
        10.0,
    )
