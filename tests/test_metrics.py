"""Metrics checked against small cases computed by hand, and against scikit-learn."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from kdcore.metrics import (aupr, aupro, evaluate, f1_all_defective, f1_max, image_auroc, per_defect_auroc,
                            per_defect_localization_auroc, per_defect_pixel_auroc, pixel_auroc)

# Six images with a tie between a defective and a normal one (0.4).
LABELS = [0, 0, 1, 1, 0, 1]
SCORES = [0.1, 0.4, 0.4, 0.8, 0.2, 0.3]


def test_image_auroc_by_hand_with_tie():
    # Pairs (defective, normal), 3 x 3 = 9; a win counts 1, a tie 1/2:
    #   0.4 vs (0.1, 0.4, 0.2): 1 + 0.5 + 1 = 2.5
    #   0.8 vs all:             3
    #   0.3 vs (0.1, 0.4, 0.2): 1 + 0   + 1 = 2
    # AUROC = 7.5 / 9.
    assert image_auroc(LABELS, SCORES) == pytest.approx(7.5 / 9)


def test_image_auroc_accepts_bool_labels():
    assert image_auroc(np.array(LABELS, bool), SCORES) == pytest.approx(7.5 / 9)


@pytest.mark.parametrize("metric", [image_auroc, aupr, f1_max])
def test_image_metrics_need_both_classes(metric):
    with pytest.raises(ValueError, match="both normal and defective"):
        metric([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both normal and defective"):
        metric([0, 0], [0.1, 0.2])


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([0, 1, 1], [0.1, 0.2], "3 labels but 2 scores"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 2], [0.1, 0.2], "0/1"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([], [], "empty"),
    ],
)
def test_image_metrics_reject_bad_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        image_auroc(labels, scores)


def test_f1_max_by_hand():
    # 3 defective. Descending distinct scores, NG = score >= that value:
    #   >= 0.8: TP 1, FP 0 -> F1 = 2*1 / (1 + 3) = 0.5
    #   >= 0.4: TP 2, FP 1 -> 4 / (3 + 3) = 0.667
    #   >= 0.3: TP 3, FP 1 -> 6 / (4 + 3) = 0.857  <- best
    #   >= 0.2: TP 3, FP 2 -> 6 / 8 = 0.75
    #   >= 0.1: TP 3, FP 3 -> 6 / 9 = 0.667
    # Lowest NG score 0.3, next lower 0.2 -> threshold 0.25.
    f1, threshold = f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.25)
    assert f1_score(LABELS, np.array(SCORES) > threshold) == pytest.approx(f1)


def test_f1_max_when_best_is_all_ng():
    # Descending: 0.9 (D): 2/(1+2) = 0.667; 0.5 (N): 2/(2+2) = 0.5;
    # 0.1 (D): 4/(3+2) = 0.8 <- best, and 0.1 is the global minimum,
    # so the threshold sits just below it: 0.1 - 1e-6.
    f1, threshold = f1_max([1, 0, 1], [0.1, 0.5, 0.9])
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.1 - 1e-6)
    assert threshold < 0.1


def test_f1_max_tie_prefers_highest_threshold():
    # labels [1, 0, 0, 1], scores [0.8, 0.6, 0.4, 0.2], 2 defective:
    #   >= 0.8: 2/(1+2) = 2/3;  >= 0.6: 2/(2+2) = 1/2;
    #   >= 0.4: 2/(3+2) = 2/5;  >= 0.2: 4/(4+2) = 2/3.
    # Tie between 0.8 and 0.2 -> the highest: threshold (0.8 + 0.6) / 2 = 0.7.
    assert f1_max([1, 0, 0, 1], [0.8, 0.6, 0.4, 0.2]) == pytest.approx((2 / 3, 0.7))


def test_f1_max_threshold_between_adjacent_floats():
    # No float lies strictly between the two scores: the lower one is returned.
    low = np.nextafter(1.0, 0.0)
    f1, threshold = f1_max([1, 0], [1.0, low])
    assert f1 == 1.0
    assert 1.0 > threshold >= low


def _f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    # sklearn's f1_score is exact but too slow to call hundreds of times.
    true_pos = np.count_nonzero(labels & predicted)
    return 2 * true_pos / (np.count_nonzero(labels) + np.count_nonzero(predicted))


def test_f1_max_threshold_reproduces_f1_on_random_tied_scores():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = rng.random(30) < 0.5
        labels[:2] = (False, True)
        scores = rng.integers(0, 8, 30).astype(float)  # many ties
        f1, threshold = f1_max(labels, scores)
        assert _f1(labels, scores > threshold) == pytest.approx(f1)
        best = max(_f1(labels, scores >= s) for s in np.unique(scores))
        assert f1 == pytest.approx(best)


def test_aupr_matches_sklearn():
    assert aupr(LABELS, SCORES) == pytest.approx(average_precision_score(LABELS, SCORES))


def test_pixel_auroc_by_hand():
    # Pixels (score, defect): (3, D) (2, N) (2, D) (1, N).
    # Pairs: 3 beats both N -> 2; 2 ties the 2 (0.5) and beats 1 -> 1.5. (2 + 1.5) / 4.
    masks = np.array([[[True, False], [True, False]]])
    maps = np.array([[[3.0, 2.0], [2.0, 1.0]]])
    assert pixel_auroc(masks, maps) == pytest.approx(3.5 / 4)


def test_pixel_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    masks = rng.random((4, 9, 7)) < 0.3
    maps = rng.integers(0, 6, masks.shape).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected)


def test_pixel_auroc_needs_both_pixel_classes():
    with pytest.raises(ValueError, match="defect and background"):
        pixel_auroc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2)))


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_pixel_metrics_reject_bad_shapes(metric):
    with pytest.raises(ValueError, match="same shape"):
        metric(np.ones((2, 4, 4), bool), np.ones((2, 4, 5)))
    with pytest.raises(ValueError, match="N×H×W"):
        metric(np.ones((4, 4), bool), np.ones((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        metric(np.eye(3)[None], np.full((1, 3, 3), np.nan))


# Hand-made AU-PRO case: two 2×5 images, 16 background pixels (so FPR steps of 1/16).
# Image A: region R1 = 3 pixels (top-left row), region R2 = 1 pixel (bottom right);
# image B is normal.
PRO_MASKS = np.array(
    [
        [[1, 1, 1, 0, 0],
         [0, 0, 0, 0, 1]],
        [[0, 0, 0, 0, 0],
         [0, 0, 0, 0, 0]],
    ],
    dtype=bool,
)
PRO_MAPS = np.array(
    [
        [[0.8, 0.5, 0.2, 0.7, 0.5],
         [0.0, 0.0, 0.0, 0.0, 0.9]],
        [[0.9, 0.5, 0.2, 0.0, 0.0],
         [0.0, 0.0, 0.0, 0.0, 0.0]],
    ]
)
# Curve, one point per distinct score (descending); PRO = (frac R1 + frac R2) / 2:
#   start               (FPR 0,     PRO 0)
#   0.9: R2 + 1 bg      (1/16,      (0 + 1) / 2   = 1/2)   tie collapsed: no (0, 1/2)
#   0.8: R1 pixel       (1/16,      (1/3 + 1) / 2 = 2/3)
#   0.7: 1 bg           (2/16,      2/3)
#   0.5: R1 pixel, 2 bg (4/16,      (2/3 + 1) / 2 = 5/6)
#   0.2: R1 pixel, 1 bg (5/16,      1)
#   0.0: 11 bg          (1,         1)
# Trapezoids:  [0, 1/16]: 1/16 * (0 + 1/2)/2 = 1/64;   [1/16, 1/16]: 0;
#              [1/16, 1/8]: 1/16 * 2/3 = 1/24;   [1/8, 1/4]: 1/8 * (2/3 + 5/6)/2 = 3/32;
AREA_TO_QUARTER = 1 / 64 + 1 / 24 + 3 / 32


def test_aupro_by_hand_cut_on_a_curve_point():
    assert aupro(PRO_MASKS, PRO_MAPS, fpr_limit=0.25) == pytest.approx(AREA_TO_QUARTER / 0.25)


def test_aupro_by_hand_cut_between_curve_points():
    # 0.3 lies between (1/4, 5/6) and (5/16, 1): fraction (0.3 - 0.25) / (1/16) = 0.8,
    # PRO(0.3) = 5/6 + 0.8 * 1/6 = 29/30; extra trapezoid 0.05 * (5/6 + 29/30) / 2 = 0.045.
    expected = (AREA_TO_QUARTER + 0.045) / 0.3
    assert aupro(PRO_MASKS, PRO_MAPS) == pytest.approx(expected)
    assert aupro(PRO_MASKS[::-1], PRO_MAPS[::-1]) == pytest.approx(expected)


def test_aupro_by_hand_full_curve():
    # Beyond 1/4: [1/4, 5/16]: 1/16 * (5/6 + 1)/2 = 11/192; [5/16, 1]: 11/16 * 1.
    expected = AREA_TO_QUARTER + 11 / 192 + 11 / 16
    assert aupro(PRO_MASKS, PRO_MAPS, fpr_limit=1.0) == pytest.approx(expected)


def test_aupro_regions_are_4_connected():
    # Diagonal neighbours are separate regions: {(0,0)} (size 1) and {(1,1),(1,2)}
    # (size 2). Only (0,0) scores high: curve (0,0) -> (0, 1/2) -> (1, 1), so
    # PRO(0.3) = 0.65 and AU-PRO = 0.3 * (0.5 + 0.65) / 2 / 0.3 = 0.575.
    # (8-connectivity would give one region of 3 pixels and 0.4333.)
    masks = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], dtype=bool)
    maps = np.zeros((1, 3, 3))
    maps[0, 0, 0] = 1.0
    assert aupro(masks, maps) == pytest.approx(0.575)


def test_aupro_regions_never_span_images():
    # Same place, different images: a 1-pixel region in image 0 and a 2-pixel one in
    # image 1 are two regions, so the same hand computation gives 0.575 (one merged
    # 3-pixel region would give 0.4333).
    masks = np.zeros((2, 2, 3), dtype=bool)
    masks[0, 0, 0] = True
    masks[1, 0, :2] = True
    maps = np.zeros((2, 2, 3))
    maps[0, 0, 0] = 1.0
    assert aupro(masks, maps) == pytest.approx(0.575)


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """AU-PRO straight from its definition, one threshold at a time."""
    regions = []
    for image_mask, image_map in zip(masks, maps):
        labelled, n = ndimage.label(image_mask)
        regions += [(image_map, labelled == r) for r in range(1, n + 1)]
    background = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = np.mean(background >= t)
        pro = np.mean([np.mean(image_map[region] >= t) for image_map, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 0.5, 1.0])
def test_aupro_matches_definition_on_random_tied_maps(fpr_limit):
    rng = np.random.default_rng(2)
    for _ in range(5):
        masks = rng.random((3, 6, 6)) < 0.3
        masks[0] = False  # a normal image
        maps = rng.integers(0, 6, masks.shape) + masks * rng.integers(0, 3, masks.shape)
        expected = _reference_aupro(masks, maps, fpr_limit)
        assert aupro(masks, maps, fpr_limit) == pytest.approx(expected)


def test_aupro_errors():
    with pytest.raises(ValueError, match="defect region"):
        aupro(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="background"):
        aupro(np.ones((1, 3, 3), bool), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(PRO_MASKS, PRO_MAPS, fpr_limit=0.0)


def _blob_masks() -> np.ndarray:
    masks = np.zeros((8, 32, 32), dtype=bool)
    masks[:4, 4:12, 4:12] = True
    masks[2:6, 20:24, 10:30] = True
    masks[7, 30:, 30:] = True
    return masks


def test_perfect_map_scores_one():
    masks = _blob_masks()
    maps = masks.astype(np.float32)
    assert aupro(masks, maps) == pytest.approx(1.0)
    assert pixel_auroc(masks, maps) == pytest.approx(1.0)


def test_random_map_aupro_is_near_chance():
    # A map independent of the masks puts, at any threshold, the same expected
    # fraction of every region above it as of the background: PRO ~ FPR. The area
    # under PRO = FPR up to L, divided by L, is L / 2 = 0.15 for L = 0.3.
    masks = _blob_masks()
    maps = np.random.default_rng(0).random(masks.shape).astype(np.float32)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.03)
    assert pixel_auroc(masks, maps) == pytest.approx(0.5, abs=0.03)


def test_evaluate_keys_and_values():
    labels = [0, 1]
    masks = PRO_MASKS[::-1]  # image 0 normal, image 1 defective
    maps = PRO_MAPS[::-1]
    result = evaluate(labels, [0.2, 0.9], masks, maps)
    assert set(result) == {
        "image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_all_defective", "aupr", "n_images", "n_defective"
    }
    assert result["image_auroc"] == 1.0
    assert result["f1_max"] == 1.0
    assert result["aupr"] == 1.0
    assert result["aupro"] == pytest.approx(aupro(PRO_MASKS, PRO_MAPS))
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(PRO_MASKS, PRO_MAPS))
    assert (result["n_images"], result["n_defective"]) == (2, 1)
    assert all(type(v) in (float, int) for v in result.values())


def test_evaluate_without_pixel_metrics():
    assert evaluate(LABELS, SCORES)["pixel_auroc"] is None
    # Image-level-only sets pass their maps without masks: no pixel metrics.
    result = evaluate(LABELS, SCORES, None, np.zeros((6, 2, 2)))
    assert result["pixel_auroc"] is None and result["aupro"] is None
    empty = np.zeros((6, 2, 2), dtype=bool)
    result = evaluate(LABELS, SCORES, empty, np.zeros((6, 2, 2)))
    assert result["pixel_auroc"] is None and result["aupro"] is None
    assert result["image_auroc"] == pytest.approx(7.5 / 9)


def test_evaluate_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="need maps"):
        evaluate(LABELS, SCORES, masks=np.zeros((6, 2, 2), bool))
    with pytest.raises(ValueError, match="hold 2 images but labels 6"):
        evaluate(LABELS, SCORES, PRO_MASKS, PRO_MAPS)


def test_f1_of_calling_everything_defective():
    # 3 of 6 defective: precision 1/2, recall 1, F1 = 2/3; the same as F1-max's worst case on these labels.
    assert f1_all_defective(LABELS) == pytest.approx(2 / 3)
    assert f1_all_defective([0, 0, 0, 1]) == pytest.approx(2 * 1 / (4 + 1))
    assert evaluate(LABELS, SCORES)["f1_all_defective"] == pytest.approx(2 / 3)


def test_per_defect_auroc_compares_each_type_with_the_good_images_only():
    defects = ["good", "good", "dent", "scratch", "good", "dent"]
    scores = [0.1, 0.4, 0.5, 0.05, 0.2, 0.3]
    result = per_defect_auroc(defects, scores)
    assert list(result) == ["dent", "scratch"]
    # dent: 0.5 beats all three good scores, 0.3 beats 0.1 and 0.2 -> 5 of 6 pairs; scratch beats none.
    assert result["dent"] == pytest.approx(5 / 6) and result["scratch"] == 0.0
    labels = [d != "good" for d in defects]
    assert evaluate(labels, scores, defects=defects)["per_defect"] == result
    assert "per_defect" not in evaluate(labels, scores)
    with pytest.raises(ValueError, match="needs 'good' images"):
        per_defect_auroc(["dent", "dent"], [0.1, 0.2])


def test_per_defect_pixel_auroc_pools_each_type_with_the_good_images_only():
    rng = np.random.default_rng(3)
    defects = np.array(["good", "dent", "good", "stain", "dent", "empty"])
    masks = np.zeros((6, 8, 8), bool)
    masks[[1, 3, 4], 2:5, 2:5] = True
    maps = rng.random(masks.shape)
    maps[1][masks[1]] += 1.0  # dent separates, stain does not
    result = per_defect_pixel_auroc(defects, masks, maps)
    assert list(result) == ["dent", "stain"]  # "empty" has no defect pixel to rank
    for defect in result:
        chosen = (defects == "good") | (defects == defect)
        assert result[defect] == pytest.approx(roc_auc_score(masks[chosen].ravel(), maps[chosen].ravel()))
    assert result["dent"] > result["stain"]
    labels = defects != "good"
    assert evaluate(labels, maps.max((1, 2)), masks, maps, defects)["per_defect_pixel"] == result
    assert "per_defect_pixel" not in evaluate(labels, maps.max((1, 2)), defects=defects)


def test_localization_auroc_needs_the_map_to_rise_where_the_defect_is():
    """A map raised over the whole defective image separates it from good images, not its defect from the rest."""
    rng = np.random.default_rng(4)
    defects = np.array(["good", "good", "dent", "dent", "stain", "stain", "full"])
    masks = np.zeros((7, 8, 8), bool)
    masks[2:6, 2:5, 2:5] = True
    masks[6] = True  # no pixel outside the defect to rank against
    maps = rng.random(masks.shape)
    maps[2:4] += 1.0  # dent: raised everywhere
    maps[4:6][masks[4:6]] += 1.0  # stain: raised inside its masks only
    result = per_defect_localization_auroc(defects, masks, maps)
    assert list(result) == ["dent", "stain"]
    assert result["stain"] == 1.0
    assert abs(result["dent"] - 0.5) < 0.2
    # Pooled with the good images' pixels, the raised-everywhere map still scores well.
    assert per_defect_pixel_auroc(defects, masks, maps)["dent"] > result["dent"] + 0.15
    for defect in result:
        chosen = defects == defect
        assert result[defect] == pytest.approx(roc_auc_score(masks[chosen].ravel(), maps[chosen].ravel()))
    labels = defects != "good"
    assert evaluate(labels, maps.max((1, 2)), masks, maps, defects)["per_defect_localization"] == result
