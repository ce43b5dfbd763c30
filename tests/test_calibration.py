"""Thresholds and normalisation checked against values computed by hand."""

import json

import numpy as np
import pytest

from kdcore.calibration import (
    confusion,
    false_positive_rate,
    normalize,
    summarize_scores,
    threshold_f1_optimal,
    threshold_from_max_fpr,
    threshold_from_percentile,
)
from kdcore.metrics import f1_max


def test_summarize_scores_by_hand():
    summary = summarize_scores(np.array([4.0, 1.0, 3.0, 2.0], dtype=np.float32))
    assert summary["scores"] == [4.0, 1.0, 3.0, 2.0]
    assert (summary["n"], summary["min"], summary["max"]) == (4, 1.0, 4.0)
    assert summary["mean"] == 2.5
    # Population std: deviations 1.5, 0.5, 0.5, 1.5 -> variance (2.25 + 0.25) * 2 / 4.
    assert summary["std"] == pytest.approx(np.sqrt(1.25))
    # Linear quantile q of sorted [1, 2, 3, 4] sits at position 3q: 1 + 3q.
    expected = {"0.5": 2.5, "0.9": 3.7, "0.95": 3.85, "0.99": 3.97, "0.995": 3.985}
    assert summary["quantiles"] == pytest.approx(expected)
    json.dumps(summary)
    assert all(type(v) is float for v in summary["scores"])


def test_summarize_single_score_has_zero_std():
    assert summarize_scores([0.7])["std"] == 0.0


def test_summarize_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="empty"):
        summarize_scores([])
    with pytest.raises(ValueError, match="NaN"):
        summarize_scores([1.0, np.nan])


def test_threshold_from_percentile_by_hand():
    # Position 0.9 * (5 - 1) = 3.6 between 30 and 40 -> 36.
    assert threshold_from_percentile([40, 0, 20, 10, 30], 90) == pytest.approx(36.0)
    assert threshold_from_percentile([40, 0, 20, 10, 30], 100) == 40.0
    assert threshold_from_percentile([40, 0, 20, 10, 30], 0) == 0.0


@pytest.mark.parametrize("percentile", [-1, 100.5])
def test_threshold_from_percentile_range(percentile):
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        threshold_from_percentile([1.0, 2.0], percentile)


@pytest.mark.parametrize(
    "max_fpr, expected",
    [
        (0.0, 10.0),   # nothing may exceed: the maximum
        (0.1, 9.0),    # only 10 > 9: 1/10
        (0.15, 9.0),   # t = 8 would let 2/10 through
        (0.2, 8.0),
        (1.0, 1.0),    # the smallest normal score (9/10 above it)
    ],
)
def test_threshold_from_max_fpr_by_hand(max_fpr, expected):
    scores = np.arange(10, 0, -1, dtype=float)  # 10, 9, ..., 1
    assert threshold_from_max_fpr(scores, max_fpr) == expected
    assert false_positive_rate(scores, expected) <= max_fpr


def test_threshold_from_max_fpr_with_ties():
    # [1, 1, 2, 2]: fraction > 1 is 2/4 = 0.5 -> 1 allowed at 0.5; below it only 2 (0/4).
    assert threshold_from_max_fpr([2, 1, 2, 1], 0.5) == 1.0
    assert threshold_from_max_fpr([2, 1, 2, 1], 0.49) == 2.0


def test_threshold_from_max_fpr_no_rounding_loss():
    # 0.29 * 100 is 28.999999999999996 in floating point; 29 of 100 scores above 70
    # is still exactly a 0.29 false-positive rate, so 70 is the answer, not 71.
    assert threshold_from_max_fpr(np.arange(100), 0.29) == 70.0


@pytest.mark.parametrize("max_fpr", [-0.1, 1.1])
def test_threshold_from_max_fpr_range(max_fpr):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_from_max_fpr([1.0, 2.0], max_fpr)


def test_threshold_f1_optimal_delegates_to_f1_max():
    labels, scores = [0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.4, 0.8, 0.2, 0.3]
    # Best F1 6/7 when NG = score >= 0.3; next lower score 0.2 -> 0.25 (see test_metrics).
    assert threshold_f1_optimal(labels, scores) == pytest.approx(0.25)
    assert threshold_f1_optimal(labels, scores) == f1_max(labels, scores)[1]


def test_threshold_f1_optimal_needs_both_classes():
    with pytest.raises(ValueError, match="needs labelled defective images"):
        threshold_f1_optimal([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="needs labelled normal images"):
        threshold_f1_optimal([1, 1], [0.1, 0.2])


def test_normalize_by_hand():
    # (s - 5) / (10 - 0) + 0.5, clipped to [0, 1].
    scores = np.array([5.0, 10.0, 0.0, 7.5, 20.0, -3.0])
    expected = [0.5, 1.0, 0.0, 0.75, 1.0, 0.0]
    assert normalize(scores, 5.0, 0.0, 10.0) == pytest.approx(expected)


def test_normalize_keeps_shape_and_float32():
    anomaly_map = np.full((2, 3, 3), 6.0, dtype=np.float32)
    result = normalize(anomaly_map, 5.0, 0.0, 10.0)
    assert result.shape == (2, 3, 3) and result.dtype == np.float32
    assert result == pytest.approx(np.full((2, 3, 3), 0.6))
    assert normalize(6, 5.0, 0.0, 10.0) == pytest.approx(0.6)


def test_normalize_with_zero_span_is_a_step():
    assert normalize([1.0, 2.0, 3.0], 2.0, 4.0, 4.0).tolist() == [0.0, 0.5, 1.0]


def test_normalize_rejects_inverted_range():
    with pytest.raises(ValueError, match="below min_score"):
        normalize([1.0], 0.5, 1.0, 0.0)


def test_false_positive_rate_is_strictly_above():
    # 0.5 equals the threshold: not NG. Only 0.9 counts -> 1/4.
    assert false_positive_rate([0.1, 0.5, 0.9, 0.3], 0.5) == 0.25


def test_confusion_by_hand():
    # NG iff > 0.3: scores 0.4, 0.8, 0.4 -> labels 0, 1, 1 -> TP 2, FP 1;
    # not NG: 0.1 (0), 0.2 (0), 0.3 (1, equal to the threshold) -> TN 2, FN 1.
    counts = confusion([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.4, 0.8, 0.2, 0.3], 0.3)
    assert counts == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    assert all(type(v) is int for v in counts.values())
