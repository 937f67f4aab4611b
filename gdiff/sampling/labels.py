"""Which class each sample is drawn for, and which guidance scales a run sweeps.

Labels are fixed for the whole run before any sampling starts (a pure function of the spec, the
sample count and the seed), so that a resumed run, another device count or another batch size
draws every example for the same class.
"""

from __future__ import annotations

import numpy as np

from gdiff import errors

LABEL_MODES = ("random", "balanced")


def parse_scales(spec, key: str = "sample.classifier_scale") -> list[float]:
    """`sample.classifier_scale` (or the list `key` names) -> a list of floats.

    Accepts a number, a comma-separated string ("0,1,4") or a sequence of numbers. Duplicates are
    refused because each scale names its own output folder; so are values that are not finite
    numbers. A negative scale is allowed: it scales the classifier's gradient by a negative
    factor, pushing samples AWAY from their label (the reference computes the same
    `grad * scale`); 0 samples unguided.

    Raises:
      errors.ConfigError: naming the value that cannot be a list of distinct finite scales.
    """
    if isinstance(spec, bool):
        raise errors.ConfigError(
            f"{key}={spec!r} is not a number; give a number or a "
            "comma-separated list of numbers (e.g. 0,1,4)"
        )
    parts = [spec] if isinstance(spec, int | float) else _items(spec)
    if not parts:
        raise errors.ConfigError(
            f"{key}={spec!r} names no scale; give a number or a "
            "comma-separated list of numbers (e.g. 0,1,4)"
        )
    try:
        # + 0.0: -0 is the scale 0 (one folder, scale_0).
        values = [float(p) + 0.0 for p in parts]
    except (TypeError, ValueError):
        raise errors.ConfigError(
            f"{key}={spec!r} is not a number or a comma-separated list of numbers (e.g. 0,1,4)"
        ) from None
    bad = [p for p, v in zip(parts, values, strict=True) if not np.isfinite(v)]
    if bad:
        raise errors.ConfigError(
            f"{key}={spec!r} contains a non-finite value ({bad[0]}); every "
            "scale must be a finite number"
        )
    repeated = sorted({format_scale(v) for v in values if values.count(v) > 1})
    if repeated:
        raise errors.ConfigError(
            f"{key}={spec!r} repeats a scale ({', '.join(repeated)}); each "
            "scale is drawn once, into its own folder"
        )
    return values


def format_scale(scale: float) -> str:
    """The folder-name form of a scale: 0 -> "0", 1.5 -> "1.5", 10 -> "10"."""
    return f"{float(scale):g}"


def make_labels(spec, num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """The label of every sample of a run.

    Args:
      spec: "random" (uniform over the classes, the reference sampling script's choice),
        "balanced" (0, 1, ..., K-1, 0, 1, ...: equal counts, and a grid whose rows are classes),
        an int (every sample that class) or a comma-separated list / sequence of ints (cycled).
      num_samples: N.
      num_classes: K, the number of classes of the model (and classifier) that will see the labels.
      seed: the run's sample seed; random labels depend only on it and N.

    Returns:
      int32 [N] labels in [0, K).
    """
    if num_classes <= 0:
        raise errors.ConfigError(
            f"labels need a positive number of classes; got {num_classes} (model.num_classes, "
            "classifier.num_classes)"
        )
    if isinstance(spec, str) and spec.strip().lower() in LABEL_MODES:
        mode = spec.strip().lower()
        if mode == "random":
            # A numpy stream of its own (not the sampling key), so labels never depend on how the
            # JAX noise is drawn.
            rng = np.random.default_rng([int(seed), 0x6C61626C])
            return rng.integers(0, num_classes, size=num_samples).astype(np.int32)
        return (np.arange(num_samples) % num_classes).astype(np.int32)
    values = _parse_int_list(spec)
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise errors.ConfigError(
            f"sample.labels={spec!r}: label(s) {bad} outside the model's classes "
            f"0..{num_classes - 1}; name classes in that range, or use random or balanced"
        )
    return np.resize(np.asarray(values, np.int32), num_samples)


def _items(spec) -> list:
    """The items of a comma-separated string (blanks dropped) or of a sequence."""
    if isinstance(spec, str):
        return [p.strip() for p in spec.split(",") if p.strip()]
    return list(spec)


def is_balanced(spec) -> bool:
    return isinstance(spec, str) and spec.strip().lower() == "balanced"


def _parse_int_list(spec) -> list[int]:
    if isinstance(spec, bool):
        raise errors.ConfigError(
            f"sample.labels={spec!r} is not a label spec; use 'random', 'balanced', an int or a "
            "comma-separated list of ints"
        )
    if isinstance(spec, int | np.integer):
        return [int(spec)]
    parts = _items(spec)
    if not parts:
        raise errors.ConfigError(
            "sample.labels is empty; use random, balanced, an int or a comma list"
        )
    try:
        return [int(p) for p in parts]
    except (TypeError, ValueError) as e:
        raise errors.ConfigError(
            f"sample.labels={spec!r} must be 'random', 'balanced', an int or a comma-separated "
            "list of ints"
        ) from e
