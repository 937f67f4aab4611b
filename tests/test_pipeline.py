"""The digits pipeline end to end with a tiny budget (a conditional and an unconditional model),
its rerun, and the report helpers it shares with --mode=sweep."""

import csv
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from configs import digits as digits_config
from gdiff import errors
from gdiff.checkpoints import locate, store
from gdiff.evaluation import report
from gdiff.jobs import digits


def tiny_config():
    config = digits_config.get_config()
    config.data.image_size = 8
    m = config.model
    m.channel_mult = (1, 1)
    # No self-attention blocks (resolution 16 never occurs at 8x8): the least to compile.
    m.attention_resolutions = (16,)
    config.classifier.channel_mult = (1, 1)
    config.classifier.attention_resolutions = (16,)
    config.classifier.num_head_channels = 32  # the attention pool sees 32 channels here
    config.diffusion.steps = 50
    t = config.train
    t.batch_size = 16
    t.num_steps = 3
    t.classifier_batch_size = 16
    t.classifier_num_steps = 3
    t.log_every = 3
    t.save_every = 3
    s = config.sample
    s.num_samples = 20  # two batches on 8 devices x 2 (the last one trimmed)
    s.batch_size = 2
    s.timestep_respacing = "ddim3"
    s.classifier_scale = "0,4"
    models = config.sweep.models
    models.unconditional.sample.classifier_scale = "0,8"
    # The guidance kinds beyond the classifier, one weight each: classifier-free guidance at
    # every step and in an interval, and autoguidance by the conditional model's step 1 (kept:
    # it checkpoints every step here).
    models.conditional.train = {"max_to_keep": 4, "save_every": 1}
    for name in ("classifier_interval", "two_network"):
        del models[name]
    models.cfg.sample.guidance_scale = "3"
    models.autoguidance.sample.guidance_scale = "3"
    models.autoguidance.sample.guidance_interval = ""
    models.autoguidance.sample.guide_checkpoint = "{workdir}/conditional/checkpoints/1"
    # The training curve: the conditional model's steps 1 and 2, unguided (with its step-3 rows,
    # FID against the step).
    models.training.sample.checkpoint_steps = "1,2"
    models.training.sample.classifier_scale = "0"
    p = config.pipeline
    p.eval_classifier_steps = 5
    p.eval_classifier_batch_size = 32
    # The solver sweep: DDIM and DPM-Solver++ at 2 and 4 steps, 5 ancestral steps as reference.
    p.solver_sweep_nfe = "2,4"
    p.solver_sweep_reference_steps = 5
    config.train.progress = False
    return config


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits")
    first = digits.run(tiny_config(), str(workdir))
    return workdir, first


STAGES = (
    "diffusion/conditional",
    "diffusion/unconditional",
    "classifier",
    "eval_net",
    "sample",
    "evaluate",
    "solver_sweep",
)
# (model, guidance, step, scale) of every row: the conditional model's rows first (whichever
# entry drew them), its steps ascending, each curve's scales ascending.
PAIRS = [
    ("conditional", "classifier", 1, 0.0),
    ("conditional", "classifier", 2, 0.0),
    ("conditional", "classifier", 3, 0.0),
    ("conditional", "classifier", 3, 4.0),
    ("conditional", "cfg", 3, 3.0),
    ("conditional", "cfg, sigma in (0.3, 5]", 3, 3.0),
    ("conditional", "autoguidance", 3, 3.0),
    ("unconditional", "classifier", 3, 0.0),
    ("unconditional", "classifier", 3, 8.0),
]


def test_pipeline_writes_parseable_results(pipeline_run):
    workdir, first = pipeline_run
    assert first["ran"] == list(STAGES)
    assert first["skipped"] == []
    with open(workdir / digits.RESULTS_CSV, newline="") as f:
        reader = csv.DictReader(f)
        # Every row of the scale sweep is drawn by the one sampler its "sampling" line names.
        # A table comparing guidance kinds names each row's after its model, one over
        # training steps each row's step.
        want = [c for c in report.COLUMNS if c not in ("sampler", "nfe")]
        assert reader.fieldnames == [want[0], "guidance", "step", *want[1:]]
        rows = list(reader)
    assert [(r["model"], r["guidance"], int(r["step"]), float(r["scale"])) for r in rows] == PAIRS
    for r in rows:
        values = {k: float(v) for k, v in r.items() if k not in ("model", "guidance")}
        assert all(math.isfinite(v) for v in values.values()), values
        for key in ("eval_accuracy", "classifier_accuracy", "precision", "recall"):
            assert 0.0 <= values[key] <= 1.0
        assert values["log_prob"] <= 0.0
        assert values["fid"] >= 0.0 and values["sfid"] >= 0.0
    # The CSV is the program's measurement: it agrees with what run() returned.
    got = [float(r["eval_accuracy"]) for r in rows]
    assert np.allclose(got, [r["eval_accuracy"] for r in first["rows"]])
    md = (workdir / digits.RESULTS_MD).read_text()
    assert "| model | guidance | step | scale |" in md and "| real digits |" in md
    assert first["summary"] in md and "| unconditional | classifier | 3 | 8 |" in md
    assert "At accuracy >= " in first["summary"] and "the lowest FID is " in first["summary"]
    # The training curve: the unguided conditional rows' FID at steps 1, 2, 3, drawn and said.
    curve = [r for r in first["rows"] if r["scale"] == 0.0 and r["model"] == "conditional"]
    assert [r["step"] for r in curve] == [1, 2, 3]
    said = "conditional, classifier, scale 0: FID "
    assert said in first["summary"] and f"{report.fmt(curve[-1]['fid'], 3)} at step 3" in md
    assert f"![{digits.STEPS_PLOT}]({digits.STEPS_PLOT})" in md
    for png in [
        workdir / digits.STEPS_PLOT,
        workdir / digits.FRONTIER_PLOT,
        workdir / digits.PLOT,
        workdir / digits.SWEEP_FIGURE,
        *first["paths"]["grids"].values(),
    ]:
        with Image.open(png) as im:
            im.load()
            assert im.size[0] > 10 and im.size[1] > 10
    # Grid rows are classes: 20 balanced samples cover all 10 digits -> 10 rows of cells.
    with Image.open(first["paths"]["grids"][("conditional", 4.0)]) as im:
        h = im.size[1]
    cell = 8 * tiny_config().pipeline.grid_zoom
    assert h >= 10 * cell
    labels = []
    for paths in first["paths"]["samples"].values():
        for path in paths.values():
            with np.load(path) as z:
                assert z["arr_0"].shape == (20, 8, 8, 3) and z["arr_0"].dtype == np.uint8
                labels.append(z["arr_1"])
    # Both models drew the same balanced labels.
    assert all(np.array_equal(labels[0], other) for other in labels)
    assert np.bincount(labels[0], minlength=10).tolist() == [2] * 10
    # Each model trained in its own workdir.
    for model in ("conditional", "unconditional"):
        assert locate.locate(workdir / model, "model").step == 3


def test_real_digit_row_was_never_shown_to_the_evaluation_network(pipeline_run):
    workdir, first = pipeline_run
    meta = store.read_metadata(workdir / digits.EVAL_CLASSIFIER_DIR)
    held_back = np.asarray(meta["held_back"])
    _, labels = digits.real_digits("train", 8)
    # As many as samples per scale, balanced like the samples, all distinct training indices.
    assert len(held_back) == 20 and len(set(held_back.tolist())) == 20
    assert labels[held_back].tolist() == list(range(10)) * 2
    # A seeded choice, not the first digits of each class (those come from a few writers).
    assert held_back.tolist() != digits.balanced_subset(labels, 20, 10).tolist()
    assert first["baseline"] is not None and 0.0 <= first["baseline"]["eval_accuracy"] <= 1.0


def test_rerun_skips_every_stage(pipeline_run):
    workdir, first = pipeline_run
    outputs = [
        workdir / digits.RESULTS_CSV,
        workdir / digits.PLOT,
        *[p for paths in first["paths"]["samples"].values() for p in paths.values()],
    ]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    second = digits.run(tiny_config(), str(workdir))
    assert second["ran"] == []
    assert second["skipped"] == list(STAGES)
    assert second["redone"] == {}
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert second["rows"] == first["rows"]
    assert second["summary"] == first["summary"]
    assert second["solver"] == first["solver"]


SOLVER_ROWS = [
    ("DDIM", 2),
    ("DDIM", 4),
    ("DPM-Solver++(2M) thresholding", 2),
    ("DPM-Solver++(2M) thresholding", 4),
    ("ancestral", 5),
]


def test_solver_sweep_rows_for_every_sampler_and_nfe(pipeline_run):
    workdir, first = pipeline_run
    rows = report.read_csv(workdir / digits.SOLVER_CSV)
    assert [(r["sampler"], r["nfe"]) for r in rows] == SOLVER_ROWS
    assert {(r["model"], r["scale"]) for r in rows} == {("conditional", 1.0)}
    for r in rows:
        assert all(math.isfinite(r[k]) for k in report.metric_columns(rows)), r
    assert rows == first["solver"]["rows"] and first["solver"]["reference"] == rows[-1]
    summary = first["solver"]["summary"]
    assert summary.startswith("Within 5% of the FID of the ancestral 5 steps row")
    assert "DDIM" in summary and "DPM-Solver++(2M)" in summary
    md = (workdir / digits.SOLVER_MD).read_text()
    assert summary in md and "| conditional | 1 | DPM-Solver++(2M) thresholding | 4 |" in md
    with Image.open(workdir / digits.SOLVER_PLOT) as im:
        im.load()
        assert im.size[0] > 10 and im.size[1] > 10
    record = json.loads((workdir / digits.SOLVER_JSON).read_text())
    assert set(record["crossover"]) == {"DDIM", "DPM-Solver++(2M) thresholding"}
    # Every row drew the scale sweep's labels (its samples under samples/solver_sweep/).
    paths = first["paths"]["solver_samples"]
    assert sorted(paths) == sorted(
        ["ddim_2", "ddim_4", "dpm_solver_2", "dpm_solver_4", "ancestral_5"]
    )
    scale_labels = np.load(first["paths"]["samples"]["conditional"][0.0])["arr_1"]
    for name, by_scale in paths.items():
        assert by_scale[1.0].parent.parent == workdir / "samples" / "solver_sweep" / name
        with np.load(by_scale[1.0]) as z:
            assert np.array_equal(z["arr_1"], scale_labels)


def test_bad_config_raises_clear_errors(tmp_path):
    config = tiny_config()
    config.data.source = "tfds"
    with pytest.raises(ValueError, match="data.source='digits'"):
        digits.run(config, str(tmp_path))
    config = tiny_config()
    config.sample.num_samples = 1
    with pytest.raises(ValueError, match="num_samples"):
        digits.run(config, str(tmp_path))
    config = tiny_config()
    config.sweep.models.unconditional.sample.classifier_scale = "0"
    with pytest.raises(ValueError, match="'unconditional' is unconditional and unguided"):
        digits.run(config, str(tmp_path))
    # The solver sweep's rows are checked before anything trains.
    for key, value, message in [
        ("solver_sweep_nfe", "2,x", "pipeline.solver_sweep_nfe='2,x'"),
        ("solver_sweep_model", "other", "pipeline.solver_sweep_model='other'"),
        ("solver_sweep_nfe", "2,60", "row ddim_60 cannot be sampled"),
    ]:
        config = tiny_config()
        config.pipeline[key] = value
        with pytest.raises(errors.ConfigError, match=message):
            digits.run(config, str(tmp_path))
    assert not any(tmp_path.iterdir())


def _row(model, scale, acc, recall, fid=10.0):
    return dict(
        model=model,
        scale=scale,
        fid=fid,
        sfid=2 * fid,
        inception_score=3.0,
        precision=0.5,
        recall=recall,
        eval_accuracy=acc,
        classifier_accuracy=acc,
        log_prob=-1.0 / (1 + scale),
    )


def test_summary_follows_the_numbers():
    rows = [_row("c", 0, 0.4, 0.8), _row("c", 2, 0.7, 0.7, 5.0), _row("c", 8, 0.95, 0.3, 20.0)]
    text = report.summarize(rows)
    assert "rises from 0.4 at scale 0 to 0.95 at scale 8" in text
    assert "falls from 0.8 at scale 0 to 0.3 at scale 8" in text
    assert "lowest (5) at scale 2" in text
    assert "paper's trade-off" in text
    flat = report.summarize([_row("c", 0, 0.9, 0.5), _row("c", 8, 0.5, 0.6)])
    assert "Unlike the paper" in flat and "accuracy does not rise" in flat
    with pytest.raises(ValueError, match="no results"):
        report.summarize([])


def test_summary_compares_models():
    rows = [
        _row("conditional", 0, 0.9, 0.8, 2.0),
        _row("conditional", 4, 1.0, 0.5, 3.0),
        _row("unconditional", 0, 0.1, 0.9, 2.5),
        _row("unconditional", 16, 0.97, 0.4, 4.0),
    ]
    text = report.summarize(rows, chance=0.1)
    assert text.startswith("Conditional model: Accuracy at the requested labels rises from 0.9")
    assert "Unconditional model: Accuracy at the requested labels rises from 0.1 at scale 0" in text
    assert "Unguided (scale 0), accuracy at the requested labels is conditional 0.9 (FID 2)" in text
    assert "unconditional 0.1 (FID 2.5) (chance: 0.1)" in text
    assert "unconditional 0.97 (FID 4) at scale 16" in text


def test_read_csv_round_trip_and_missing_columns(tmp_path):
    rows = [_row(m, s, 0.1 * s, 0.3) for m in ("a", "b") for s in (0.0, 1.0)]
    path = report.write_csv(rows, tmp_path / "r.csv")
    assert report.read_csv(path) == rows
    # A table over training steps: a parameter checkpoint's row has no step (an empty cell).
    stepped = [{**r, "step": step} for r, step in zip(rows, (None, 5, 5, 10), strict=True)]
    path = report.write_csv(stepped, tmp_path / "s.csv")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("model,step,scale,fid,") and lines[1].startswith("a,,0.0,")
    assert report.read_csv(path) == stepped
    # Each model's newest step (and the step-less row) make its scale sweep; b's step-5 row is
    # on no curve (its other scale alone is at step 10), until both are at one scale.
    assert report.newest(stepped) == [stepped[0], stepped[1], stepped[3]]
    assert report.step_curves(stepped) == {}
    stepped[3]["scale"] = 0.0
    assert report.step_curves(stepped) == {"b, scale 0": [stepped[2], stepped[3]]}
    bad = tmp_path / "bad.csv"
    bad.write_text("scale,fid\n0,1\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        report.read_csv(bad)


def test_balanced_subset_order_and_shortage():
    labels = np.array([1, 0, 1, 0, 2, 2, 1])
    idx = digits.balanced_subset(labels, 5, 3)
    assert labels[idx].tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="class 0"):
        digits.balanced_subset(labels, 7, 3)
    many = np.repeat(np.arange(3), 20)
    seeded = digits.balanced_subset(many, 30, 3, seed=1)
    assert many[seeded].tolist() == [0, 1, 2] * 10
    assert seeded.tolist() == digits.balanced_subset(many, 30, 3, seed=1).tolist()
    assert seeded.tolist() != digits.balanced_subset(many, 30, 3).tolist()


def test_real_digits_quantised_like_samples():
    images, labels = digits.real_digits("test", 8)
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 3)
    assert len(images) == len(labels) == 360
    assert images.max() == 255 and images.min() == 0
    assert pathlib.Path(digits.__file__).name == "digits.py"
