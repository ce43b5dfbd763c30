"""Heatmap rendering with numpy only (no matplotlib, no torch): score normalisation, colour lookup table,
overlay, threshold contour. An export bundle carries this file, so keep its imports to numpy."""
from __future__ import annotations

import numpy as np

# Anchor colours of a perceptually ordered dark-blue → cyan → yellow → red scale (close to matplotlib's
# "turbo"), interpolated to 256 entries once.
_ANCHORS = np.array([
    [48, 18, 59], [70, 107, 227], [40, 187, 236], [50, 241, 152],
    [164, 252, 60], [237, 208, 58], [251, 128, 34], [208, 47, 5], [122, 4, 3],
], dtype=np.float32)
LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                for c in range(3)], axis=1).round().astype(np.uint8)


def colorize(normalized_map: np.ndarray) -> np.ndarray:
    """A map with values in [0, 1] (clipped) → uint8 RGB H×W×3."""
    index = np.clip(np.nan_to_num(normalized_map) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return LUT[index]


def contour(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner boundary of a boolean mask (pixels of the mask with a 4-neighbour outside it)."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def overlay(image: np.ndarray, normalized_map: np.ndarray, alpha: float = 0.45,
            outline: np.ndarray | None = None, outline_color=(255, 255, 255)) -> np.ndarray:
    """Blend the coloured map over an RGB uint8 image; optionally draw the contour of ``outline`` on top."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(normalized_map).astype(np.float32)
    result = blended.round().astype(np.uint8)
    if outline is not None:
        result[contour(outline)] = outline_color
    return result


def normalize(scores_or_map, threshold: float, min_score: float, max_score: float):
    """Map scores into [0, 1] with ``threshold`` at 0.5 (anomalib's min-max scheme):
    ``clip((s - threshold) / (max_score - min_score) + 0.5, 0, 1)``.

    Returns a numpy array of the input's shape (a numpy scalar for a scalar input),
    keeping a floating input dtype (float32 maps stay float32). If
    ``max_score == min_score`` the result is a step: 1 above the threshold, 0 below,
    0.5 at it. Normalised values > 0.5 match ``s > threshold`` except for scores
    closer to the threshold than the output's float precision.
    """
    if max_score < min_score:
        raise ValueError(f"max_score {max_score} is below min_score {min_score}")
    values = np.asarray(scores_or_map)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    span = max_score - min_score
    if span == 0:
        normalized = (np.sign(values - threshold) + 1) / 2
    else:
        normalized = np.clip((values - threshold) / span + 0.5, 0.0, 1.0)
    return normalized.astype(values.dtype, copy=False)[()]
