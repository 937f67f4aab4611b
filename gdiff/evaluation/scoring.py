"""The one scoring engine of sweeps: every row of `--mode=sweep` and of the digits pipeline.

A `Scorer` holds what a sweep scores against, computed once: the reference (statistics and
activations, `evaluator.load_reference` for a reference batch file, cached next to it), the feature
network, and optionally the guidance classifier. `scorer(images, labels)` gives one row:

* the evaluator's five numbers (`inception_score`, `fid`, `sfid`, `precision`, `recall`) from
  `evaluator.metrics_from_activations`, the function `--mode=evaluate` prints, with the same
  reference and Inception Score chunk size; a sweep's row for a scale therefore equals
  `--mode=evaluate` on that scale's merged `.npz` to the last digit;
* `classifier_accuracy` and `log_prob`: top-1 accuracy and mean log p(requested label | x, t=0) of
  the noise-aware guidance classifier (when one is given);
* `eval_accuracy`: the feature network's own top-1 accuracy at the requested labels, when the
  feature network is a classifier of the same classes (the digits' evaluation network; not the
  FID Inception, whose 1008 outputs are not ImageNet's label order).

Values a row cannot have (no labels in an unconditional, unguided run) are NaN, so every row of
one scorer has the same keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gdiff.evaluation import evaluator

GUIDANCE_KEYS = ("classifier_accuracy", "log_prob")


class ClassifierScore:
    """The guidance classifier's view of samples: p(y | x, t=0) at the requested labels.

    Args:
      classifier: the noise-aware classifier module (`factory.build_classifier`).
      variables: its {"params": ...}.
      batch_size: images per compiled call.
    """

    def __init__(self, classifier, variables, *, batch_size: int = 256):
        self.variables = variables
        self.batch_size = int(batch_size)

        def log_probs(v, x_uint8, y):
            x = x_uint8.astype(jnp.float32) / 127.5 - 1.0
            logits = classifier.apply(v, x, jnp.zeros((x.shape[0],), jnp.int32))
            lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0], jnp.argmax(lp, -1) == y

        self._log_probs = jax.jit(log_probs)

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """uint8 images [N, H, W, 3] drawn for int labels [N] -> dict(classifier_accuracy,
        log_prob)."""
        lps, hits = [], []
        for s in range(0, len(images), self.batch_size):
            batch = jnp.asarray(images[s : s + self.batch_size])
            y = jnp.asarray(np.asarray(labels[s : s + self.batch_size], np.int32))
            lp, hit = self._log_probs(self.variables, batch, y)
            lps.append(np.asarray(lp))
            hits.append(np.asarray(hit))
        return {
            "classifier_accuracy": float(np.mean(np.concatenate(hits))),
            "log_prob": float(np.mean(np.concatenate(lps))),
        }


def reference_from_images(extractor, images: np.ndarray) -> dict:
    """A reference from images held in memory (no statistics): their pool / spatial activations."""
    acts = extractor(images)
    return {"pool": acts["pool"], "spatial": acts["spatial"]}


class Scorer:
    """images (+ requested labels) -> one row of metrics; see the module docstring.

    Args:
      extractor: a `features.FeatureExtractor` (uint8 [N, H, W, 3] -> pool, spatial, probs).
      reference: `evaluator.load_reference(...)` or `reference_from_images(...)`.
      is_split_size: the Inception Score chunk size (`eval.is_split_size`, as --mode=evaluate).
      guidance: a `ClassifierScore`, or None for no classifier columns.
      eval_accuracy: whether the extractor's `probs` are over the requested labels' classes.
    """

    def __init__(
        self,
        extractor,
        reference: dict,
        *,
        is_split_size: int = 5000,
        guidance: ClassifierScore | None = None,
        eval_accuracy: bool = False,
    ):
        self.extractor = extractor
        self.reference = reference
        self.is_split_size = int(is_split_size)
        self.guidance = guidance
        self.eval_accuracy = eval_accuracy

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        """uint8 images [N, H, W, 3] drawn for int labels [N] (None: unlabelled) -> dict of
        floats: the evaluator's five numbers, then the label columns this scorer has."""
        acts = self.extractor(images)
        row = evaluator.metrics_from_activations(
            self.reference, acts, is_split_size=self.is_split_size
        )
        row = {k: float(row[k]) for k in evaluator.METRIC_NAMES}
        if self.eval_accuracy:
            row["eval_accuracy"] = (
                math.nan
                if labels is None
                else float(np.mean(np.argmax(acts["probs"], axis=-1) == np.asarray(labels)))
            )
        if self.guidance is not None:
            no_labels = dict.fromkeys(GUIDANCE_KEYS, math.nan)
            row.update(no_labels if labels is None else self.guidance(images, labels))
        return row


def evaluate_scorer(ev, workdir, *, batch=None, extractor=None, guidance=None) -> Scorer:
    """The scorer `--mode=evaluate` is for the eval group `ev`: eval.ref_batch's statistics and
    (cached) activations, in the FID Inception of eval.inception_weights at eval.resize (or
    `extractor`), with eval.is_split_size; plus `guidance`'s columns when given.

    Args:
      ev: a config's `eval` group.
      workdir: where the reference's activations are cached when its folder is not writable.
      batch: `evaluator.read_reference_batch(ev.ref_batch)` when the caller has read it.
    """
    if extractor is None:
        # Raises FileNotFoundError with download instructions when the weights are missing.
        extractor = evaluator.build_extractor(
            ev.inception_weights, batch_size=int(ev.batch_size), resize=str(ev.resize)
        )
    reference = evaluator.load_reference(
        ev.ref_batch,
        extractor,
        weights_path=ev.inception_weights,
        resize=str(ev.resize),
        workdir=workdir,
        batch=batch,
    )
    return Scorer(extractor, reference, is_split_size=int(ev.is_split_size), guidance=guidance)
