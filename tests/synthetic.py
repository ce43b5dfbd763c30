"""Small synthetic inspection images: a woven texture, and defects (scratches, spots, patches) with masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kdcore.ops import GaussianBlur
from kdcore.synthetic_anomalies import RELIGHT_EDGE_SIGMA

DEFECT_TYPES = ("scratch", "spot")


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A regular woven pattern with a random phase and mild noise, as float in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    period = size / 8
    weave = 0.5 + 0.25 * np.sin(2 * np.pi * x / period + phase[0]) * np.sin(2 * np.pi * y / period + phase[1])
    return np.clip(weave + rng.normal(0, 0.03, size=(size, size)), 0, 1)


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` with one defect of ``kind`` and its boolean mask."""
    size = image.shape[0]
    mask = np.zeros_like(image, dtype=bool)
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        distance = np.abs((x - cx) * np.sin(angle) - (y - cy) * np.cos(angle))
        along = np.abs((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle))
        mask = (distance < size / 40 + 1) & (along < size / 4)
        value = 0.0
    else:
        radius = rng.uniform(size / 14, size / 9)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < radius ** 2
        value = 1.0
    defective = image.copy()
    defective[mask] = value
    return defective, mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(array * 255).astype(np.uint8)).save(path)


def make_dataset(root: Path, n_train: int = 40, n_test_good: int = 8, n_test_defect: int = 8,
                 size: int = 64, seed: int = 0) -> Path:
    """Write an MVTec-layout set under ``root``: grayscale PNGs, masks as ``<stem>_mask.png``."""
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _save(texture(rng, size), root / "train" / "good" / f"train_{i:03d}.png")
    for i in range(n_test_good):
        _save(texture(rng, size), root / "test" / "good" / f"good_{i:03d}.png")
    for kind in DEFECT_TYPES:
        for i in range(n_test_defect):
            image, mask = add_defect(texture(rng, size), kind, rng)
            _save(image, root / "test" / kind / f"{kind}_{i:03d}.png")
            _save(mask.astype(np.float32), root / "ground_truth" / kind / f"{kind}_{i:03d}_mask.png")
    return root


def within_relight_reach(masks: torch.Tensor) -> torch.Tensor:
    """Where a synthetic defect drawn in the N×1×H×W ``masks`` may change pixels: the masks, plus the reach of a
    relit region's feathered edge (``kdcore.synthetic_anomalies.relight``)."""
    reach = GaussianBlur(RELIGHT_EDGE_SIGMA).radius
    return F.max_pool2d(masks.float(), kernel_size=2 * reach + 1, stride=1, padding=reach) > 0
