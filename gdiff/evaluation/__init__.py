"""Sample-quality evaluation: the FID Inception-v3 and FID / sFID / IS / precision / recall with
the numerics of the reference's `evaluations/evaluator.py`."""

from gdiff.evaluation.features import (
    ClassifierExtractor,
    FeatureExtractor,
    InceptionExtractor,
    fid_inception_features,
    preprocess_for_inception,
)
from gdiff.evaluation.inception import create_fid_inception
from gdiff.evaluation.inception_weights import (
    convert_fid_inception_state_dict,
    load_fid_inception_graph_def,
)
from gdiff.evaluation.metrics import (
    ManifoldEstimator,
    compute_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from gdiff.evaluation.resize import resize_bilinear_halfpixel, resize_bilinear_legacy
from gdiff.evaluation.small_classifier import (
    SmallClassifier,
    classifier_accuracy,
    train_small_classifier,
)

__all__ = [
    "ClassifierExtractor",
    "FeatureExtractor",
    "InceptionExtractor",
    "ManifoldEstimator",
    "SmallClassifier",
    "classifier_accuracy",
    "compute_statistics",
    "convert_fid_inception_state_dict",
    "create_fid_inception",
    "evaluate_samples",
    "fid_inception_features",
    "frechet_distance",
    "inception_score",
    "load_fid_inception_graph_def",
    "metrics_from_activations",
    "precision_recall",
    "preprocess_for_inception",
    "resize_bilinear_halfpixel",
    "resize_bilinear_legacy",
    "train_small_classifier",
]


def __getattr__(name):
    # Imported lazily so `python -m gdiff.evaluation.evaluator` does not import itself twice.
    if name in ("evaluate_samples", "metrics_from_activations"):
        from gdiff.evaluation import evaluator

        return getattr(evaluator, name)
    raise AttributeError(f"module 'gdiff.evaluation' has no attribute {name!r}")
