"""What the review pages keep (``kdcore.scoring``, ``kdcore.review``): cached scores and maps, inspections, QA's
marks and comments on images, and the audit log of deletions."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from kdcore.store.records import Inspection, StoreError, _record


class ReviewTables:
    """The review pages' records: a part of ``kdcore.store.Store``, built on its ``Database``."""

    def map_file(self, model_id: int, sha256: str) -> Path:
        return self.root / "maps" / str(model_id) / f"{sha256}.npy"

    def upload_file(self, sha256: str, suffix: str) -> Path:
        return self.root / "uploads" / f"{sha256}{suffix}"

    def cached_scores(self, model_id: int, hashes: Sequence[str]) -> dict[str, float]:
        """sha256 → score for those of ``hashes`` the model has scored."""
        return {row["sha256"]: row["score"] for row in self._rows_in(
            "SELECT sha256, score FROM scores WHERE model_id = ? AND sha256 IN ({})", (model_id,), hashes)}

    def add_scores(self, model_id: int, scores: dict[str, float]) -> None:
        with self._connect() as conn:
            conn.executemany("INSERT OR REPLACE INTO scores (model_id, sha256, score) VALUES (?, ?, ?)",
                             [(model_id, sha, score) for sha, score in scores.items()])

    def create_inspection(self, model_id: int, source: str, threshold: dict,
                          images: Sequence[tuple[str, str, str]]) -> int:
        """Record an inspection of (sha256, name, absolute path) images; an image listed twice counts once."""
        with self._connect() as conn:
            inspection_id = conn.execute(
                "INSERT INTO inspections (model_id, source, threshold, created_at) VALUES (?, ?, ?, ?)",
                (model_id, source, json.dumps(threshold), time.time())).lastrowid
            conn.executemany("INSERT OR IGNORE INTO inspection_images (inspection_id, sha256, name, path) "
                             "VALUES (?, ?, ?, ?)", [(inspection_id, *image) for image in images])
        return inspection_id

    _INSPECTIONS = ("SELECT inspections.*, (SELECT COUNT(*) FROM inspection_images "
                    "WHERE inspection_id = inspections.id) AS n_images FROM inspections")

    def get_inspection(self, inspection_id: int) -> Inspection:
        rows = self._query(f"{self._INSPECTIONS} WHERE id = ?", (inspection_id,))
        if not rows:
            raise StoreError(f"inspection {inspection_id} does not exist (its model deleted?)")
        return _record(Inspection, rows[0])

    def list_inspections(self, model_id: int, limit: int = 20) -> list[Inspection]:
        """Newest first."""
        rows = self._query(f"{self._INSPECTIONS} WHERE model_id = ? ORDER BY id DESC LIMIT ?", (model_id, limit))
        return [_record(Inspection, row) for row in rows]

    def inspection_images(self, inspection_id: int) -> list[tuple[str, str, str]]:
        """(sha256, name, path) of the inspection's images, in the order they were given."""
        rows = self._query("SELECT sha256, name, path FROM inspection_images WHERE inspection_id = ? "
                           "ORDER BY rowid", (inspection_id,))
        return [tuple(row) for row in rows]

    def set_qa_label(self, sha256: str, label: int | None, by: str | None = None) -> None:
        """Record (or with None, forget) what QA says an image shows: 0 normal, 1 defective; ``by`` whom."""
        with self._connect() as conn:
            if label is None:
                conn.execute("DELETE FROM qa_labels WHERE sha256 = ?", (sha256,))
            else:
                conn.execute("INSERT OR REPLACE INTO qa_labels (sha256, label, marked_at, marked_by) "
                             "VALUES (?, ?, ?, ?)", (sha256, label, time.time(), by))

    def audit_entries(self, limit: int = 100) -> list[dict]:
        """The latest recorded deletions, newest first: at, who, action, detail."""
        return [dict(row) for row in self._query("SELECT at, who, action, detail FROM audit ORDER BY id DESC "
                                                 "LIMIT ?", (limit,))]

    def set_qa_comment(self, sha256: str, comment: str, by: str | None = None) -> None:
        """Record QA's comment on an image; an empty (or blank) one removes it."""
        with self._connect() as conn:
            if comment.strip():
                conn.execute("INSERT OR REPLACE INTO qa_comments (sha256, comment, written_at, written_by) "
                             "VALUES (?, ?, ?, ?)", (sha256, comment.strip(), time.time(), by))
            else:
                conn.execute("DELETE FROM qa_comments WHERE sha256 = ?", (sha256,))

    def qa_comments(self, hashes: Sequence[str]) -> dict[str, str]:
        return {row["sha256"]: row["comment"] for row in self._rows_in(
            "SELECT sha256, comment FROM qa_comments WHERE sha256 IN ({})", (), hashes)}

    def qa_labels(self, hashes: Sequence[str]) -> dict[str, int]:
        return {row["sha256"]: row["label"] for row in self._rows_in(
            "SELECT sha256, label FROM qa_labels WHERE sha256 IN ({})", (), hashes)}
