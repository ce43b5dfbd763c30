"""Scoring images from disk with a fitted method, and evaluating it on a dataset's labelled test split."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kdcore import data, metrics
from kdcore.methods.base import AnomalyMethod

# Images are read and scored this many at a time, so memory stays bounded on large folders.
READ_CHUNK = 64
# What ``evaluate_model`` returns (``per_defect`` besides, when the set has defect types).
EVALUATION_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_all_defective", "aupr", "n_images",
                   "n_defective")


def predict_paths(method: AnomalyMethod, paths: Sequence[str | Path], batch_size: int = 32,
                  on_chunk: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maps N×S×S and scores N for image files; ``on_chunk(n_done)`` reports progress."""
    maps, scores = [], []
    for start in range(0, len(paths), READ_CHUNK):
        chunk_maps, chunk_scores = method.predict(method.preprocess_paths(paths[start:start + READ_CHUNK]), batch_size)
        maps.append(chunk_maps)
        scores.append(chunk_scores)
        if on_chunk is not None:
            on_chunk(min(start + READ_CHUNK, len(paths)))
    size = method.config.size
    if not maps:
        return np.empty((0, size, size), np.float32), np.empty(0, np.float32)
    return np.concatenate(maps), np.concatenate(scores)


def test_masks(dataset: data.AnomalyDataset, size: int) -> np.ndarray | None:
    """Ground-truth masks of the test split at ``size`` (all-false for good images); None if image-level only."""
    if not dataset.has_masks:
        return None
    masks = np.zeros((len(dataset.test), size, size), dtype=bool)
    for i, sample in enumerate(dataset.test):
        if sample.mask_path is not None:
            masks[i] = data.read_mask(sample.mask_path, size)
    return masks


def evaluate_model(method: AnomalyMethod, dataset: data.AnomalyDataset,
                   on_chunk: Callable[[int], None] | None = None) -> dict:
    """The one evaluator's metrics (see ``kdcore.metrics.evaluate``) on the dataset's test split."""
    if not dataset.test:
        raise data.DataError(f"{dataset.root} has no test images to evaluate on (expected test/good and test/<defect>)")
    labels = np.array([sample.label for sample in dataset.test])
    maps, scores = predict_paths(method, [sample.path for sample in dataset.test], on_chunk=on_chunk)
    return metrics.evaluate(labels, scores, test_masks(dataset, method.config.size), maps,
                            defects=[sample.defect for sample in dataset.test])
