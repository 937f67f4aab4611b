"""FID / IS / precision-recall against the reference evaluator's golden statistics."""

import json

import numpy as np
import pytest
from conftest import load_fixture

from gdiff.evaluation import metrics


@pytest.fixture(scope="module")
def ev():
    z = load_fixture("evaluator.npz")
    return {k: z[k] for k in z.files}, json.loads(str(z["config_json"]))


def test_fid_matches_reference(ev):
    z, _ = ev
    mu1, s1 = metrics.compute_statistics(z["sample_acts"])
    mu2, s2 = metrics.compute_statistics(z["ref_acts"])
    fid = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert abs(fid - float(z["fid"])) <= 1e-6 * abs(float(z["fid"]))
    scale = np.trace(s2)  # fid_self is ~1e-13: compare against the size of the statistics
    assert abs(metrics.frechet_distance(mu2, s2, mu2, s2) - float(z["fid_self"])) < 1e-9 * scale


def test_inception_score_matches_reference(ev):
    z, cfg = ev
    got = metrics.inception_score(z["probs"], split_size=cfg["is_split_size"])
    assert abs(got - float(z["inception_score"])) <= 1e-6 * float(z["inception_score"])
    want_default = float(z["inception_score_default_split"])
    assert abs(metrics.inception_score(z["probs"]) - want_default) <= 1e-6 * want_default


def test_inception_score_split_is_a_chunk_size():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(5, 0.3), size=7)

    def score(part):
        marg = part.mean(0, keepdims=True)
        return np.exp(np.mean(np.sum(part * (np.log(part) - np.log(marg)), 1)))

    # 7 rows in chunks of 3: [3, 3, 1], the single-row chunk weighing as much as the others.
    want = np.mean([score(p[0:3]), score(p[3:6]), score(p[6:7])])
    assert metrics.inception_score(p, split_size=3) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="split_size"):
        metrics.inception_score(p, split_size=0)


def test_precision_recall_and_radii_match_reference(ev):
    z, cfg = ev
    p, r, radii_ref, radii_sample = metrics.precision_recall(
        z["ref_acts"],
        z["sample_acts"],
        row_batch_size=cfg["pr_row_batch"],
        col_batch_size=cfg["pr_col_batch"],
        return_radii=True,
    )
    # Radii are float16 distances: allow at most one float16 step (we reproduce them exactly).
    for got, want in ((radii_ref, z["radii_ref"]), (radii_sample, z["radii_sample"])):
        ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(got - want) <= ulp)
        assert np.mean(got == want) > 0.99
    assert p == float(z["precision"])
    assert r == float(z["recall"])


def test_frechet_distance_errors_and_closed_form():
    with pytest.raises(ValueError, match="Imaginary component"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="different"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    # Diagonal statistics: FID has the closed form |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-9)


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    assert metrics.precision_recall(x, x, row_batch_size=20, col_batch_size=24) == (1.0, 1.0)
    far = x + 100.0
    assert metrics.precision_recall(x, far, row_batch_size=20, col_batch_size=24) == (0.0, 0.0)


def test_float32_fallback_when_float16_overflows():
    # Squared norms ~ 2e6 overflow float16 (max 65504): the block must fall back to float32.
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(40, 8)) * 500).astype(np.float32)
    est = metrics.ManifoldEstimator(row_batch_size=16, col_batch_size=16)
    radii = est.manifold_radii(x)
    d = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    want = np.sort(d, axis=1)[:, 3]
    np.testing.assert_allclose(radii[:, 0], want, rtol=1e-4)
    assert np.all(np.isfinite(radii))


def test_float16_distances_match_tensorflow():
    """The reference's DistanceBlock, run in TensorFlow, on 2048-d features (Inception's size)."""
    import tensorflow as tf  # a requirement: a missing install fails, not skips

    rng = np.random.default_rng(3)
    n, d = 48, 2048
    x = (np.abs(rng.normal(size=(n, d))) * 0.4).astype(np.float32)
    x[5] = x[6]  # a duplicate: a zero distance
    u16 = tf.cast(x, tf.float16)
    norm = tf.reduce_sum(tf.square(u16), 1)
    dist = tf.maximum(
        tf.reshape(norm, [-1, 1])
        - 2 * tf.matmul(u16, u16, False, True)
        + tf.reshape(norm, [1, -1]),
        0.0,
    )
    dist = tf.cast(dist, tf.float32).numpy()
    want = np.partition(dist, 3, axis=1)[:, 3]
    np.testing.assert_array_equal(metrics.squared_norms_f16(x), norm.numpy().astype(np.float32))
    radii = metrics.ManifoldEstimator(row_batch_size=20, col_batch_size=30).manifold_radii(x)
    np.testing.assert_array_equal(radii[:, 0], want)
