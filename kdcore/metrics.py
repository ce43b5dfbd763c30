"""The one evaluator shared by every method: image- and pixel-level anomaly metrics.

Conventions used throughout:

* Image labels are 0 (normal) / 1 (defective); booleans are accepted too.
* Scores and anomaly maps: higher means more anomalous. They must be finite.
* Verdict: an image is NG (defective) iff ``score > threshold``.
* Ground-truth masks are N×H×W, True (or 1) on defect pixels; maps have exactly the
  same shape (resize them before calling). An image may be labelled defective while
  its mask is empty; pixel metrics then see only its background.
* Every function returns plain Python numbers.

Pixel metrics pool all pixels of all images and are exact: no threshold grid, ties
between equal scores handled as one threshold. Maps are evaluated as float32, which
is what models produce and halves memory at MVTec scale (~40 million pixels).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_all_defective", "aupr", "per_defect_auroc",
           "evaluate"]

# Region labelling connects pixels sharing an edge (4-connectivity, scipy's default),
# and never across images: the middle slice of a 3-D structure with empty outer slices.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = ndimage.generate_binary_structure(2, 1)


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of per-image scores against 0/1 labels.

    Tied scores count as half a correct ranking. Raises ValueError unless both
    classes are present.
    """
    labels, scores = _labels_and_scores(labels, scores)
    _require_both_classes(labels, "image AUROC")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve over all pixels of all images pooled together.

    ``masks``: N×H×W bool (or 0/1), ``maps``: N×H×W scores. Exact and equal to
    scikit-learn's ``roc_auc_score`` on the flattened pixels (tied scores count as
    half a correct ranking), at a fraction of its memory. Raises ValueError unless
    there are both defect and background pixels.
    """
    masks, maps = _masks_and_maps(masks, maps)
    n_defect = int(np.count_nonzero(masks))
    n_background = masks.size - n_defect
    if n_defect == 0 or n_background == 0:
        raise ValueError(
            f"pixel AUROC needs both defect and background pixels; "
            f"got {n_defect} defect and {n_background} background"
        )
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    # The ROC area is the Mann-Whitney statistic: the fraction of (defect, background)
    # pairs where the defect pixel scores higher, ties counting 1/2. Counting them by
    # binary search in the sorted background scores needs no per-pixel index arrays.
    background = np.sort(flat_maps[~flat_masks])
    defect = flat_maps[flat_masks]
    below = int(np.searchsorted(background, defect, side="left").sum())
    not_above = int(np.searchsorted(background, defect, side="right").sum())
    return (below + not_above) / (2 * n_defect * n_background)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    Exact, dataset-level (the MVTec AD definition, as in anomalib):

    * Defect regions are the connected components of the masks, 4-connectivity
      (pixels sharing an edge; diagonal neighbours are separate regions), labelled
      per image so that no region spans two images.
    * For each threshold t (every distinct score, descending), a pixel is positive
      iff its score >= t. FPR = positive background pixels / all background pixels
      (normal images included); PRO = mean over regions of the fraction of the
      region that is positive. Every region weighs the same whatever its size.
    * The curve starts at (0, 0), is cut at ``fpr_limit`` by linear interpolation,
      integrated with the trapezoid rule and divided by ``fpr_limit``, so 1.0 is
      perfect and a map unrelated to the masks scores about ``fpr_limit / 2``.

    Raises ValueError if no mask has a defect pixel, if there is no background
    pixel, or if ``fpr_limit`` is outside (0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = _masks_and_maps(masks, maps)
    regions, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    if n_regions == 0:
        raise ValueError("AU-PRO needs at least one defect region; every mask is empty")
    n_background = masks.size - int(np.count_nonzero(masks))
    if n_background == 0:
        raise ValueError("AU-PRO needs background pixels; every mask pixel is a defect")

    flat_regions, flat_maps = regions.ravel(), maps.ravel()
    # Each pixel of region r carries 1/|r|, background 0, so the cumulative sum over
    # the positive pixels is the sum of per-region overlap fractions.
    inverse_size = np.zeros(n_regions + 1)
    inverse_size[1:] = 1.0 / np.bincount(flat_regions)[1:]
    # Pixels below the cut score only shape the curve beyond fpr_limit: dropping them
    # before sorting saves most of the time and memory for the usual limit of 0.3.
    kept = flat_maps >= _cut_score(flat_maps[flat_regions == 0], fpr_limit)
    _, run_ends, sorted_regions = _sort_descending(flat_maps[kept], flat_regions[kept])
    weights = inverse_size[sorted_regions]
    pro = np.cumsum(weights, out=weights)[run_ends]
    pro /= n_regions
    del weights  # the largest temporary: free it before the FPR cumulative sum
    fpr = np.cumsum(sorted_regions == 0, dtype=np.float64)[run_ends]
    fpr /= n_background
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def f1_max(labels, scores) -> tuple[float, float]:
    """Best image-level F1 over all thresholds, and a threshold achieving it.

    The threshold follows the verdict convention (NG iff ``score > threshold``):
    with k the lowest score judged NG at the optimum, it is the midpoint between k
    and the next lower distinct score, so ``scores > threshold`` reproduces the F1
    exactly. If k is the lowest score of all, it is ``k - 1e-6 * max(1, |k|)``.
    When several thresholds tie for the best F1, the highest one (fewest NG
    verdicts) is returned. Raises ValueError unless both classes are present.
    """
    labels, scores = _labels_and_scores(labels, scores)
    _require_both_classes(labels, "F1-max")
    sorted_scores, run_ends, sorted_labels = _sort_descending(scores, labels)
    true_pos = np.cumsum(sorted_labels, dtype=np.int64)[run_ends]
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted positives + actual positives).
    f1 = 2.0 * true_pos / (run_ends + 1 + np.count_nonzero(labels))
    best = int(np.argmax(f1))
    lowest_ng = sorted_scores[run_ends[best]]
    if best + 1 == run_ends.size:
        threshold = lowest_ng - 1e-6 * max(1.0, abs(lowest_ng))
    else:
        next_lower = sorted_scores[run_ends[best + 1]]
        threshold = next_lower + (lowest_ng - next_lower) / 2
        # Adjacent floats have no midpoint; the lower score itself still separates them.
        if not threshold < lowest_ng:
            threshold = next_lower
    return float(f1[best]), float(threshold)


def f1_all_defective(labels) -> float:
    """F1 of calling every image defective: the baseline any F1 must be read against.

    Precision is the share of defective images, recall 1, so F1 = 2·n_defective / (n_images + n_defective).
    """
    labels = _as_binary(labels, "labels")
    n_defective = int(np.count_nonzero(labels))
    return 2.0 * n_defective / (labels.size + n_defective) if labels.size else 0.0


def per_defect_auroc(defects, scores, normal: str = "good") -> dict[str, float]:
    """Image AUROC of each defect type's images against the normal images (``defects`` names each image's type).

    Types are sorted by name. Raises ValueError when there is no normal image or no defective one.
    """
    defects = np.asarray(defects, dtype=object)
    scores = np.asarray(scores, dtype=np.float64)
    if defects.shape != scores.shape or defects.ndim != 1:
        raise ValueError(f"defects and scores must be 1-D of one length, got {defects.shape} and {scores.shape}")
    is_normal = defects == normal
    if not is_normal.any() or is_normal.all():
        raise ValueError(f"per-defect AUROC needs '{normal}' images and defective ones")
    normal_scores = scores[is_normal]
    result = {}
    for defect in sorted(set(defects[~is_normal])):
        chosen = scores[defects == defect]
        labels = np.r_[np.zeros(normal_scores.size, bool), np.ones(chosen.size, bool)]
        result[str(defect)] = image_auroc(labels, np.r_[normal_scores, chosen])
    return result


def per_defect_pixel_auroc(defects, masks, maps, normal: str = "good") -> dict[str, float]:
    """Pixel AUROC of each defect type: its images' pixels together with all normal images' pixels.

    A pooled pixel AUROC is decided by the types with the largest defect areas; this shows each type on its
    own. Types whose masks hold no defect pixel are left out.
    """
    defects, masks, maps = _defects_masks_and_maps(defects, masks, maps)
    is_normal = defects == normal
    result = {}
    for defect in sorted(set(defects[~is_normal])):
        chosen = is_normal | (defects == defect)
        if masks[chosen].any():
            result[str(defect)] = pixel_auroc(masks[chosen], maps[chosen])
    return result


def per_defect_localization_auroc(defects, masks, maps, normal: str = "good") -> dict[str, float]:
    """Per defect type, the pixel AUROC of its images' defect pixels against the *same images'* other pixels.

    ``per_defect_pixel_auroc`` rewards a map that rises anywhere in a defective image; this one only a map that
    rises where the defect is (0.5: no localisation at all). Types without both kinds of pixel are left out.
    """
    defects, masks, maps = _defects_masks_and_maps(defects, masks, maps)
    result = {}
    for defect in sorted(set(defects[defects != normal])):
        chosen = defects == defect
        if masks[chosen].any() and not masks[chosen].all():
            result[str(defect)] = pixel_auroc(masks[chosen], maps[chosen])
    return result


def aupr(labels, scores) -> float:
    """Area under the precision-recall curve of per-image scores (average precision,
    defective = positive class). Raises ValueError unless both classes are present."""
    labels, scores = _labels_and_scores(labels, scores)
    _require_both_classes(labels, "AUPR")
    return float(average_precision_score(labels, scores))


def evaluate(labels, scores, masks=None, maps=None, defects=None) -> dict:
    """All metrics of one method on one test set, as a JSON-ready dict.

    Keys: ``image_auroc``, ``pixel_auroc``, ``aupro``, ``f1_max``, ``f1_all_defective``
    (the F1 of calling everything defective, F1-max's baseline), ``aupr``,
    ``n_images``, ``n_defective`` and, when ``defects`` names each image's type
    ("good" for normal ones), ``per_defect`` (type -> image AUROC against the good
    images) and, with masks, ``per_defect_pixel`` (type -> pixel AUROC, see
    :func:`per_defect_pixel_auroc`) and ``per_defect_localization`` (type -> AUROC of its defect pixels against
    its images' other pixels, see :func:`per_defect_localization_auroc`). ``f1_max`` and ``aupr`` are
    image-level (get the F1 threshold from :func:`f1_max`). The pixel keys are None when ``masks`` is
    None (``maps`` is then ignored, so image-level-only sets can pass their maps
    anyway) or no mask has a defect pixel. Masks and maps hold one N×H×W slice per
    image, in the order of ``labels``. Raises ValueError unless both image classes
    are present, or if masks come without maps.
    """
    labels, scores = _labels_and_scores(labels, scores)
    if masks is not None and maps is None:
        raise ValueError("pixel metrics need maps along with the masks")
    pixel_auroc_value = aupro_value = per_defect_pixel = per_defect_localization = None
    if masks is not None:
        masks, maps = _masks_and_maps(masks, maps)
        if masks.shape[0] != labels.size:
            raise ValueError(
                f"masks hold {masks.shape[0]} images but labels {labels.size}"
            )
        if masks.any():
            pixel_auroc_value = pixel_auroc(masks, maps)
            aupro_value = aupro(masks, maps)
            if defects is not None:
                per_defect_pixel = per_defect_pixel_auroc(defects, masks, maps)
                per_defect_localization = per_defect_localization_auroc(defects, masks, maps)
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc_value,
        "aupro": aupro_value,
        "f1_max": f1_max(labels, scores)[0],
        "f1_all_defective": f1_all_defective(labels),
        "aupr": aupr(labels, scores),
        "n_images": int(labels.size),
        "n_defective": int(np.count_nonzero(labels)),
        **({"per_defect": per_defect_auroc(defects, scores)} if defects is not None else {}),
        **({"per_defect_pixel": per_defect_pixel} if per_defect_pixel is not None else {}),
        **({"per_defect_localization": per_defect_localization} if per_defect_localization is not None else {}),
    }


def _cut_score(background_scores: np.ndarray, fpr_limit: float) -> float:
    """Highest score s such that the background pixels scoring >= s are more than
    ``fpr_limit`` of all (or all of them).

    Every threshold whose FPR is at most ``fpr_limit``, and the first one beyond it
    (needed to interpolate the cut), is therefore >= s.
    """
    n = background_scores.size
    n_needed = min(n, int(np.ceil(fpr_limit * n)) + 1)
    # Selection is O(n); sorting all background scores would be O(n log n).
    return float(np.partition(background_scores, n - n_needed)[n - n_needed])


def _sort_descending(
    scores: np.ndarray, carried: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``scores`` sorted descending, the last index of each run of equal scores in
    that order, and ``carried`` (same length) reordered alongside.

    Cumulative sums over the sorted arrays sampled at the run ends give one curve
    point per distinct threshold: no threshold can split equal scores, so the order
    within a run must not matter.
    """
    # Reversing a view avoids negating (and copying) tens of millions of pixels.
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    is_run_end = np.empty(scores.size, dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=is_run_end[:-1])
    is_run_end[-1] = True
    return sorted_scores, np.flatnonzero(is_run_end), carried[order]


def _area_up_to(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoid area under the polyline from (0, 0) through the points (x, y), up
    to ``x_limit`` > 0.

    ``x`` is non-decreasing and reaches ``x_limit``; the segment crossing
    ``x_limit`` is cut there by linear interpolation.
    """
    cut = int(np.searchsorted(x, x_limit, side="left"))
    x_before, y_before = (x[cut - 1], y[cut - 1]) if cut else (0.0, 0.0)
    if x[cut] == x_limit:
        y_limit = y[cut]
    else:
        fraction = (x_limit - x_before) / (x[cut] - x_before)
        y_limit = y_before + fraction * (y[cut] - y_before)
    xs = np.concatenate(([0.0], x[:cut], [x_limit]))
    ys = np.concatenate(([0.0], y[:cut], [y_limit]))
    return float(np.trapezoid(ys, xs))


def _labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D bool labels and float64 scores of equal, non-zero length."""
    labels = _as_binary(labels, "labels")
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}"
        )
    if labels.size != scores.size:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if labels.size == 0:
        raise ValueError("no images: labels and scores are empty")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return labels, scores


def _defects_masks_and_maps(defects, masks, maps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    defects = np.asarray(defects, dtype=object)
    masks, maps = _masks_and_maps(masks, maps)
    if defects.shape != (masks.shape[0],):
        raise ValueError(f"defects name {defects.size} images but masks hold {masks.shape[0]}")
    return defects, masks, maps


def _masks_and_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Validated N×H×W bool masks and float32 maps of the same shape."""
    masks = _as_binary(masks, "masks")
    maps = np.asarray(maps, dtype=np.float32)
    if masks.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(
            f"masks and maps must both be N×H×W of the same shape, got {masks.shape} "
            f"and {maps.shape} (squeeze channel axes, resize maps to the masks)"
        )
    if masks.size == 0:
        raise ValueError("no pixels: masks and maps are empty")
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinity")
    return masks, maps


def _as_binary(values, name: str) -> np.ndarray:
    """``values`` as a bool array; only bools or 0/1 numbers are accepted."""
    values = np.asarray(values)
    if values.dtype == bool:
        return values
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must be bool or 0/1")
    return values == 1


def _require_both_classes(labels: np.ndarray, metric: str) -> None:
    """Raise ValueError naming ``metric`` unless both image classes are present."""
    n_defective = int(np.count_nonzero(labels))
    if n_defective == 0 or n_defective == labels.size:
        raise ValueError(
            f"{metric} needs both normal and defective images; got {n_defective} "
            f"defective out of {labels.size}"
        )
