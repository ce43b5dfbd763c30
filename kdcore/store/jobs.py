"""The job queue: training, evaluation and export jobs, their progress, cancellation and logs."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Sequence

from kdcore.store.records import (ACTIVE_STATUSES, CANCELLED, DONE, EVALUATE, EXPORT, FAILED, LANES, QUEUED, RUNNING,
                                  TRAIN, Job, StoreError, _record)

# A running job whose worker has not written a heartbeat for this long is considered dead (e.g. a frozen
# process, or a worker on another machine sharing the directory, where the lock cannot tell).
STALE_HEARTBEAT_SECONDS = 120.0


class JobTables:
    """The job queue: a part of ``kdcore.store.Store``, built on its ``Database``."""

    def job_log(self, job_id: int) -> Path:
        return self.root / "jobs" / f"{job_id}.log"

    def enqueue_job(self, kind: str, method: str, params: dict, dataset_id: int | None,
                    model_id: int | None = None) -> Job:
        """Queue a job on a dataset; a job on a model (``model_id``) may outlive its dataset (``dataset_id`` None)."""
        if dataset_id is not None:
            dataset_name = self.get_dataset(dataset_id).name
        elif model_id is not None:
            dataset_name = self.get_model(model_id).dataset_name
        else:
            raise StoreError("a job needs a dataset or a model")
        with self._connect() as conn:
            job_id = conn.execute(
                "INSERT INTO jobs (kind, status, dataset_id, dataset_name, model_id, method, params, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, QUEUED, dataset_id, dataset_name, model_id, method, json.dumps(params), time.time()),
            ).lastrowid
        return self.get_job(job_id)

    def get_job(self, job_id: int) -> Job:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise StoreError(f"job {job_id} does not exist")
        return _record(Job, rows[0])

    def list_jobs(self, kind: str | None = None, limit: int = 50) -> list[Job]:
        """Newest first."""
        where, params = ("WHERE kind = ?", (kind,)) if kind else ("", ())
        rows = self._query(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit))
        return [_record(Job, row) for row in rows]

    def count_active_jobs(self, kind: str | None = None) -> int:
        """Jobs queued or running (of ``kind``, if given)."""
        where, params = ("AND kind = ?", (kind,)) if kind else ("", ())
        return self._query(f"SELECT COUNT(*) FROM jobs WHERE status IN (?, ?) {where}",
                           (*ACTIVE_STATUSES, *params))[0][0]

    def has_queued_jobs(self) -> bool:
        return bool(self._query("SELECT 1 FROM jobs WHERE status = ? LIMIT 1", (QUEUED,)))

    def claim_next_job(self, worker_pid: int, executor: str = "local", node: str | None = None,
                       kinds: Sequence[str] | None = None) -> Job | None:
        """Mark the oldest queued job (of ``kinds``, default any) running for this worker and return it (None
        when there is none)."""
        kinds = tuple(kinds or (TRAIN, EVALUATE, EXPORT))
        with self._connect() as conn:
            row = conn.execute(f"SELECT id FROM jobs WHERE status = ? AND kind IN ({','.join('?' * len(kinds))}) "
                               "ORDER BY id LIMIT 1", (QUEUED, *kinds)).fetchone()
            if row is None:
                return None
            now = time.time()
            conn.execute("UPDATE jobs SET status = ?, stage = 'starting', worker_pid = ?, started_at = ?, "
                         "heartbeat_at = ?, executor = ?, node = ? WHERE id = ?",
                         (RUNNING, worker_pid, now, now, executor,
                          socket.gethostname() if node is None else node, row["id"]))
        return self.get_job(row["id"])

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job of its lane (``LANES``) to run, 2 for the one after, ...; None when not waiting."""
        if job.status != QUEUED:
            return None
        kinds = next(kinds for kinds in LANES.values() if job.kind in kinds)
        return self._query(f"SELECT COUNT(*) FROM jobs WHERE status = ? AND id <= ? AND "
                           f"kind IN ({','.join('?' * len(kinds))})", (QUEUED, job.id, *kinds))[0][0]

    def report_progress(self, job_id: int, points: Sequence[dict] = (), **fields) -> None:
        """Update a running job's progress columns (stage, progress, epoch, ...) and append loss-curve points."""
        allowed = {"stage", "progress", "epoch", "epochs", "loss", "eta_seconds", "node"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"not progress fields: {sorted(unknown)}")
        with self._connect() as conn:
            assignments = ", ".join(f"{name} = ?" for name in fields)
            conn.execute(f"UPDATE jobs SET heartbeat_at = ?{', ' if fields else ''}{assignments} WHERE id = ?",
                         (time.time(), *fields.values(), job_id))
            conn.executemany(
                "INSERT INTO job_points (job_id, step, epoch, loss, holdout_score, elapsed_seconds) "
                "VALUES (:job_id, :step, :epoch, :loss, :holdout_score, :elapsed_seconds)",
                [{"job_id": job_id, **point} for point in points])

    def heartbeat(self, job_id: int) -> None:
        self.report_progress(job_id)

    def job_log_tail(self, job_id: int, lines: int = 30) -> str:
        try:
            with open(self.job_log(job_id), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 200 * lines))  # logs are line-oriented: ~200 bytes a line is plenty
                text = fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def job_points(self, job_id: int) -> list[dict]:
        rows = self._query("SELECT step, epoch, loss, holdout_score, elapsed_seconds FROM job_points "
                           "WHERE job_id = ? ORDER BY rowid", (job_id,))
        return [dict(row) for row in rows]

    def request_cancel(self, job_id: int) -> Job:
        """A queued job is cancelled at once; a running one is flagged and its worker stops it."""
        with self._connect() as conn:
            conn.execute("UPDATE jobs SET status = ?, finished_at = ?, message = 'cancelled before it started' "
                         "WHERE id = ? AND status = ?", (CANCELLED, time.time(), job_id, QUEUED))
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = ?", (job_id, RUNNING))
        return self.get_job(job_id)

    def cancel_requested(self, job_id: int) -> bool:
        rows = self._query("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def finish_job(self, job_id: int, status: str, message: str = "", model_id: int | None = None) -> bool:
        """End a running job; False if it is no longer running (e.g. already declared dead)."""
        with self._connect() as conn:
            return self._finish(conn, job_id, status, message, model_id)

    @staticmethod
    def _finish(conn: sqlite3.Connection, job_id: int, status: str, message: str, model_id: int | None) -> bool:
        if status not in (DONE, FAILED, CANCELLED):
            raise ValueError(f"not a final status: {status!r}")
        progress = ", progress = 1" if status == DONE else ""
        changed = conn.execute(
            f"UPDATE jobs SET status = ?, message = ?, model_id = COALESCE(?, model_id), finished_at = ?, "
            f"stage = ?{progress} WHERE id = ? AND status = ?",
            (status, message, model_id, time.time(), status, job_id, RUNNING)).rowcount
        return changed == 1

    def fail_orphaned_jobs(self) -> list[Job]:
        """Mark failed every running job whose worker is gone; returns them. Called at app start and by workers."""
        if not self._query("SELECT 1 FROM jobs WHERE status = ? LIMIT 1", (RUNNING,)):
            return []  # the usual case, answered without taking the write lock
        now = time.time()
        orphaned = []
        with self._connect() as conn:
            # Looked up inside the write transaction: a worker claims jobs only after taking its lock, so no job
            # can start between this look and the check below and be mistaken for an orphan.
            live_pid = self.worker_pid()
            for row in conn.execute("SELECT * FROM jobs WHERE status = ?", (RUNNING,)).fetchall():
                job = _record(Job, row)
                if job.worker_pid != live_pid:
                    reason = f"the worker process (pid {job.worker_pid}) stopped while the job was running"
                elif job.heartbeat_at is None or now - job.heartbeat_at > STALE_HEARTBEAT_SECONDS:
                    reason = (f"the worker process (pid {job.worker_pid}) sent no heartbeat for "
                              f"{now - (job.heartbeat_at or job.started_at):.0f} s")
                else:
                    continue
                self._finish(conn, job.id, FAILED, reason + "; see its log", None)
                orphaned.append(job)
        return orphaned
