"""The data directory's SQLite database: its schema and migrations, the store's identity, and connections that
retry while another process holds the write lock."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from kdcore.store.records import StoreError

DATA_DIR_ENV = "KDCORE_DATA_DIR"
DEFAULT_DATA_DIR = "kdcore_data"
# SQLite's own wait for a lock on each statement, and how long a write retries in all before it fails.
BUSY_TIMEOUT_SECONDS = 30.0
MAX_BUSY_SECONDS = 180.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    split TEXT NOT NULL CHECK (split IN ('train', 'test')),
    defect TEXT NOT NULL,
    path TEXT NOT NULL,          -- relative to the dataset folder
    mask_path TEXT,              -- relative to the dataset folder; defect test images only
    thumb_path TEXT NOT NULL,    -- relative to the dataset folder
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    source_name TEXT NOT NULL,   -- the name it was uploaded or imported under
    added_at REAL NOT NULL,
    UNIQUE (dataset_id, sha256),
    UNIQUE (dataset_id, path)
);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER REFERENCES datasets(id) ON DELETE SET NULL,
    dataset_name TEXT NOT NULL,
    method TEXT NOT NULL,
    params TEXT NOT NULL,
    teacher_weights TEXT NOT NULL,
    training TEXT NOT NULL,
    calibration TEXT NOT NULL,
    threshold TEXT,
    metrics TEXT,
    path TEXT NOT NULL,          -- relative to the data directory
    file_bytes INTEGER NOT NULL,
    job_id INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('train', 'evaluate', 'export')),
    status TEXT NOT NULL,
    dataset_id INTEGER REFERENCES datasets(id) ON DELETE SET NULL,
    dataset_name TEXT NOT NULL,
    model_id INTEGER REFERENCES models(id) ON DELETE SET NULL,  -- evaluate, export: its input; train: its result
    method TEXT NOT NULL,
    params TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    progress REAL NOT NULL DEFAULT 0,
    epoch INTEGER,
    epochs INTEGER,
    loss REAL,
    eta_seconds REAL,
    message TEXT NOT NULL DEFAULT '',
    worker_pid INTEGER,
    heartbeat_at REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    executor TEXT,               -- what ran it: 'local' (the worker's own process)
    node TEXT                    -- the machine it ran on
);
CREATE TABLE IF NOT EXISTS job_points (
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    loss REAL,
    holdout_score REAL,
    elapsed_seconds REAL NOT NULL
);
-- The review pages (kdcore.scoring, kdcore.review): each model scores an image (identified by content) once.
CREATE TABLE IF NOT EXISTS scores (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    score REAL NOT NULL,         -- its map is maps/<model_id>/<sha256>.npy, written before this row
    PRIMARY KEY (model_id, sha256)
);
CREATE TABLE IF NOT EXISTS inspections (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    source TEXT NOT NULL,        -- the server folder, or 'upload'
    threshold TEXT NOT NULL,     -- the model's threshold (JSON) when it ran: the verdicts' reference
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS inspection_images (
    inspection_id INTEGER NOT NULL REFERENCES inspections(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,          -- absolute
    PRIMARY KEY (inspection_id, sha256)
);
CREATE TABLE IF NOT EXISTS qa_labels (
    sha256 TEXT PRIMARY KEY,     -- QA's word on what an image really shows, whatever model judged it
    label INTEGER NOT NULL CHECK (label IN (0, 1)),  -- 0 normal, 1 defective
    marked_at REAL NOT NULL,
    marked_by TEXT               -- the logged-in user, when the app has a login
);
CREATE TABLE IF NOT EXISTS qa_comments (
    sha256 TEXT PRIMARY KEY,     -- QA's note on an image (what the defect is, why a verdict is wrong), any model
    comment TEXT NOT NULL,
    written_at REAL NOT NULL,
    written_by TEXT
);
-- Who removed what: deletions cannot be shown afterwards, so they are recorded.
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    who TEXT,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
-- The store's identity (key 'store_id'), also written to the data directory's IDENTITY_FILE: a database that
-- does not belong to its directory (emptied, replaced, another store's) is refused, never mixed with its files.
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_points_by_job ON job_points (job_id, step);
CREATE INDEX IF NOT EXISTS images_by_split ON images (dataset_id, split, defect);
"""


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser().resolve()


def existing_data_dir(data_dir: str | Path | None, how_to_create: str) -> Path:
    """``data_dir`` (default ``default_data_dir()``) when it holds a store; else StoreError ending in
    ``how_to_create``. Commands that must not start an empty store on a mistyped path check this first."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if not (root / DATABASE_FILE).exists():
        raise StoreError(f"{root} is not a kdcore data directory (no {DATABASE_FILE}): check --data-dir, or "
                         f"{how_to_create}")
    return root


# The layout version of kdcore.sqlite3 (SQLite's user_version): 0 is a database written before versions were
# kept, 1 adds export jobs, 2 the store identity (meta), 3 each job's executor and node, 4 who marked and
# deleted (qa_labels.marked_by, audit). A newer database than this code knows is refused rather than misread.
SCHEMA_VERSION = 4
IDENTITY_FILE = "kdcore-store-id"
DATABASE_FILE = "kdcore.sqlite3"


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database written by an older kdcore to ``SCHEMA_VERSION``, in one transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"the data directory's database has layout {version}, newer than this kdcore's "
                         f"({SCHEMA_VERSION}): update kdcore")
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        jobs_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
        if "'export'" not in jobs_sql:
            # SQLite cannot alter a CHECK constraint: copy the table under today's definition (same columns).
            today = re.search(r"CREATE TABLE IF NOT EXISTS jobs \(.*?\n\);", _SCHEMA, re.S).group(0)
            conn.execute(today.replace("IF NOT EXISTS jobs", "jobs_migrated"))
            columns = ", ".join(row[1] for row in conn.execute("PRAGMA table_info(jobs)"))
            conn.execute(f"INSERT INTO jobs_migrated ({columns}) SELECT {columns} FROM jobs")
            conn.execute("DROP TABLE jobs")
            conn.execute("ALTER TABLE jobs_migrated RENAME TO jobs")
        for table, column in (("jobs", "executor"), ("jobs", "node"), ("qa_labels", "marked_by")):
            if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _claim_identity(conn: sqlite3.Connection, root: Path, fresh_database: bool) -> str:
    """The store id shared by the database and the directory; created for a new (or pre-identity) store.

    Runs under the write lock, so two processes opening a new store at once agree on one id.
    """
    marker = root / IDENTITY_FILE
    _begin_immediate(conn)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        database_id = row[0] if row else None
        directory_id = marker.read_text().strip() if marker.exists() else None
        database = root / DATABASE_FILE
        if database_id and directory_id and database_id != directory_id:
            raise StoreError(f"{database} belongs to another kdcore store than the files in {root}: put back this "
                             "directory's own database (nothing was changed)")
        if directory_id and not database_id:
            raise StoreError(_replaced_database(root))
        if database_id and not directory_id:
            raise StoreError(f"{root} lacks its {IDENTITY_FILE} file, so {database} may not belong to it: copy the "
                             "whole data directory, not the database alone (nothing was changed)")
        if not database_id:
            if fresh_database and any(any((root / sub).iterdir()) for sub in ("datasets", "models")):
                raise StoreError(f"{database} is new, but {root} already holds datasets or models: restore the "
                                 "database from a backup, or move the directory aside to start afresh (nothing was "
                                 "changed)")
            database_id = uuid.uuid4().hex
            conn.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (database_id,))
            _write_text_atomically(marker, database_id + "\n")
        conn.execute("COMMIT")
        return database_id
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _audit(conn: sqlite3.Connection, who: str | None, action: str, detail: str) -> None:
    conn.execute("INSERT INTO audit (at, who, action, detail) VALUES (?, ?, ?, ?)", (time.time(), who, action, detail))


def _replaced_database(root: Path) -> str:
    return (f"{root / DATABASE_FILE} is empty or was replaced, but {root} holds the files of a store: restore the "
            "database from a backup, or move the directory aside to start afresh (nothing was changed)")


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _begin_immediate(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, retried with backoff while another writer holds the lock (each try waits up to the
    connection's timeout) until ``MAX_BUSY_SECONDS`` have passed; then the error goes to the caller."""
    deadline, pause = time.monotonic() + MAX_BUSY_SECONDS, 0.05
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


class Database:
    """The connection to a data directory's database; every table's methods build on it."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser().resolve() if root is not None else default_data_dir()
        for sub in ("datasets", "models", "jobs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DATABASE_FILE
        try:
            conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
            try:
                fresh = not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone()
                if fresh and (self.root / IDENTITY_FILE).exists():  # refused before anything is written to it
                    raise StoreError(_replaced_database(self.root))
                # WAL is a property of the database file: set once, every later connection uses it.
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                _migrate(conn)
                self.id = _claim_identity(conn, self.root, fresh)
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:  # e.g. a damaged file: "file is not a database"
            raise StoreError(f"{self.db_path} cannot be used ({exc}): restore it from a backup, or move the data "
                             "directory aside to start afresh (nothing was changed)") from exc

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection; the block runs as one transaction (commit on success, else rollback)."""
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys=ON")
            # NORMAL is safe in WAL mode: a crash loses at most the last commits, never corrupts.
            conn.execute("PRAGMA synchronous=NORMAL")
            # IMMEDIATE takes the write lock up front, so read-then-write blocks cannot interleave.
            _begin_immediate(conn)
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_SECONDS)
        try:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def _rows_in(self, sql: str, params: tuple, values: Sequence) -> list[sqlite3.Row]:
        """Run ``sql`` whose ``{}`` is an IN list, over ``values`` in chunks (SQLite limits bound parameters)."""
        rows = []
        for start in range(0, len(values), 500):
            chunk = values[start:start + 500]
            rows += self._query(sql.format(",".join("?" * len(chunk))), (*params, *chunk))
        return rows

    def make_tmp_dir(self, prefix: str) -> Path:
        """A fresh folder under ``tmp/``: on the same file system, so ``os.replace`` out of it is atomic."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "tmp"))

    def clean_tmp(self, older_than_seconds: float = 86400.0) -> None:
        """Remove staging folders left behind by crashed processes (live ones are far younger)."""
        cutoff = time.time() - older_than_seconds
        for path in (self.root / "tmp").iterdir():
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
