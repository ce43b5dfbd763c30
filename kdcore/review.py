"""Reviewing models on images: cached scoring, thresholds, verdicts, QA marks and CSV export.

The Compare, Thresholds and Inspect pages are thin layers over this module (it imports neither streamlit nor,
until a model must actually run, torch).

Inference is the only expensive step, so every (model, image) pair is scored once: the exact image score is a
row in the store and the anomaly map a float32 file next to it (``Store.map_file``). Images are identified by
the sha256 of their bytes, so the same photo seen in a dataset, a server folder and an upload is scored once
per model. Everything a threshold decides (verdict, colours, contour) is recomputed from those cached numbers,
which is why moving a threshold never runs a model.

Threshold convention (as everywhere in kdcore): an image is NG iff ``score > threshold``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from kdcore import data, ingest, qa_regions
from kdcore.store import GOOD, Inspection, Model, Store
from kdcore.verdicts import NG, verdict

if TYPE_CHECKING:
    from kdcore.methods.base import AnomalyMethod

QA_MARKS = ("correct", "wrong")
NORMAL, DEFECTIVE = 0, 1
SCORE_CHUNK = 64  # images read and scored per batch; scores are stored after each, so progress is durable

MethodLoader = Callable[[Model], "AnomalyMethod"]
Progress = Callable[[int, int], None]  # (images scored so far, images to score): before each batch and at the end

# Sessions share the cached models: one inference at a time per process keeps memory bounded and the
# models' (non-thread-safe) modules out of concurrent use.
_INFERENCE_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageRef:
    """One image to score: its content hash (the cache key), the name shown, and where its file is."""

    sha256: str
    name: str
    path: Path
    defect: str | None = None  # labelled images: "good" or the defect type; None when unknown
    mask_path: Path | None = None

    @property
    def label(self) -> int | None:
        return None if self.defect is None else NORMAL if self.defect == GOOD else DEFECTIVE


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_images(store: Store, dataset_id: int, split: str = "test") -> list[ImageRef]:
    """A stored dataset's images of ``split``, labelled, with their mask when they have one."""
    folder = store.dataset_dir(dataset_id)
    return [ImageRef(record.sha256, Path(record.path).name, folder / record.path, record.defect,
                     folder / record.mask_path if record.mask_path else None)
            for record in store.list_images(dataset_id, split)]


def synthetic_images(store: Store, dataset_id: int, size: int, resize: str) -> list[ImageRef]:
    """The synthetic-defect check's images of a stored dataset (``kdcore.synthetic_check``), with their masks,
    labelled "synthetic <kind>": what the models' synthetic scores were measured on, to look at. Made once per
    dataset state, size and resize rule, and kept in the store; none when the dataset has no hold-out."""
    # Keyed by the normal images' names, sizes and dates, which a listing gives: loading the dataset decodes
    # every image, which only making the images needs (the hold-out is drawn from these files).
    normals = store.dataset_dir(dataset_id) / "train" / "good"
    files = sorted(normals.iterdir()) if normals.is_dir() else []
    state = hashlib.sha256(repr([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    folder = store.root / "synthetic" / f"{dataset_id}-{size}-{resize}-{state.hexdigest()[:16]}"
    if not folder.is_dir():
        from kdcore.synthetic_check import write_synthetic_defects  # torch, only when the images are made

        dataset = data.load_dataset(store.dataset_dir(dataset_id))
        if not dataset.holdout:
            return []
        staging = store.make_tmp_dir("synthetic-")
        write_synthetic_defects(dataset, staging, size, resize)
        folder.parent.mkdir(exist_ok=True)
        try:
            os.replace(staging, folder)
        except OSError:  # another session made them meanwhile: theirs are the same
            shutil.rmtree(staging, ignore_errors=True)
    images = []
    for mask in sorted(folder.glob("*_mask.png")):
        path = mask.with_name(mask.name.removesuffix("_mask.png") + ".png")
        kind = path.stem.split("-", 1)[1]
        images.append(ImageRef(file_sha256(path), path.name, path, f"synthetic {kind}", mask))
    return images


def folder_images(folder: str | Path, roots: Sequence[Path] | None = None, recursive: bool = False
                  ) -> tuple[list[ImageRef], list[tuple[str, str]]]:
    """The readable images inside a server folder (directly, or at any depth when ``recursive``), and
    (file, reason) for the files skipped.

    Raises ``ingest.RejectedUpload`` when ``folder`` is not a folder, or lies outside ``roots`` when given.
    """
    images, problems = [], []
    for source in ingest.from_folder(folder, roots, recursive):
        path = Path(source.name)
        reason = _unusable(path)
        if reason:
            problems.append((path.name, reason))
        else:
            images.append(ImageRef(file_sha256(path), path.name, path))
    return images, problems


def describe_empty_folder(folder: str | Path, roots: Sequence[Path] | None, recursive: bool, n_skipped: int) -> str:
    """Why a folder gave nothing to inspect, in one line, e.g. that its images sit in subfolders."""
    if n_skipped:
        return f"No readable image in {folder}: all {n_skipped} file(s) were skipped (listed below)."
    if not recursive:
        deeper = len(ingest.from_folder(folder, roots, recursive=True))
        if deeper:
            return (f"No images directly in {folder}, but {deeper} file(s) in its subfolders: tick "
                    "'Include subfolders'.")
    return f"No images in {folder}" + (" or its subfolders." if recursive else ".")


def upload_images(store: Store, uploads: Iterable[tuple[str, bytes]]) -> tuple[list[ImageRef], list[tuple[str, str]]]:
    """Keep uploaded (name, bytes) images in the store (by content, so a reload or QA later still has them)."""
    images, problems = [], []
    for name, content in uploads:
        sha = hashlib.sha256(content).hexdigest()
        path = store.upload_file(sha, Path(name).suffix.lower())
        if not path.exists():
            _write_atomically(path, lambda fh: fh.write(content))
        reason = _unusable(path)
        if reason:
            path.unlink(missing_ok=True)
            problems.append((name, reason))
        else:
            images.append(ImageRef(sha, name, path))
    return images, problems


def _unusable(path: Path) -> str | None:
    if path.suffix.lower() not in data.IMAGE_EXTENSIONS:
        return f"not an image file type ({path.suffix or 'no extension'})"
    try:
        data.probe_image(path)
    except data.UnreadableImage as exc:
        return f"not a readable image: {exc}"
    return None


def _write_atomically(path: Path, write: Callable) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- scoring
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
        with _INFERENCE_LOCK:
            maps, chunk_scores = predict_paths(method, [image.path for image in chunk])
        for image, anomaly_map in zip(chunk, maps):
            # float32, the score's own precision: the map's maximum is the score, so the region drawn above a
            # threshold agrees with the verdict (float16 rounding drew no outline on an NG 2.154 vs 2.153).
            _write_atomically(store.map_file(model.id, image.sha256),
                              lambda fh, m=anomaly_map.astype(np.float32): np.save(fh, m))
        new = {image.sha256: float(score) for image, score in zip(chunk, chunk_scores)}
        store.add_scores(model.id, new)  # after the maps: a stored score always has its map
        scores.update(new)
    if on_progress is not None:
        on_progress(len(todo), len(todo))


def load_map(store: Store, model: Model, image: ImageRef) -> np.ndarray:
    """The cached raw anomaly map (float32, model resolution) of an image ``score_images`` has scored."""
    return np.load(store.map_file(model.id, image.sha256)).astype(np.float32)


# ------------------------------------------------------------------------------------------- thresholds
def saved_threshold(model: Model) -> float:
    return float(model.threshold["value"])


def save_threshold(store: Store, model: Model, method: "AnomalyMethod", value: float, mode: str,
                   parameter: float | None, by: str | None = None) -> dict:
    """Make ``value`` the model's threshold: in its file (for the CLI) and in the store (for the app).

    ``method`` is the loaded model (the app's cached instance, whose threshold is updated with the file).
    The file is replaced atomically by ``save``; it is written first, so a crash in between leaves the
    store's older value, never a store value the file lacks.
    """
    with _INFERENCE_LOCK:
        method.set_threshold(value, mode=mode, parameter=parameter, by=by)
        method.save(store.model_file(model))
        threshold = dict(method.threshold)
    store.set_model_threshold(model.id, threshold)
    return threshold


def _span(cal: dict) -> float:
    """Width of the hold-out score range: the unit of the normalised scale (never 0, so it can be inverted)."""
    return (cal["max"] - cal["min"]) or max(abs(cal["max"]), 1.0) * 1e-3


def to_normalized(threshold: float, model: Model) -> float:
    """Where ``threshold`` sits on the model's normalised scale (its saved threshold at 0.5), unclipped."""
    return (threshold - saved_threshold(model)) / _span(model.calibration) + 0.5


def from_normalized(position: float, model: Model) -> float:
    return saved_threshold(model) + (position - 0.5) * _span(model.calibration)


def threshold_range(model: Model) -> tuple[float, float, float]:
    """Bounds and step of a threshold slider: the hold-out range and the saved threshold, one span wider each side.

    A step is 0.01 on the normalised scale, and the bounds are whole steps from the saved threshold: a slider
    snaps its value to its steps, and must open exactly on the saved threshold.
    """
    cal, saved = model.calibration, saved_threshold(model)
    span = _span(cal)
    step = span / 100
    below = math.ceil((saved - min(cal["min"], saved) + span) / step)
    above = math.ceil((max(cal["max"], saved) + span - saved) / step)
    return saved - below * step, saved + above * step, step


# ------------------------------------------------------------------------------------------- labelled sets
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


# ------------------------------------------------------------------------------------------- inspections
@dataclass(frozen=True)
class Row:
    """One image of an inspection: its score, the verdict at the inspection's threshold, and the QA label."""

    image: ImageRef
    score: float
    verdict: str
    qa_label: int | None  # what QA says the image really is; None while unreviewed
    qa_comment: str | None = None  # QA's note on the image, if any

    @property
    def qa_mark(self) -> str | None:
        """Whether QA found the verdict "correct" or "wrong" (None while unreviewed)."""
        if self.qa_label is None:
            return None
        return "correct" if (self.qa_label == DEFECTIVE) == (self.verdict == NG) else "wrong"

    @property
    def outcome(self) -> str | None:
        """TP, FP, TN or FN (defective = positive) once QA has reviewed the image."""
        if self.qa_label is None:
            return None
        return ("T" if self.qa_mark == "correct" else "F") + ("P" if self.verdict == NG else "N")


def run_inspection(store: Store, model: Model, images: Sequence[ImageRef], source: str,
                   load_method: MethodLoader, on_progress: Progress | None = None) -> int:
    """Score ``images`` (cached ones are not run again) and record them as an inspection at the model's saved
    threshold; returns its id."""
    if not images:
        raise ValueError("no images to inspect")
    score_images(store, model, images, load_method, on_progress)
    # The same images, source and threshold as the latest inspection (Enter, then a click; a second tab):
    # that inspection, not a copy of it.
    latest = next(iter(store.list_inspections(model.id, limit=1)), None)
    if latest is not None and latest.source == source and latest.threshold == model.threshold and \
            [sha for sha, _, _ in store.inspection_images(latest.id)] == [image.sha256 for image in images]:
        return latest.id
    return store.create_inspection(model.id, source, model.threshold,
                                   [(image.sha256, image.name, str(image.path)) for image in images])


def inspection_images(store: Store, inspection: Inspection) -> list[ImageRef]:
    return [ImageRef(sha, name, Path(path)) for sha, name, path in store.inspection_images(inspection.id)]


def inspection_rows(store: Store, inspection: Inspection) -> list[Row]:
    """The inspection's images, highest score (most suspicious) first."""
    images = inspection_images(store, inspection)
    scores = store.cached_scores(inspection.model_id, [image.sha256 for image in images])
    hashes = [image.sha256 for image in images]
    labels, comments = store.qa_labels(hashes), store.qa_comments(hashes)
    threshold = inspection.threshold["value"]
    rows = [Row(image, scores[image.sha256], verdict(scores[image.sha256], threshold), labels.get(image.sha256),
                comments.get(image.sha256)) for image in images]
    return sorted(rows, key=lambda row: row.score, reverse=True)


def set_qa_mark(store: Store, row: Row, mark: str | None, by: str | None = None) -> None:
    """Record QA's "correct"/"wrong" for the row's verdict (None clears it), as the image's true label.

    Stored as a label, not as a judgement of one verdict, so it stays true when the threshold moves.
    """
    if mark is None:
        store.set_qa_label(row.image.sha256, None)
        return
    if mark not in QA_MARKS:
        raise ValueError(f"a QA mark is one of {QA_MARKS}, got {mark!r}")
    said_defective = row.verdict == NG
    store.set_qa_label(row.image.sha256, DEFECTIVE if said_defective == (mark == "correct") else NORMAL, by)


def false_positives(rows: Iterable[Row]) -> list[ImageRef]:
    return [row.image for row in rows if row.outcome == "FP"]


def false_negatives(rows: Iterable[Row]) -> list[ImageRef]:
    return [row.image for row in rows if row.outcome == "FN"]


def _sources(images: Sequence[ImageRef]) -> list[ingest.SourceFile]:
    return [ingest.SourceFile(image.name, lambda path=image.path: open(path, "rb")) for image in images]


def add_to_normal_images(store: Store, dataset_id: int, images: Sequence[ImageRef]) -> ingest.IngestReport:
    """Add images (e.g. QA-confirmed false positives) to a dataset's normal training images; duplicates skip."""
    return ingest.add_normal_images(store, dataset_id, _sources(images))


def add_to_test_images(store: Store, dataset_id: int, defect: str, images: Sequence[ImageRef]) -> ingest.IngestReport:
    """Add images (e.g. QA-confirmed missed defects) to a dataset's labelled test images as ``defect``, so that
    the next evaluation counts them. Where the dataset's defect images have masks (or it has none yet), the
    region QA marked on an image (``kdcore.qa_regions``) goes with it as its mask; an image without one is
    then refused, and the report says why."""
    masks = []
    if store.defect_mask_state(dataset_id) is not False:
        regions = [(image.name, qa_regions.region_file(store, image.sha256)) for image in images]
        masks = [ingest.SourceFile(f"{Path(name).stem}_mask.png", lambda path=path: open(path, "rb"))
                 for name, path in regions if path.exists()]
    return ingest.add_test_images(store, dataset_id, defect, _sources(images), masks)


CSV_COLUMNS = ["image", "score", "threshold", "verdict", "qa_mark", "qa_outcome", "path", "sha256", "model_id",
               "method", "inspection_id", "qa_comment"]


def rows_csv(rows: Sequence[Row], inspection: Inspection, model: Model) -> bytes:
    """The inspection table as CSV (UTF-8), one line per image in the order given."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    threshold = inspection.threshold["value"]
    for row in rows:
        writer.writerow([row.image.name, f"{row.score:.10g}", f"{threshold:.10g}", row.verdict, row.qa_mark or "",
                         row.outcome or "", str(row.image.path), row.image.sha256, model.id, model.method,
                         inspection.id, row.qa_comment or ""])
    return out.getvalue().encode("utf-8")
