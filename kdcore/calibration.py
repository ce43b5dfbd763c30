"""Decision thresholds derived from anomaly scores, and score normalisation.

Verdict convention everywhere: an image (or pixel) is NG iff ``score > threshold``.
Thresholds usually come from scores of a hold-out set of normal images, never seen
in training, so they reflect how high normal scores go on unseen data. Labels are
0 (normal) / 1 (defective), booleans accepted. Every function returns plain Python
numbers except :func:`normalize`, which maps numpy arrays to numpy arrays.
"""

from __future__ import annotations

import numpy as np

from kdcore.metrics import _labels_and_scores, f1_max
# Score-to-display normalisation lives with the rendering (an export bundle carries that file); kept
# importable from here, where the threshold code that feeds it is.
from kdcore.visualize import normalize  # noqa: F401

__all__ = [
    "QUANTILES",
    "summarize_scores",
    "threshold_from_percentile",
    "threshold_from_max_fpr",
    "threshold_f1_optimal",
    "normalize",
    "false_positive_rate",
    "confusion",
]

#: Quantiles reported by :func:`summarize_scores`, as fractions.
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99, 0.995)


def summarize_scores(scores) -> dict:
    """JSON-ready summary of a set of scores.

    Keys: ``scores`` (the values, as a list), ``n``, ``min``, ``max``, ``mean``,
    ``std`` (population, ddof=0, so a single score gives 0 rather than NaN) and
    ``quantiles``, keyed by the strings in :data:`QUANTILES` ("0.5", "0.9", ...),
    computed by numpy's linear interpolation.
    """
    scores = _as_scores(scores, "scores")
    return {
        "scores": scores.tolist(),
        "n": int(scores.size),
        "min": float(scores.min()),
        "max": float(scores.max()),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "quantiles": {str(q): float(np.quantile(scores, q)) for q in QUANTILES},
    }


def threshold_from_percentile(normal_scores, percentile: float) -> float:
    """The ``percentile``-th percentile (0-100, linear interpolation) of normal scores."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(_as_scores(normal_scores, "normal scores"), percentile))


def threshold_from_max_fpr(normal_scores, max_fpr: float) -> float:
    """Smallest normal score t such that the fraction of normal scores > t is at most
    ``max_fpr`` (in [0, 1]).

    Always one of the normal scores; ``max_fpr=0`` gives their maximum. With ties
    the achieved false-positive rate can be well below ``max_fpr``.
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    scores = np.sort(_as_scores(normal_scores, "normal scores"))
    candidates = np.unique(scores)
    fpr = (scores.size - np.searchsorted(scores, candidates, side="right")) / scores.size
    # fpr falls to 0 at the maximum, so some candidate always qualifies. Comparing the
    # fraction itself, not a count floor(max_fpr * n), avoids rounding like 0.29 * 100.
    return float(candidates[np.argmax(fpr <= max_fpr)])


def threshold_f1_optimal(labels, scores) -> float:
    """Threshold maximising image-level F1 on labelled scores (see ``metrics.f1_max``).

    Raises ValueError when there are no defective or no normal images.
    """
    labels, scores = _labels_and_scores(labels, scores)
    n_defective = int(np.count_nonzero(labels))
    if n_defective == 0:
        raise ValueError("F1-optimal threshold needs labelled defective images")
    if n_defective == labels.size:
        raise ValueError("F1-optimal threshold needs labelled normal images")
    return f1_max(labels, scores)[1]


def false_positive_rate(normal_scores, threshold: float) -> float:
    """Fraction of normal scores judged NG, i.e. ``> threshold``."""
    scores = _as_scores(normal_scores, "normal scores")
    return float(np.count_nonzero(scores > threshold) / scores.size)


def confusion(labels, scores, threshold: float) -> dict:
    """Counts ``tp``, ``fp``, ``tn``, ``fn`` of the verdicts ``score > threshold``,
    defective being the positive class."""
    labels, scores = _labels_and_scores(labels, scores)
    predicted = scores > threshold
    return {
        "tp": int(np.count_nonzero(predicted & labels)),
        "fp": int(np.count_nonzero(predicted & ~labels)),
        "tn": int(np.count_nonzero(~predicted & ~labels)),
        "fn": int(np.count_nonzero(~predicted & labels)),
    }


def _as_scores(scores, name: str) -> np.ndarray:
    """Validated non-empty, finite, 1-D float64 scores."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {scores.shape}")
    if scores.size == 0:
        raise ValueError(f"{name} are empty")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contain NaN or infinity")
    return scores
