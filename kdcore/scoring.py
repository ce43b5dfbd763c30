"""Scoring images with stored models, each (model, image) pair once.

Inference is the only expensive step of review, so the exact image score is a row in the store and the anomaly
map a float32 file next to it (``Store.map_file``). Everything a threshold decides (verdict, colours, contour)
is recomputed from those cached numbers, which is why moving a threshold never runs a model.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from kdcore.image_refs import ImageRef, dataset_images, write_atomically
from kdcore.store import Model, Store

if TYPE_CHECKING:
    from kdcore.methods.base import AnomalyMethod

SCORE_CHUNK = 64  # images read and scored per batch; scores are stored after each, so progress is durable

MethodLoader = Callable[[Model], "AnomalyMethod"]
Progress = Callable[[int, int], None]  # (images scored so far, images to score): before each batch and at the end

# Sessions share the cached models: one inference (or threshold write) at a time per process keeps memory
# bounded and the models' (non-thread-safe) modules out of concurrent use.
INFERENCE_LOCK = threading.Lock()


def score_images(store: Store, model: Model, images: Sequence[ImageRef], load_method: MethodLoader,
                 on_progress: Progress | None = None) -> np.ndarray:
    """The scores of ``images`` (in their order) by ``model``; runs the model only on images it never scored.

    ``load_method(model)`` is called only when something must be scored (the app passes a cached loader).
    """
    scores = store.cached_scores(model.id, [image.sha256 for image in images])
    todo = list({image.sha256: image for image in images if image.sha256 not in scores}.values())
    if todo:
        _run_model(store, model, load_method(model), todo, scores, on_progress)
    return np.array([scores[image.sha256] for image in images], dtype=np.float64)


def _run_model(store: Store, model: Model, method: "AnomalyMethod", todo: list[ImageRef], scores: dict,
               on_progress: Progress | None) -> None:
    from kdcore.evaluation import predict_paths  # torch is imported only when a model really runs

    for start in range(0, len(todo), SCORE_CHUNK):
        if on_progress is not None:
            on_progress(start, len(todo))
        chunk = todo[start:start + SCORE_CHUNK]
        with INFERENCE_LOCK:
            maps, chunk_scores = predict_paths(method, [image.path for image in chunk])
        for image, anomaly_map in zip(chunk, maps):
            # float32, the score's own precision: the map's maximum is the score, so the region drawn above a
            # threshold agrees with the verdict (float16 rounding drew no outline on an NG 2.154 vs 2.153).
            write_atomically(store.map_file(model.id, image.sha256),
                              lambda fh, m=anomaly_map.astype(np.float32): np.save(fh, m))
        new = {image.sha256: float(score) for image, score in zip(chunk, chunk_scores)}
        store.add_scores(model.id, new)  # after the maps: a stored score always has its map
        scores.update(new)
    if on_progress is not None:
        on_progress(len(todo), len(todo))


def load_map(store: Store, model: Model, image: ImageRef) -> np.ndarray:
    """The cached raw anomaly map (float32, model resolution) of an image ``score_images`` has scored."""
    return np.load(store.map_file(model.id, image.sha256)).astype(np.float32)


def save_threshold(store: Store, model: Model, method: "AnomalyMethod", value: float, mode: str,
                   parameter: float | None, by: str | None = None) -> dict:
    """Make ``value`` the model's threshold: in its file (for the CLI) and in the store (for the app).

    ``method`` is the loaded model (the app's cached instance, whose threshold is updated with the file).
    The file is replaced atomically by ``save``; it is written first, so a crash in between leaves the
    store's older value, never a store value the file lacks.
    """
    with INFERENCE_LOCK:
        method.set_threshold(value, mode=mode, parameter=parameter, by=by)
        method.save(store.model_file(model))
        threshold = dict(method.threshold)
    store.set_model_threshold(model.id, threshold)
    return threshold


@dataclass(frozen=True)
class LabelledSet:
    """What the Thresholds page judges a model on: its dataset's labelled test images and its hold-out.

    The hold-out scores come with the model (computed at training on normal images it never trained on); the
    images behind them are not recorded, so they count in statistics but cannot be shown.
    """

    images: list[ImageRef]
    labels: np.ndarray
    scores: np.ndarray
    holdout: np.ndarray

    @property
    def n_defective(self) -> int:
        return int(self.labels.sum())

    @property
    def n_good(self) -> int:
        return len(self.labels) - self.n_defective


def labelled_set(store: Store, model: Model, load_method: MethodLoader,
                 on_progress: Progress | None = None) -> LabelledSet:
    images = dataset_images(store, model.dataset_id) if model.dataset_id is not None else []
    return LabelledSet(images, np.array([image.label for image in images], dtype=int),
                       score_images(store, model, images, load_method, on_progress),
                       np.asarray(model.calibration["scores"], dtype=np.float64))
