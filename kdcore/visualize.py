"""Heatmap rendering with numpy only (no matplotlib): colour lookup table, overlay, threshold contour."""
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
