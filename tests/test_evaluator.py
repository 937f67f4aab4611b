"""The evaluate mode: batch files in, five numbers out, clear errors for bad inputs."""

import json

import numpy as np
import pytest

from configs import common
from gdiff.evaluation import evaluator, metrics


class _PixelFeatures:
    """A cheap deterministic feature network (the real ones are tested elsewhere)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        logits = x[:, :6] * 4.0
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        return {"pool": x[:, :12], "spatial": x[:, 12:20], "probs": probs}


def _images(seed, n=40, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(120 + shift, 40, size=(n, 4, 4, 3)), 0, 255).astype(np.uint8)


def test_evaluate_files_writes_five_numbers_and_caches(tmp_path, capsys):
    ref, sample = _images(0), _images(1, shift=30)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "samples.npz", arr_0=sample, arr_1=np.zeros(len(sample), np.int64))
    weights = tmp_path / "weights.npz"
    weights.write_bytes(b"stand-in weights: only hashed for the cache key")
    ext = _PixelFeatures()
    got = evaluator.evaluate_files(
        tmp_path / "ref.npz", tmp_path / "samples.npz", weights, extractor=ext, is_split_size=16
    )
    out = capsys.readouterr().out
    for name in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"):
        assert name in out
    written = json.loads((tmp_path / "samples_metrics.json").read_text())
    assert {k: written[k] for k in evaluator.METRIC_NAMES} == got
    # The numbers are the metrics of the extractor's features.
    r, s = ext(ref), ext(sample)
    want_fid = metrics.frechet_distance(
        *metrics.compute_statistics(s["pool"]), *metrics.compute_statistics(r["pool"])
    )
    assert got["fid"] == pytest.approx(want_fid, rel=1e-12)
    assert got["inception_score"] == pytest.approx(metrics.inception_score(s["probs"], 16))
    assert (got["precision"], got["recall"]) == metrics.precision_recall(r["pool"], s["pool"])
    assert len(list(tmp_path.glob("ref.gdiff_acts_*.npz"))) == 1
    ext2 = _PixelFeatures()
    again = evaluator.evaluate_files(
        tmp_path / "ref.npz", tmp_path / "samples.npz", weights, extractor=ext2, is_split_size=16
    )
    assert ext2.calls == 1  # the reference activations came from the cache
    assert again == got


def test_reference_statistics_are_used_when_present(tmp_path):
    ref, sample = _images(2), _images(3)
    ext = _PixelFeatures()
    acts = ext(ref)
    mu, sigma = metrics.compute_statistics(acts["pool"] + 1.0)  # deliberately different
    mu_s, sigma_s = metrics.compute_statistics(acts["spatial"])
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(tmp_path / "s.npz", arr_0=sample)
    got = evaluator.evaluate_files(tmp_path / "ref.npz", tmp_path / "s.npz", None, extractor=ext)
    s = ext(sample)
    want = metrics.frechet_distance(*metrics.compute_statistics(s["pool"]), mu, sigma)
    assert got["fid"] == pytest.approx(want, rel=1e-12)


def test_bad_inputs_raise_clear_errors(tmp_path):
    good = _images(4)
    np.savez(tmp_path / "ref.npz", arr_0=good)
    cases = {
        "no_arr0.npz": ({"images": good}, "has no arr_0"),
        "float.npz": ({"arr_0": good.astype(np.float32) / 127.5 - 1}, "must be uint8"),
        "nchw.npz": ({"arr_0": good.transpose(0, 3, 1, 2).copy()}, "looks NCHW"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=message):
            evaluator.evaluate_files(tmp_path / "ref.npz", tmp_path / name, None, extractor=None)
    np.savez(tmp_path / "s.npz", arr_0=good)
    config = common.get_config()
    config.eval.ref_batch = str(tmp_path / "ref.npz")
    config.eval.sample_batch = str(tmp_path / "s.npz")
    config.eval.inception_weights = str(tmp_path / "nowhere.pb")
    with pytest.raises(FileNotFoundError) as err:
        evaluator.run(config, str(tmp_path))
    msg = str(err.value)
    assert "pt_inception-2015-12-05" in msg and "classify_image_graph_def.pb" in msg
    assert "config.eval.inception_weights" in msg
    config.eval.sample_batch = ""
    with pytest.raises(ValueError, match="sample_batch"):
        evaluator.run(config, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "missing.npz")])
