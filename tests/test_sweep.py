"""The classifier-scale sweep: one sampling run over all scales, metrics table and plot."""

import csv

import jax
import numpy as np
import pytest

from configs import tiny as tiny_config
from gdiff import checkpointing, distributed, factory
from gdiff.evaluation import ClassifierExtractor, SmallClassifier
from gdiff.sampling import sweep


def _config(tmp_path):
    config = tiny_config.get_config()
    config.classifier.num_head_channels = 32  # see tests/test_sampling_run.py
    s = config.sample
    s.num_samples = 8
    s.batch_size = 8
    s.timestep_respacing = "2"
    s.classifier_scale = "0,3"
    s.labels = "balanced"
    s.output_dir = str(tmp_path / "samples")
    return config


def test_bad_eval_inputs_fail_before_sampling(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(ValueError, match="eval.ref_batch"):
        sweep.run(config, str(tmp_path))
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    config.eval.ref_batch = str(ref)
    config.eval.inception_weights = ""
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        sweep.run(config, str(tmp_path))
    assert not (tmp_path / "samples").exists()  # nothing was sampled


def test_sweep_writes_table_and_plot(tmp_path):
    config = _config(tmp_path)
    model_vars = factory.init_variables(factory.build_model(config), jax.random.key(0))
    cls = factory.build_classifier(config)
    cls_vars = factory.init_variables(cls, jax.random.key(1))
    checkpointing.save_params(tmp_path / "m", model_vars["params"], metadata={})
    checkpointing.save_params(tmp_path / "c", cls_vars["params"], metadata={})
    config.sample.model_checkpoint = str(tmp_path / "m")
    config.sample.classifier_checkpoint = str(tmp_path / "c")
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    config.eval.ref_batch = str(ref)
    small = SmallClassifier(num_classes=10, width=8)
    small_vars = small.init(jax.random.key(2), np.zeros((1, 8, 8, 3), np.float32))
    extractor = ClassifierExtractor(small, small_vars, batch_size=8)

    rows = sweep.run(
        config, str(tmp_path), extractor=extractor, mesh=distributed.data_mesh(jax.devices()[:1])
    )
    assert [r["scale"] for r in rows] == [0.0, 3.0]
    for r in rows:
        assert np.isfinite(r["fid"]) and r["fid"] > 0
        assert 0.0 <= r["classifier_accuracy"] <= 1.0
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
    # The two scales share noise but not samples: their metrics differ.
    assert rows[0]["fid"] != rows[1]["fid"]
    with open(tmp_path / "scale_sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(sweep.COLUMNS)
    assert [float(t["scale"]) for t in table] == [0.0, 3.0]
    assert float(table[1]["fid"]) == pytest.approx(rows[1]["fid"])
    md = (tmp_path / "scale_sweep.md").read_text().splitlines()
    assert md[0].startswith("| scale | fid | sfid") and len(md) == 4
    assert md[3].startswith("| 3 |")
    png = tmp_path / "scale_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
