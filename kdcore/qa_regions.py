"""Defect regions that QA marks on an image: kept per image content, used as the mask of a missed defect.

A region is a binary mask at the image's own resolution, stored as a PNG under the store's ``qa_regions/``
folder, named by the image's sha256 (like QA labels and comments, it belongs to the image, not to a model).
The review pages mark it by selecting cells of a grid laid over the picture; ``region_from_cells`` turns the
selected cells' centres into the mask.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from kdcore.store import Store


def region_file(store: Store, sha256: str) -> Path:
    return store.root / "qa_regions" / f"{sha256}.png"


def region_from_cells(centres: list[tuple[float, float]], cell: float, width: int, height: int) -> np.ndarray:
    """Boolean height×width mask covering the ``cell``-sized squares centred on ``centres`` ((x, y) in pixels of
    this resolution); squares are clipped to the picture."""
    mask = np.zeros((height, width), dtype=bool)
    half = cell / 2
    for x, y in centres:
        left, right = max(0, int(np.floor(x - half))), min(width, int(np.ceil(x + half)))
        top, bottom = max(0, int(np.floor(y - half))), min(height, int(np.ceil(y + half)))
        mask[top:bottom, left:right] = True
    return mask


def save_region(store: Store, sha256: str, mask: np.ndarray) -> Path:
    """Keep ``mask`` as the image's QA region (replacing any); an empty mask removes it instead."""
    path = region_file(store, sha256)
    if not mask.any():
        path.unlink(missing_ok=True)
        return path
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(np.uint8(mask) * 255).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def load_region(store: Store, sha256: str) -> np.ndarray | None:
    """The image's QA region as a boolean mask at the image's resolution, or None when QA marked none."""
    path = region_file(store, sha256)
    if not path.exists():
        return None
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > 127
