"""Trained models: registering a finished training's file, their records, metrics, thresholds and deletion."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from kdcore.store.database import _audit
from kdcore.store.records import ACTIVE_STATUSES, DONE, EVALUATE, GOOD, Model, StoreError, _record


class ModelTables:
    """Trained models: a part of ``kdcore.store.Store``, built on its ``Database``."""

    def model_file(self, model: Model) -> Path:
        return self.root / model.path

    def evaluation_blocker(self, model: Model) -> str | None:
        """Why the model cannot be evaluated now (the pages and the CLI say the same), or None."""
        if model.dataset_id is None:
            return f"Its dataset '{model.dataset_name}' was deleted."
        return None

    def evaluation_scope(self, model: Model) -> str:
        """What an evaluation of the model will measure, in words (its dataset must exist)."""
        counts = self.dataset_counts(model.dataset_id)
        n_good = counts.get(("test", GOOD), 0)
        n_defect = sum(n for (split, defect), n in counts.items() if split == "test" and defect != GOOD)
        if n_good and n_defect:
            return (f"Evaluation scores its {n_good} good and {n_defect} defective test images and synthetic defects "
                    "made from the hold-out normals.")
        return (f"The dataset has {n_good} good and {n_defect} defective test images, so evaluation measures "
                "synthetic defects made from the hold-out normals only; add labelled test images on the Datasets "
                "page for real numbers.")

    def bundle_file(self, model: Model) -> Path:
        """The model's export bundle as a zip, once an export job has written it."""
        return self.root / "bundles" / f"model-{model.id}.zip"

    def register_model(self, job_id: int, staged_file: Path, record: dict) -> Model | None:
        """Move a freshly trained model into ``models/`` and finish its job as done, in one transaction.

        ``record`` holds the Model fields method, params, teacher_weights, training, calibration, threshold.
        Returns None, and leaves ``models/`` untouched, if the job is no longer running (cancelled or
        declared dead meanwhile): a job that did not succeed never replaces or adds a model.
        """
        job = self.get_job(job_id)
        final: Path | None = None
        try:
            with self._connect() as conn:
                model_id = conn.execute(
                    "INSERT INTO models (dataset_id, dataset_name, method, params, teacher_weights, training, "
                    "calibration, threshold, path, file_bytes, job_id, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?, ?)",
                    (job.dataset_id, job.dataset_name, record["method"], json.dumps(record["params"]),
                     json.dumps(record["teacher_weights"]), json.dumps(record["training"]),
                     json.dumps(record["calibration"]), json.dumps(record["threshold"]),
                     staged_file.stat().st_size, job_id, time.time())).lastrowid
                final = self.root / "models" / f"{model_id}.pt"
                conn.execute("UPDATE models SET path = ? WHERE id = ?", (final.relative_to(self.root).as_posix(),
                                                                       model_id))
                if not self._finish(conn, job_id, DONE, f"model {model_id} saved", model_id):
                    raise _JobGone
                os.replace(staged_file, final)
        except _JobGone:
            return None
        except BaseException:
            if final is not None:
                final.unlink(missing_ok=True)
            raise
        return self.get_model(model_id)

    def get_model(self, model_id: int) -> Model:
        rows = self._query("SELECT * FROM models WHERE id = ?", (model_id,))
        if not rows:
            raise StoreError(f"model {model_id} does not exist (deleted?)")
        return _record(Model, rows[0])

    def list_models(self) -> list[Model]:
        """Newest first."""
        return [_record(Model, row) for row in self._query("SELECT * FROM models ORDER BY id DESC")]

    def set_model_metrics(self, model_id: int, metrics: dict) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE models SET metrics = ? WHERE id = ?", (json.dumps(metrics), model_id))

    def delete_model(self, model_id: int, by: str | None = None) -> None:
        model = self.get_model(model_id)
        with self._connect() as conn:
            busy = conn.execute("SELECT COUNT(*) FROM jobs WHERE model_id = ? AND kind = ? AND status IN (?, ?)",
                                (model_id, EVALUATE, *ACTIVE_STATUSES)).fetchone()[0]
            if busy:
                raise StoreError("an evaluation of this model is queued or running: cancel it first")
            conn.execute("DELETE FROM models WHERE id = ?", (model_id,))
            _audit(conn, by, "delete model", f"#{model.id} {model.method} on '{model.dataset_name}'")
        self.model_file(model).unlink(missing_ok=True)
        self.bundle_file(model).unlink(missing_ok=True)
        shutil.rmtree(self.root / "maps" / str(model_id), ignore_errors=True)

    def set_model_threshold(self, model_id: int, threshold: dict) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE models SET threshold = ? WHERE id = ?", (json.dumps(threshold), model_id))


class _JobGone(Exception):
    """Raised inside register_model's transaction to roll it back."""
