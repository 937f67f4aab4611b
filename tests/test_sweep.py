"""The classifier-scale sweep: several models over the same noise and labels, each row scored
exactly as --mode=evaluate scores that row's samples file, one joint table and plot."""

import csv
import json

import jax
import numpy as np
import pytest
from conftest import perturbed

from configs import tiny as tiny_config
from configs.ablations import table4
from configs.released import imagenet256, imagenet256_uncond
from gdiff import distributed, factory
from gdiff.checkpoints import store
from gdiff.evaluation import ClassifierExtractor, SmallClassifier, evaluator, metrics, report
from gdiff.jobs import sample as sample_job
from gdiff.jobs import sweep


def _config(tmp_path):
    config = tiny_config.get_config()
    s = config.sample
    s.num_samples = 8
    s.batch_size = 8
    s.timestep_respacing = "2"
    s.classifier_scale = "0,3"
    s.labels = "balanced"
    s.output_dir = str(tmp_path / "samples")
    return config


def _two_models(config):
    config.sweep.models = {
        "conditional": {},
        "unconditional": {"model": {"class_cond": False}, "sample": {"classifier_scale": "6,0"}},
    }
    return config


class _Counting:
    """Counts the images a feature network is asked for (the reference must be computed once)."""

    def __init__(self, extractor):
        self.extractor, self.calls = extractor, []

    def __call__(self, images):
        self.calls.append(len(images))
        return self.extractor(images)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Random-init tiny networks saved where a sweep finds them: <workdir>/<model>/model_params
    (conditional, unconditional) and <workdir>/classifier_params; plus a small feature network."""
    root = tmp_path_factory.mktemp("sweep")
    config = _config(root)
    for name, class_cond in (("conditional", True), ("unconditional", False)):
        config.model.class_cond = class_cond
        variables = factory.init_variables(factory.build_model(config), jax.random.key(0))
        store.save_params(root / name / "model_params", variables["params"], metadata={})
    cls_vars = factory.init_variables(factory.build_classifier(config), jax.random.key(1))
    store.save_params(root / "classifier_params", cls_vars["params"], metadata={})
    return root


@pytest.fixture(scope="module")
def extractor():
    small = SmallClassifier(num_classes=10, width=8)
    small_vars = small.init(jax.random.key(2), np.zeros((1, 8, 8, 3), np.float32))
    return ClassifierExtractor(small, small_vars, batch_size=8)


def _reference_batch(path, extractor):
    """Images plus whole-dataset statistics that are NOT those of the images (as the released
    reference batches): a sweep that ignored them would score differently from the evaluator."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    other = extractor(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    mu, sigma = metrics.compute_statistics(other["pool"])
    mu_s, sigma_s = metrics.compute_statistics(other["spatial"])
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return path


def test_bad_eval_inputs_fail_before_sampling(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(ValueError, match="eval.ref_batch"):
        sweep.run(config, str(tmp_path))
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    config.eval.ref_batch = str(ref)
    config.sample.classifier_scale = "0"
    config.sample.model_checkpoint = str(tmp_path)  # no model here: fails at the plan
    with pytest.raises(FileNotFoundError, match="cannot load the model"):
        sweep.run(config, str(tmp_path))
    assert not (tmp_path / "samples").exists()  # nothing was sampled


def test_sweep_rows_equal_evaluate_on_each_samples_file(workdir, extractor, tmp_path, capsys):
    config = _two_models(_config(tmp_path))
    config.eval.ref_batch = str(_reference_batch(tmp_path / "ref.npz", extractor))
    config.eval.is_split_size = 3  # not the default, to show the sweep reads it
    counting = _Counting(extractor)
    mesh = distributed.data_mesh(jax.devices()[:1])
    rows = sweep.run(config, str(workdir), extractor=counting, mesh=mesh)
    # Rows: model x scale (ascending); the reference was extracted once for the whole sweep.
    assert [(r["model"], r["scale"]) for r in rows] == [
        ("conditional", 0.0),
        ("conditional", 3.0),
        ("unconditional", 0.0),
        ("unconditional", 6.0),
    ]
    assert counting.calls == [16] + [8] * 4
    with open(workdir / sweep.TABLE_CSV, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == [c for c in report.COLUMNS if c != "eval_accuracy"]
    capsys.readouterr()
    for cells in table:
        path = tmp_path / "samples" / cells["model"] / f"scale_{cells['scale'][:-2]}"
        (samples,) = path.glob("samples_8x8x8x3.npz")
        evaluator.evaluate_files(
            config.eval.ref_batch, samples, "", extractor=extractor, is_split_size=3
        )
        printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines()[-6:-1])
        # To the last printed digit: the CSV holds repr(float), evaluate prints str(float).
        for key in evaluator.METRIC_NAMES:
            assert cells[key] == printed[evaluator.PRINT_NAMES[key]], (cells, key)
        assert 0.0 <= float(cells["classifier_accuracy"]) <= 1.0
        assert float(cells["log_prob"]) <= 0.0


def test_models_share_labels_and_write_one_table(workdir, extractor, tmp_path):
    config = _two_models(_config(tmp_path))
    config.eval.ref_batch = str(_reference_batch(tmp_path / "ref.npz", extractor))
    mesh = distributed.data_mesh(jax.devices()[:1])
    sweep.run(config, str(workdir), extractor=extractor, mesh=mesh)
    out = tmp_path / "samples"
    with np.load(out / "conditional/scale_0/samples_8x8x8x3.npz") as c:
        with np.load(out / "unconditional/scale_6/samples_8x8x8x3.npz") as u:
            np.testing.assert_array_equal(c["arr_1"], u["arr_1"])  # the same labels
    md = (workdir / sweep.TABLE_MD).read_text().splitlines()
    # Each row names its sampler and its network evaluations per sample (respacing "2").
    assert md[2].startswith("| model | scale | sampler | nfe | fid | sfid |")
    assert md[4].startswith("| conditional | 0 | ancestral | 2 |")
    assert md[7].startswith("| unconditional | 6 | ancestral | 2 |")
    assert (workdir / sweep.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_scorer_uses_eval_resize_and_caches_activations(tmp_path, extractor, monkeypatch):
    config = _config(tmp_path)
    config.eval.ref_batch = str(_reference_batch(tmp_path / "ref.npz", extractor))
    config.eval.inception_weights = str(tmp_path / "weights.npz")
    (tmp_path / "weights.npz").write_bytes(b"stand-in weights: only hashed for the cache key")
    config.eval.resize = "halfpixel"
    monkeypatch.setattr(evaluator, "load_inception_variables", lambda path: {})
    ref_batch = evaluator.read_reference_batch(config.eval.ref_batch)
    # The statistics alone (no images to run the stand-in network on).
    built = sweep.reference_scorer(config, str(tmp_path), (None, ref_batch[1]), extractor=None)
    assert built.extractor.resize == "halfpixel" and built.is_split_size == 5000
    counting = _Counting(extractor)
    first = sweep.reference_scorer(config, str(tmp_path), ref_batch, extractor=counting)
    again = sweep.reference_scorer(config, str(tmp_path), ref_batch, extractor=counting)
    assert counting.calls == [16]  # the second sweep read the cache
    assert len(list(tmp_path.glob("ref.gdiff_acts_*.npz"))) == 1
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pool", "spatial"):
        np.testing.assert_array_equal(first.reference[key], again.reference[key])


def test_model_overrides_are_checked(workdir, tmp_path):
    config = _config(tmp_path)
    config.sweep.models = {"a": {"classifier": {"width": 8}}}
    with pytest.raises(KeyError, match="classifier is shared"):
        sweep.sweep_models(config, workdir)
    config.sweep.models = {"a": {"model": {"no_such_key": 1}}}
    with pytest.raises(KeyError, match="sweep.models.a.model.no_such_key"):
        sweep.sweep_models(config, workdir)
    config = _two_models(_config(tmp_path))
    config.sample.model_checkpoint = str(workdir)  # which of the two models?
    with pytest.raises(ValueError, match="sweep.models.<name>.sample.model_checkpoint"):
        sweep.sweep_models(config, workdir)
    mesh = distributed.data_mesh(jax.devices()[:1])
    config = _two_models(_config(tmp_path))
    config.sweep.models.unconditional.sample.seed = 1  # other noise
    with pytest.raises(ValueError, match="differ in sample.seed"):
        sweep.plan_models(sweep.sweep_models(config, workdir), workdir, mesh)
    config = _two_models(_config(tmp_path))
    config.sweep.models.unconditional.sample.labels = "3"  # other labels
    with pytest.raises(ValueError, match="same labels"):
        sweep.plan_models(sweep.sweep_models(config, workdir), workdir, mesh)


def test_table4_config_pairs_the_released_256_models():
    models = sweep.sweep_models(table4.get_config(), "workdir/table4")
    assert [(m.name, str(m.workdir)) for m in models] == [
        ("conditional", "workdir/table4/conditional"),
        ("unconditional", "workdir/table4/unconditional"),
    ]
    cond, uncond = (m.config for m in models)
    # Each model is exactly its released config's network, guided by the same classifier.
    assert cond.model.to_dict() == imagenet256.get_config().model.to_dict()
    assert uncond.model.to_dict() == imagenet256_uncond.get_config().model.to_dict()
    assert cond.classifier.to_dict() == uncond.classifier.to_dict()
    for c in (cond, uncond):
        assert (c.sample.classifier_scale, c.sample.timestep_respacing) == ("0,1,10", "250")
        assert c.sample.num_samples == 50_000


def _training_run(directory, config, steps):
    """A training checkpoint directory with one step folder per step, each of other weights
    (`perturbed`: the initialisation's zeroed output layer would predict the same at any step)."""
    manager = store.CheckpointManager(directory, max_to_keep=len(steps))
    variables = factory.init_variables(factory.build_model(config), jax.random.key(0))
    for step in steps:
        params = perturbed(variables, seed=step)["params"]
        manager.save(step, {"params": params, "ema_params": {}})
    manager.wait_until_finished()
    manager.close()


def test_sweep_over_training_steps(tmp_path, extractor):
    """sample.checkpoint_steps: an entry samples steps of another entry's run; the table names
    each row's step, plots and summarizes the newest step's rows, and draws FID against the
    step."""
    root = tmp_path / "work"
    config = _config(tmp_path)
    _training_run(root / "conditional" / "checkpoints", config, (2, 4, 6))
    cls_vars = factory.init_variables(factory.build_classifier(config), jax.random.key(1))
    store.save_params(root / "classifier_params", cls_vars["params"], metadata={})
    config.eval.ref_batch = str(_reference_batch(tmp_path / "ref.npz", extractor))
    config.sample.output_dir = ""
    config.sweep.models = {
        "conditional": {},
        "training": {
            "sample": {"model_checkpoint": "{workdir}/conditional", "checkpoint_steps": "4,2"}
        },
    }
    models = sweep.sweep_models(config, root)
    assert [(m.name, m.label, m.step) for m in models] == [
        ("conditional", "conditional", None),
        ("training@2", "conditional", 2),
        ("training@4", "conditional", 4),
    ]
    mesh = distributed.data_mesh(jax.devices()[:1])
    rows = sweep.run(config, str(root), extractor=extractor, mesh=mesh)
    # Rows by step (the entry's newest: 6), then scale; every row the one network.
    assert [(r["model"], r["step"], r["scale"]) for r in rows] == [
        ("conditional", s, c) for s in (2, 4, 6) for c in (0.0, 3.0)
    ]
    out = root / "samples"
    for step in (2, 4):
        manifest = json.loads((out / "training" / f"step_{step}" / "run.json").read_text())
        assert manifest["model_weights"]["step"] == step
    # Other weights, the same noise and labels: other images, the same labels.
    with np.load(out / "training/step_2/scale_0/samples_8x8x8x3.npz") as a:
        with np.load(out / "conditional/scale_0/samples_8x8x8x3.npz") as b:
            np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
            assert not np.array_equal(a["arr_0"], b["arr_0"])
    with open(root / sweep.TABLE_CSV, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:3] == ["model", "step", "scale"]
    assert [c["step"] for c in table] == ["2", "2", "4", "4", "6", "6"]
    assert report.read_csv(root / sweep.TABLE_CSV)[0]["step"] == 2
    md = (root / sweep.TABLE_MD).read_text()
    assert "# Classifier-scale sweep over training" in md
    assert "| conditional | 2 | 0 | ancestral | 2 |" in md
    # The step plot, and its summary: one curve per scale, its FID at the first and last step.
    assert (root / sweep.STEPS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![{sweep.STEPS_PLOT}]({sweep.STEPS_PLOT})" in md
    for scale in (0.0, 3.0):
        mine = [r for r in rows if r["scale"] == scale]
        first, last = report.fmt(mine[0]["fid"], 3), report.fmt(mine[-1]["fid"], 3)
        assert f"conditional, scale {scale:g}: FID " in md
        assert f"{first} at step 2" in md and f"{last} at step 6" in md
    # The scale summary speaks of the newest step alone.
    assert report.newest(rows) == rows[4:]


def test_checkpoint_steps_are_checked(tmp_path, workdir):
    config = _config(tmp_path)
    config.sample.classifier_scale = "0"
    config.sample.checkpoint_steps = "2,x"
    with pytest.raises(ValueError, match="sample.checkpoint_steps='2,x' must be distinct"):
        sweep.sweep_models(config, workdir)
    run = tmp_path / "run"
    _training_run(run / "checkpoints", config, (2, 4))
    config.sample.model_checkpoint = str(run)
    config.sample.checkpoint_steps = "2,3"
    models = sweep.sweep_models(config, tmp_path)
    mesh = distributed.data_mesh(jax.devices()[:1])
    # A step that is not there: refused at the plan, before anything is sampled, naming those
    # that are.
    with pytest.raises(FileNotFoundError, match=r"step 3 is not a finished checkpoint .*2, 4"):
        sweep.plan_models(models, tmp_path, mesh)
    # Parameters have no steps.
    config.sample.model_checkpoint = str(workdir / "conditional")
    with pytest.raises(ValueError, match="not the steps of a training run"):
        sweep.plan_models(sweep.sweep_models(config, tmp_path), tmp_path, mesh)
    # --mode=sample draws from one checkpoint.
    with pytest.raises(ValueError, match="sample.checkpoint_steps='2,3' lists steps"):
        sample_job.run(config, str(tmp_path), mesh=mesh)
    assert not (tmp_path / "samples").exists()
