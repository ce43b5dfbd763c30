"""Threshold guardrails: rates with counts and intervals, and warnings for thresholds that cannot be trusted."""
from __future__ import annotations

import numpy as np
import pytest

from kdcore import thresholds
from kdcore.thresholds import MAX_FPR, PERCENTILE, SCORE, operating_point, threshold_warnings, wilson_interval


def test_wilson_interval_is_wide_for_few_images_and_narrows_with_more():
    low, high = wilson_interval(1, 7)
    assert low < 1 / 7 < high and high - low > 0.4  # 1 of 7: anything from about 3 % to 51 %
    assert wilson_interval(0, 7)[0] == 0.0 and 0.3 < wilson_interval(0, 7)[1] < 0.4
    narrow = wilson_interval(100, 700)
    assert narrow[1] - narrow[0] < 0.06
    assert wilson_interval(0, 0) is None
    assert str(thresholds.Rate(1, 7)).startswith("14.3% (1 of 7; 95 % interval")


def points(threshold, holdout, labels=None, scores=None):
    held = operating_point(np.zeros(len(holdout)), np.asarray(holdout), threshold)
    test = None if labels is None else operating_point(np.asarray(labels), np.asarray(scores), threshold)
    return held, test


def test_all_ng_all_ok_and_missed_targets_are_named():
    holdout = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    labels, scores = [0, 0, 1, 1], [1.5, 2.5, 8.0, 9.0]
    (warning,) = threshold_warnings(SCORE, 0.0, *points(0.0, holdout, labels, scores))
    assert "Every image is NG" in warning and "11 of 11" in warning
    (warning,) = threshold_warnings(SCORE, 100.0, *points(100.0, holdout, labels, scores))
    assert "Every image is OK" in warning and "catch no defect" in warning
    assert threshold_warnings(SCORE, 7.5, *points(7.5, holdout, labels, scores)) == []
    # Percentile 99 on 7 hold-out images: one image is 14.3 %, a 1 % target cannot be checked.
    warnings = threshold_warnings(PERCENTILE, 99.0, *points(6.9, holdout))
    assert any("one false positive is already 14.3%" in w for w in warnings)
    # Ties: no threshold gets the hold-out under 10 % when all its scores are equal and the target is 10 %.
    tied = [2.0] * 10
    warnings = threshold_warnings(MAX_FPR, 0.1, *points(1.9, tied))
    assert any("gives 10 of 10" in w for w in warnings)


@pytest.mark.parametrize("mode, parameter", [(PERCENTILE, 95.0), (MAX_FPR, 0.05)])
def test_enough_hold_out_images_give_no_warning(mode, parameter):
    holdout = np.linspace(0, 1, 100)
    threshold = thresholds.choose_threshold(mode, parameter, holdout)
    assert threshold_warnings(mode, parameter, *points(threshold, holdout)) == []
