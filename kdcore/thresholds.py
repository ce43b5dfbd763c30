"""Threshold modes, operating points and the checks that keep a chosen threshold honest.

Verdict convention everywhere: an image is NG iff ``score > threshold``. Rates come with their counts and, where
they are estimated from few images, a 95 % Wilson interval; a threshold that calls every image NG or OK, or
misses the target it was chosen for, is named in a warning rather than left to be discovered on the line.

A model's threshold slider works on a normalised scale: the saved threshold at 0.5, one hold-out score range
per unit (``to_normalized``, ``from_normalized``, ``threshold_range``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kdcore import calibration

if TYPE_CHECKING:
    from kdcore.store import Model

SCORE, PERCENTILE, MAX_FPR, F1 = "score", "percentile", "max_fpr", "f1"
MODES = {  # as recorded with a saved threshold; "percentile" is also what training sets by default
    SCORE: "Raw score",
    PERCENTILE: "Percentile of the hold-out normals",
    MAX_FPR: "Maximum false-positive rate on the hold-out normals",
    F1: "F1-optimal on the labelled test images",
}


def choose_threshold(mode: str, parameter: float | None, holdout_scores, labels=None, scores=None) -> float:
    """The threshold of a mode: ``parameter`` is the raw value (score), a percentile 0-100 (percentile) or a
    rate 0-1 (max_fpr); f1 needs ``labels`` and ``scores`` with both classes."""
    if mode == SCORE:
        return float(parameter)
    if mode == PERCENTILE:
        return calibration.threshold_from_percentile(holdout_scores, parameter)
    if mode == MAX_FPR:
        return calibration.threshold_from_max_fpr(holdout_scores, parameter)
    if mode == F1:
        return calibration.threshold_f1_optimal(labels, scores)
    raise ValueError(f"unknown threshold mode {mode!r}; one of {', '.join(MODES)}")


def describe_threshold(threshold: dict) -> str:
    """How a threshold was chosen, in words, e.g. "percentile 99 of the hold-out normals"."""
    mode, parameter = threshold["mode"], threshold.get("parameter")
    if mode == PERCENTILE:
        return f"percentile {parameter:g} of the hold-out normals"
    if mode == MAX_FPR:
        return f"at most {parameter:.1%} false positives on the hold-out normals"
    return MODES.get(mode, mode).lower()


@dataclass(frozen=True)
class OperatingPoint:
    """The verdict counts at one threshold (defective = positive); rates are None where undefined."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def fpr(self) -> float | None:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def f1(self) -> float | None:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def operating_point(labels, scores, threshold: float) -> OperatingPoint:
    return OperatingPoint(threshold, **calibration.confusion(labels, scores, threshold))


def curves(labels, scores) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision-recall (precision, recall) curves; needs both classes."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` images, with the 95 % Wilson interval of the rate they estimate."""

    k: int
    n: int

    @property
    def value(self) -> float | None:
        return _ratio(self.k, self.n)

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.k, self.n)

    def __str__(self) -> str:
        if not self.n:
            return "–"
        low, high = self.interval
        return f"{self.value:.1%} ({self.k} of {self.n}; 95 % interval {low:.1%}-{high:.1%})"


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial rate k/n (sound for small n and for k = 0 or n); None if n = 0."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def threshold_warnings(mode: str, parameter: float | None, holdout: OperatingPoint,
                       test: OperatingPoint | None) -> list[str]:
    """What is wrong with a threshold, in words: it calls every image NG or every image OK, or it misses the
    target it was chosen for (or the hold-out is too small to check that target)."""
    warnings = []
    n_holdout = holdout.fp + holdout.tn
    everything = [p for p in (holdout, test) if p is not None]
    n_all = sum(p.tp + p.fp + p.tn + p.fn for p in everything)
    n_ng = sum(p.tp + p.fp for p in everything)
    if n_all and n_ng == n_all:
        warnings.append(f"Every image is NG at this threshold ({n_ng} of {n_all}, normal images included): "
                        "it would reject the whole production.")
    elif n_all and n_ng == 0:
        warnings.append(f"Every image is OK at this threshold (0 of {n_all} NG): it would catch no defect.")
    if mode == MAX_FPR and n_holdout and holdout.fp / n_holdout > parameter:
        warnings.append(f"The target was at most {parameter:.1%} false positives on the hold-out; this threshold "
                        f"gives {holdout.fp} of {n_holdout} ({holdout.fp / n_holdout:.1%}): tied hold-out scores "
                        "cannot be split.")
    if mode in (PERCENTILE, MAX_FPR) and n_holdout:
        target = (1 - parameter / 100) if mode == PERCENTILE else parameter
        if 0 < target < 1 / n_holdout:
            warnings.append(f"With {n_holdout} hold-out images one false positive is already {1 / n_holdout:.1%}, "
                            f"so a {target:.1%} false-positive target cannot be checked here: add normal images "
                            "(10 % are held out) and train again.")
    return warnings


# ------------------------------------------------------------------------------------------- a model's slider
def saved_threshold(model: Model) -> float:
    return float(model.threshold["value"])


def _span(cal: dict) -> float:
    """Width of the hold-out score range: the unit of the normalised scale (never 0, so it can be inverted)."""
    return (cal["max"] - cal["min"]) or max(abs(cal["max"]), 1.0) * 1e-3


def to_normalized(threshold: float, model: Model) -> float:
    """Where ``threshold`` sits on the model's normalised scale (its saved threshold at 0.5), unclipped."""
    return (threshold - saved_threshold(model)) / _span(model.calibration) + 0.5


def from_normalized(position: float, model: Model) -> float:
    return saved_threshold(model) + (position - 0.5) * _span(model.calibration)


def threshold_range(model: Model) -> tuple[float, float, float]:
    """Bounds and step of a threshold slider: the hold-out range and the saved threshold, one span wider each side.

    A step is 0.01 on the normalised scale, and the bounds are whole steps from the saved threshold: a slider
    snaps its value to its steps, and must open exactly on the saved threshold.
    """
    cal, saved = model.calibration, saved_threshold(model)
    span = _span(cal)
    step = span / 100
    below = math.ceil((saved - min(cal["min"], saved) + span) / step)
    above = math.ceil((max(cal["max"], saved) + span - saved) / step)
    return saved - below * step, saved + above * step, step
