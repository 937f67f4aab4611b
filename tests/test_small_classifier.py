"""The small feature classifier on 8x8 digits, and the five metrics computed with it."""

import numpy as np
import pytest

from gdiff.evaluation import evaluate_samples, features, small_classifier


@pytest.fixture(scope="module")
def digits():
    from sklearn import datasets

    d = datasets.load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)  # [N, 8, 8, 3], as gdiff's digits source
    held_out = np.arange(len(images)) % 5 == 0
    return images[~held_out], d.target[~held_out], images[held_out], d.target[held_out]


@pytest.fixture(scope="module")
def trained(digits):
    x, y, _, _ = digits
    return small_classifier.train_small_classifier(
        x, y, num_classes=10, steps=100, batch_size=64, seed=0
    )


def test_classifier_learns_digits(digits, trained):
    _, _, x_test, y_test = digits
    module, variables = trained
    acc = small_classifier.classifier_accuracy(module, variables, x_test, y_test)
    assert acc > 0.85, acc
    with pytest.raises(ValueError, match="labels"):
        small_classifier.train_small_classifier(x_test, y_test[:-1], num_classes=10, steps=1)


def test_metrics_with_classifier_features(digits, trained):
    x, _, x_test, _ = digits
    module, variables = trained
    ext = features.ClassifierExtractor(module, variables, batch_size=100)
    out = ext(x_test[:50])
    assert out["pool"].shape == (50, module.feature_dim)
    assert out["spatial"].shape == (50, 8 * 8 * module.spatial_channels)
    np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)

    ref = x_test
    same = evaluate_samples(ext, ref, ref, is_split_size=100)
    assert abs(same["fid"]) < 1e-6 * max(1.0, float(np.var(out["pool"], 0).sum()))
    assert abs(same["sfid"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["inception_score"] > 3.0  # a confident 10-class classifier on real digits

    # "Bad samples": shifted by two pixels and darkened; the metrics must notice.
    bad = (np.roll(ref, 2, axis=(1, 2)) * 0.6).astype(np.uint8)
    worse = evaluate_samples(ext, ref, bad, is_split_size=100)
    other_real = evaluate_samples(ext, ref, x[: len(ref)], is_split_size=100)
    assert worse["fid"] > 5 * other_real["fid"] > 0
    assert worse["precision"] < other_real["precision"]
