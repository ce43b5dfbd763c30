"""Reviewing a model's verdicts: inspections, QA marks, false positives and negatives, CSV export.

The Compare, Thresholds and Inspect pages are thin layers over this module, ``kdcore.image_refs`` (which
images), ``kdcore.scoring`` (cached scores and maps) and ``kdcore.thresholds`` (the slider's scale); none
imports streamlit, nor torch until a model must actually run.

Threshold convention (as everywhere in kdcore): an image is NG iff ``score > threshold``.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from kdcore import ingest, qa_regions
from kdcore.image_refs import DEFECTIVE, NORMAL, ImageRef
from kdcore.scoring import MethodLoader, Progress, score_images
from kdcore.store import Inspection, Model, Store
from kdcore.verdicts import NG, verdict

QA_MARKS = ("correct", "wrong")


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
