"""Which guidance each row of a sampling run gets: kind, weight, classifier scale and interval.

A run samples every example once per `GuidanceRow`, all rows in one compiled program over the
same noise and labels (gdiff/sampling/sampler.py). The rows come from four `sample` keys:

    sample.guidance           kinds, comma-separated: classifier | cfg | two_network |
                              autoguidance, or one of the last three + "+classifier"
    sample.classifier_scale   classifier scales: one classifier row per scale; the scales
                              added on top of the output guidance of a "+classifier" kind
    sample.guidance_scale     the weights w of cfg / two_network / autoguidance rows
    sample.guidance_interval  "" (every step), or noise-level intervals "lo,hi" (sigma in
                              (lo, hi]) separated by ";", "all" for every step within a list

Every kind's rows are crossed with every interval. The weight w follows EDM2: the guided
prediction is u + w (c - u) for the conditional prediction c and the guide's u, so w = 1 is the
conditional model alone and w = 0 the guide alone (Ho & Salimans' classifier-free weight is
w - 1). The guide u is the same network given the null label (`cfg`, a model trained with
`model.class_dropout`), or a second network from `sample.guide_checkpoint`: an unconditional
model (`two_network`) or a weaker version of the same model (`autoguidance`). The last two run
the same computation; the names record what the guide is.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from gdiff import errors
from gdiff.diffusion import guidance as guidance_lib
from gdiff.sampling import labels as labels_lib

CLASSIFIER = "classifier"
OUTPUT_KINDS = ("cfg", "two_network", "autoguidance")  # guided on the network's output
KINDS = (CLASSIFIER, *OUTPUT_KINDS)
# What each kind's guide prediction is, in the sampler's per-row `guide_kinds`.
GUIDE_KIND = {
    CLASSIFIER: guidance_lib.GUIDE_NONE,
    "cfg": guidance_lib.GUIDE_NULL_LABEL,
    "two_network": guidance_lib.GUIDE_NETWORK,
    "autoguidance": guidance_lib.GUIDE_NETWORK,
}
EVERY_STEP = (0.0, math.inf)


@functools.total_ordering
@dataclasses.dataclass(frozen=True, eq=False)
class GuidanceRow:
    """One row of a run: every example drawn under this guidance.

    The reference's row, classifier guidance at every step, is equal to its scale (and hashes
    like it), as runs were keyed by scale before other kinds existed: `paths[1.0]` finds the
    classifier row at scale 1 of a run's {row: path}. Rows order by kind, weight, classifier
    scale and interval.
    """

    kind: str  # one of KINDS
    weight: float = 1.0  # w of the output guidance (1 for classifier rows)
    classifier_scale: float = 0.0  # classifier guidance, alone or on top of the output guidance
    interval: tuple[float, float] = EVERY_STEP  # guided where sigma in (lo, hi]

    def _key(self) -> tuple:
        return (KINDS.index(self.kind), self.weight, self.classifier_scale, self.interval)

    @staticmethod
    def _as_row(other):
        if isinstance(other, GuidanceRow):
            return other
        if isinstance(other, int | float) and not isinstance(other, bool):
            return classifier_row(other)
        return None

    def __eq__(self, other) -> bool:
        other = self._as_row(other)
        return NotImplemented if other is None else self._key() == other._key()

    def __lt__(self, other) -> bool:
        other = self._as_row(other)
        return NotImplemented if other is None else self._key() < other._key()

    def __hash__(self) -> int:
        if self._is_scale():
            return hash(self.classifier_scale)
        return hash(self._key())

    def _is_scale(self) -> bool:
        return self.kind == CLASSIFIER and self.every_step

    def __float__(self) -> float:
        return float(self.scale)

    def __format__(self, spec: str) -> str:
        """The reference's row formats as its scale (f"scale_{row:g}"); others as their folder."""
        if self._is_scale():
            return format(self.classifier_scale, spec)
        return self.folder() if spec else repr(self)

    @property
    def scale(self) -> float:
        """The row's headline scale: the classifier scale of a classifier row, else w."""
        return self.classifier_scale if self.kind == CLASSIFIER else self.weight

    @property
    def every_step(self) -> bool:
        return self.interval == EVERY_STEP

    def curve_key(self) -> tuple:
        """Orders rows by curve (kind, classifier scale on top, interval), then scale."""
        on_top = 0.0 if self.kind == CLASSIFIER else self.classifier_scale
        return (KINDS.index(self.kind), on_top, self.interval, self.scale)

    def _spell(self, classifier: str, output: str, on_top: str, interval: str) -> str:
        """The row in one spelling: format strings of a classifier row ({s}), of an output-guided
        one ({kind}, {w}), of a classifier scale on top of it ({s}) and of an interval ({lo},
        {hi}), each part present when the row has it."""
        s, w = _num(self.classifier_scale), _num(self.weight)
        if self.kind == CLASSIFIER:
            text = classifier.format(s=s)
        else:
            text = output.format(kind=self.kind, w=w)
            if self.classifier_scale != 0:
                text += on_top.format(s=s)
        if not self.every_step:
            text += interval.format(lo=_num(self.interval[0]), hi=_num(self.interval[1]))
        return text

    def method(self) -> str:
        """The guidance without its headline scale, e.g. "cfg+classifier 1, sigma in (0.3, 5]":
        the curve a row lies on in a report (its points: the scales)."""
        return self._spell(CLASSIFIER, "{kind}", "+classifier {s}", ", sigma in ({lo}, {hi}]")

    def folder(self) -> str:
        """The row's output folder: scale_<s> for a classifier row guided at every step (the
        folders of earlier versions), else <kind>_<w>[+classifier_<s>][_sigma_<lo>-<hi>]."""
        return self._spell("scale_{s}", "{kind}_{w}", "+classifier_{s}", "_sigma_{lo}-{hi}")

    def short(self) -> str:
        """A short title: "s=2", "w=3", "w=3 +s=1", with " (0.3, 5]" for an interval."""
        return self._spell("s={s}", "w={w}", " +s={s}", " ({lo}, {hi}]")

    def describe(self) -> str:
        """In words, for logs: "cfg w=3 + classifier scale 1, sigma in (0.3, 5]"."""
        return self._spell(
            "classifier scale {s}",
            "{kind} w={w}",
            " + classifier scale {s}",
            ", sigma in ({lo}, {hi}]",
        )

    def settings(self) -> dict:
        """The row as a run's manifest pins it (JSON: an infinite bound as "inf")."""
        return {
            "kind": self.kind,
            "weight": self.weight,
            "classifier_scale": self.classifier_scale,
            "interval": [_num(v) for v in self.interval],
        }


def _num(v: float) -> str:
    return "inf" if math.isinf(v) else labels_lib.format_scale(v)


def _kinds(spec) -> list[tuple[str, bool]]:
    """`sample.guidance` -> [(kind, classifier on top)]."""
    out = []
    for item in labels_lib._items(spec):
        kind, _, extra = str(item).partition("+")
        on_top = extra == CLASSIFIER
        if kind not in KINDS or (extra and not on_top) or (on_top and kind == CLASSIFIER):
            raise errors.ConfigError(
                f"sample.guidance={spec!r}: {item!r} is not a guidance kind; use "
                f"{', '.join(KINDS)}, or cfg / two_network / autoguidance + '+classifier'"
            )
        out.append((kind, on_top))
    if not out:
        raise errors.ConfigError(f"sample.guidance={spec!r} names no guidance kind")
    return out


def parse_intervals(spec) -> list[tuple[float, float]]:
    """`sample.guidance_interval` -> [(lo, hi)]: "" or "all" is every step.

    Raises:
      errors.ConfigError: a bound that is not a number, negative, or lo > hi.
    """
    text = str(spec).strip()
    if not text:
        return [EVERY_STEP]
    out = []
    for part in text.split(";"):
        part = part.strip()
        if part in ("", "all"):
            out.append(EVERY_STEP)
            continue
        try:
            lo, hi = (float(v) for v in part.split(","))
        except ValueError:
            raise errors.ConfigError(
                f"sample.guidance_interval={spec!r}: {part!r} is not 'lo,hi' (noise levels "
                "sigma, e.g. 0.28,5.42) or 'all'"
            ) from None
        if not (0 <= lo <= hi) or math.isnan(hi):
            raise errors.ConfigError(
                f"sample.guidance_interval={spec!r}: ({lo:g}, {hi:g}] is not an interval of "
                "noise levels (need 0 <= lo <= hi)"
            )
        out.append((lo + 0.0, hi + 0.0))
    return out


def _scales(sample, key: str) -> list[float]:
    return labels_lib.parse_scales(sample[key], key=f"sample.{key}")


def parse_rows(sample) -> tuple[GuidanceRow, ...]:
    """The rows a `sample` group asks for, in the order they are stated.

    Raises:
      errors.ConfigError: an unknown kind, a bad scale or interval, or a row stated twice.
    """
    intervals = parse_intervals(sample["guidance_interval"])
    rows = []
    for kind, on_top in _kinds(sample["guidance"]):
        if kind == CLASSIFIER:
            pairs = [(1.0, s) for s in _scales(sample, "classifier_scale")]
        else:
            tops = _scales(sample, "classifier_scale") if on_top else [0.0]
            pairs = [(w, s) for w in _scales(sample, "guidance_scale") for s in tops]
        rows += [GuidanceRow(kind, w, s, iv) for iv in intervals for w, s in pairs]
    folders = [r.folder() for r in rows]
    repeated = sorted({f for f in folders if folders.count(f) > 1})
    if repeated:
        raise errors.ConfigError(
            f"sample.guidance={sample['guidance']!r} states the row(s) {', '.join(repeated)} "
            "twice; each row is drawn once, into its own folder"
        )
    return tuple(rows)


def compares(rows) -> bool:
    """Whether rows go beyond classifier guidance at every step (the reference's rows)."""
    return any(r.kind != CLASSIFIER or not r.every_step for r in rows)


def uses_classifier(rows) -> bool:
    """Whether any row needs the classifier's gradient."""
    return any(r.classifier_scale != 0 for r in rows)


def uses(rows, kind: int) -> bool:
    """Whether any row guides with guide `kind` (guidance.GUIDE_NULL_LABEL / GUIDE_NETWORK)."""
    return any(GUIDE_KIND[r.kind] == kind for r in rows)


def row_arrays(rows, examples: int) -> dict[str, np.ndarray]:
    """The per-row arrays of a batch (row-major: every example once per row), as the sampler
    reads them, each [len(rows) * examples]: `scales` (classifier scales) always;
    `guide_kinds` and `guide_scales` when a row guides the output; `sigma_lo` and `sigma_hi`
    when a row has an interval (a run of the reference's rows keeps its batches of before)."""

    def per_row(values, dtype):
        return np.repeat(np.asarray(values, dtype), examples)

    out = {"scales": per_row([r.classifier_scale for r in rows], np.float32)}
    if any(r.kind != CLASSIFIER for r in rows):
        out["guide_kinds"] = per_row([GUIDE_KIND[r.kind] for r in rows], np.int32)
        out["guide_scales"] = per_row([r.weight for r in rows], np.float32)
    if any(not r.every_step for r in rows):
        out["sigma_lo"] = per_row([r.interval[0] for r in rows], np.float32)
        out["sigma_hi"] = per_row([r.interval[1] for r in rows], np.float32)
    return out


def classifier_row(scale: float) -> GuidanceRow:
    """The reference's row: classifier guidance at `scale`, at every step (folder scale_<s>)."""
    return GuidanceRow(CLASSIFIER, 1.0, float(scale) + 0.0)
