"""The app's durable state: one data directory holding an SQLite database and the files it describes.

Layout of the data directory (``KDCORE_DATA_DIR``, default ``./kdcore_data``)::

    kdcore.sqlite3               datasets, their image manifest, jobs, loss curves, models; schema version
    kdcore-store-id              the store's identity, also kept in the database (they must match)
    datasets/<id>/train/good/    normal training images   } the MVTec AD layout, so the folder is
    datasets/<id>/test/<defect>/ labelled test images     } exactly what ``kdcore.data.load_dataset``
    datasets/<id>/ground_truth/  masks (<stem>_mask.*)    } and the CLI read
    datasets/<id>/thumbs/        small JPEGs for the gallery (ignored by load_dataset)
    models/<id>.pt               trained models (``kdcore.load``)
    jobs/<id>.log                one log per job
    maps/<model id>/<sha256>.npy anomaly maps cached by the review pages (the scores are rows in the database)
    uploads/<sha256>.<ext>       images uploaded for review (Compare, Inspect), by content
    worker.lock                  held (flock) by the one running worker; holds its pid
    worker.log                   stdout/stderr of a worker started by the app
    bundles/model-<id>.zip       export bundles (``kdcore.export``) made by export jobs
    inbox/                       default root of the server folders the web app may read (``KDCORE_IMPORT_ROOTS``)
    tmp/                         staging area: files appear in their final place only by os.replace

Everything the app shows comes from here, never from a browser session, so a reload or a second browser sees
the same state and the worker (a separate process) and the CLI share it. The database runs in WAL mode so the
worker's progress writes never block the pages' reads. Every call opens its own short connection: Streamlit
serves each session from its own thread, and sqlite3 connections must not cross threads.

This module needs neither torch nor streamlit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import socket
import sqlite3
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

DATA_DIR_ENV = "KDCORE_DATA_DIR"
DEFAULT_DATA_DIR = "kdcore_data"
GOOD = "good"
# A defect type names a folder (test/<defect>, ground_truth/<defect>): no separators, no leading dot.
DEFECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFECT_NAME_RULE = "use letters, digits, '_', '-' or '.', starting with a letter or digit"

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE_STATUSES = (QUEUED, RUNNING)
TRAIN, EVALUATE, EXPORT = "train", "evaluate", "export"
# Trainings take minutes to hours, evaluations and exports seconds to a minute: the worker runs one job of each
# lane at a time, so a short job never waits behind a long one.
LANES = {"training": (TRAIN,), "short": (EVALUATE, EXPORT)}
# A running job whose worker has not written a heartbeat for this long is considered dead (e.g. a frozen
# process, or a worker on another machine sharing the directory, where the lock cannot tell).
STALE_HEARTBEAT_SECONDS = 120.0
# Rows per transaction of an import: each holds the write lock for milliseconds, not for the whole import.
ROWS_PER_TRANSACTION = 200
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


class StoreError(ValueError):
    """A request the store refuses; the message is meant for the user."""


# ------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Dataset:
    id: int
    name: str
    created_at: float


@dataclass(frozen=True)
class ImageRecord:
    id: int
    dataset_id: int
    split: str
    defect: str
    path: str
    mask_path: str | None
    thumb_path: str
    sha256: str
    bytes: int
    width: int
    height: int
    source_name: str
    added_at: float


@dataclass(frozen=True)
class NewImage:
    """An image staged under ``tmp/``, checked and ready to be moved into a dataset by ``add_images``."""

    staged: Path            # the staged image file
    staged_thumb: Path      # its gallery thumbnail
    staged_mask: Path | None
    split: str
    defect: str
    name: str               # file name to use in the dataset folder (made unique on commit)
    mask_suffix: str | None
    sha256: str
    bytes: int
    width: int
    height: int
    source_name: str


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    status: str
    dataset_id: int | None
    dataset_name: str
    model_id: int | None
    method: str
    params: dict
    cancel_requested: bool
    stage: str
    progress: float
    epoch: int | None
    epochs: int | None
    loss: float | None
    eta_seconds: float | None
    message: str
    worker_pid: int | None
    heartbeat_at: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    executor: str | None
    node: str | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES


@dataclass(frozen=True)
class Model:
    id: int
    dataset_id: int | None
    dataset_name: str
    method: str
    params: dict
    teacher_weights: dict
    training: dict
    calibration: dict
    threshold: dict | None
    metrics: dict | None
    path: str
    file_bytes: int
    job_id: int | None
    created_at: float


@dataclass(frozen=True)
class Inspection:
    id: int
    model_id: int
    source: str
    threshold: dict
    created_at: float
    n_images: int


_JSON_FIELDS = {"params", "teacher_weights", "training", "calibration", "threshold", "metrics"}


def _record(cls, row: sqlite3.Row):
    values = {}
    for f in dataclasses.fields(cls):
        value = row[f.name]
        if f.name in _JSON_FIELDS and value is not None:
            value = json.loads(value)
        elif f.name == "cancel_requested":
            value = bool(value)
        values[f.name] = value
    return cls(**values)


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


# ------------------------------------------------------------------------------------------- the store
class Store:
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

    # ------------------------------------------------------------------------------- paths and files
    def dataset_dir(self, dataset_id: int) -> Path:
        return self.root / "datasets" / str(dataset_id)

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

    def job_log(self, job_id: int) -> Path:
        return self.root / "jobs" / f"{job_id}.log"

    def make_tmp_dir(self, prefix: str) -> Path:
        """A fresh folder under ``tmp/``: on the same file system, so ``os.replace`` out of it is atomic."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "tmp"))

    def clean_tmp(self, older_than_seconds: float = 86400.0) -> None:
        """Remove staging folders left behind by crashed processes (live ones are far younger)."""
        cutoff = time.time() - older_than_seconds
        for path in (self.root / "tmp").iterdir():
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------- datasets
    def create_dataset(self, name: str) -> Dataset:
        name = " ".join(name.split())
        if not name:
            raise StoreError("give the dataset a name, e.g. the product it shows")
        with self._connect() as conn:
            if conn.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"a dataset named '{name}' already exists")
            dataset_id = conn.execute("INSERT INTO datasets (name, created_at) VALUES (?, ?)",
                                      (name, time.time())).lastrowid
        # train/good exists from the start so that load_dataset always sees the MVTec layout.
        (self.dataset_dir(dataset_id) / "train" / GOOD).mkdir(parents=True, exist_ok=True)
        return self.get_dataset(dataset_id)

    def get_dataset(self, dataset_id: int) -> Dataset:
        rows = self._query("SELECT * FROM datasets WHERE id = ?", (dataset_id,))
        if not rows:
            raise StoreError(f"dataset {dataset_id} does not exist (deleted?)")
        return _record(Dataset, rows[0])

    def get_dataset_by_name(self, name: str) -> Dataset:
        rows = self._query("SELECT * FROM datasets WHERE name = ?", (" ".join(name.split()),))
        if not rows:
            known = ", ".join(f"'{d.name}'" for d in self.list_datasets()) or "none yet"
            raise StoreError(f"no dataset named '{name}' (datasets: {known})")
        return _record(Dataset, rows[0])

    def list_datasets(self) -> list[Dataset]:
        return [_record(Dataset, row) for row in self._query("SELECT * FROM datasets ORDER BY name")]

    def delete_dataset(self, dataset_id: int, by: str | None = None) -> None:
        """Remove a dataset, its images and files; models trained on it are kept (they are self-contained)."""
        dataset = self.get_dataset(dataset_id)
        with self._connect() as conn:
            self._require_no_active_jobs(conn, dataset_id)
            conn.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))
            _audit(conn, by, "delete dataset", f"#{dataset.id} '{dataset.name}'")
        # Files go after the rows: a crash in between leaves only an unreferenced folder, never a row without files.
        shutil.rmtree(self.dataset_dir(dataset_id), ignore_errors=True)

    def dataset_counts(self, dataset_id: int) -> dict[tuple[str, str], int]:
        """Number of images per (split, defect), e.g. {("train", "good"): 120, ("test", "scratch"): 8}."""
        rows = self._query("SELECT split, defect, COUNT(*) AS n FROM images WHERE dataset_id = ? "
                           "GROUP BY split, defect ORDER BY split DESC, defect", (dataset_id,))
        return {(row["split"], row["defect"]): row["n"] for row in rows}

    def list_images(self, dataset_id: int, split: str | None = None, limit: int = -1,
                    offset: int = 0) -> list[ImageRecord]:
        where, params = "dataset_id = ?", [dataset_id]
        if split is not None:
            where += " AND split = ?"
            params.append(split)
        rows = self._query(f"SELECT * FROM images WHERE {where} ORDER BY split DESC, defect, path "
                           "LIMIT ? OFFSET ?", (*params, limit, offset))
        return [_record(ImageRecord, row) for row in rows]

    def find_images_by_hash(self, dataset_id: int, hashes: list[str]) -> dict[str, str]:
        """sha256 → path (in the dataset) for those of ``hashes`` the dataset already holds."""
        rows = self._rows_in("SELECT sha256, path FROM images WHERE dataset_id = ? AND sha256 IN ({})",
                             (dataset_id,), hashes)
        return {row["sha256"]: row["path"] for row in rows}

    def _require_no_active_jobs(self, conn: sqlite3.Connection, dataset_id: int) -> None:
        busy = conn.execute("SELECT COUNT(*) FROM jobs WHERE dataset_id = ? AND status IN (?, ?)",
                            (dataset_id, *ACTIVE_STATUSES)).fetchone()[0]
        if busy:
            raise StoreError(f"{busy} job(s) still use this dataset: wait for them or cancel them first")

    def _dataset_images(self, dataset_id: int, image_ids: Sequence[int]) -> list[ImageRecord]:
        rows = self._rows_in("SELECT * FROM images WHERE dataset_id = ? AND id IN ({})", (dataset_id,),
                             list(image_ids))
        if len(rows) != len(set(image_ids)):
            raise StoreError("some of the chosen images are no longer in this dataset: reload the page")
        return [_record(ImageRecord, row) for row in rows]

    def delete_images(self, dataset_id: int, image_ids: Sequence[int], by: str | None = None) -> int:
        """Remove single images (with their masks and thumbnails) from a dataset; returns how many."""
        images = self._dataset_images(dataset_id, image_ids)
        with self._connect() as conn:
            self._require_no_active_jobs(conn, dataset_id)
            conn.executemany("DELETE FROM images WHERE id = ?", [(i.id,) for i in images])
            _audit(conn, by, "delete images", f"dataset #{dataset_id}: " + ", ".join(i.path for i in images))
        folder = self.dataset_dir(dataset_id)
        _unlink_all(folder / rel for i in images for rel in (i.path, i.mask_path, i.thumb_path) if rel)
        return len(images)

    def move_images(self, dataset_id: int, image_ids: Sequence[int], split: str, defect: str,
                    by: str | None = None) -> int:
        """Move images to another split or defect type (relabel); returns how many moved.

        Training images are always good. A mask follows its image to another defect type and is dropped when
        the image becomes good. An image without a mask cannot become a defect image of a dataset whose
        defect images have masks (``load_dataset`` needs one for each), and the reverse.
        """
        defect = defect.strip()
        if split not in ("train", "test"):
            raise StoreError(f"split must be 'train' or 'test', got {split!r}")
        if split == "train" and defect != GOOD:
            raise StoreError("training images are normal: they can only be moved there as 'good'")
        if not DEFECT_NAME.match(defect):
            raise StoreError(f"'{defect}' is not a usable defect type name: {DEFECT_NAME_RULE}")
        images = [i for i in self._dataset_images(dataset_id, image_ids) if (i.split, i.defect) != (split, defect)]
        if defect != GOOD:
            moving = {i.id for i in images}
            staying = self._query("SELECT id, mask_path IS NOT NULL AS masked FROM images WHERE dataset_id = ? "
                                  "AND split = 'test' AND defect != ?", (dataset_id, GOOD))
            masked = {bool(i.mask_path) for i in images} | {bool(r["masked"]) for r in staying if r["id"] not in moving}
            if len(masked) > 1:
                raise StoreError("this dataset's defect images must all have masks or none have: an image "
                                 "without a mask cannot join masked ones (add it again with its mask), nor the "
                                 "other way round")
        folder = self.dataset_dir(dataset_id)
        target_dir = folder / split / defect
        target_dir.mkdir(parents=True, exist_ok=True)
        taken = {Path(name).stem for name in os.listdir(target_dir)}
        moves: list[tuple[ImageRecord, Path, Path | None]] = []
        done: list[tuple[Path, Path]] = []
        try:
            for image in images:
                target = _unique_path(target_dir / Path(image.path).name, image.sha256, taken)
                taken.add(target.stem)
                os.replace(folder / image.path, target)
                done.append((target, folder / image.path))
                mask_target = None
                if image.mask_path and defect != GOOD:
                    mask_target = folder / "ground_truth" / defect / f"{target.stem}_mask{Path(image.mask_path).suffix}"
                    mask_target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(folder / image.mask_path, mask_target)
                    done.append((mask_target, folder / image.mask_path))
                moves.append((image, target, mask_target))
            with self._connect() as conn:
                self._require_no_active_jobs(conn, dataset_id)
                for image, target, mask_target in moves:
                    conn.execute("UPDATE images SET split = ?, defect = ?, path = ?, mask_path = ? WHERE id = ?",
                                 (split, defect, target.relative_to(folder).as_posix(),
                                  mask_target.relative_to(folder).as_posix() if mask_target else None, image.id))
                _audit(conn, by, "move images", f"dataset #{dataset_id} to {split}/{defect}: "
                       + ", ".join(i.path for i in images))
        except BaseException as exc:
            for moved, original in reversed(done):  # put the files back: rows and files must agree
                os.replace(moved, original)
            if isinstance(exc, OSError):
                raise StoreError(f"nothing was moved: {exc.strerror or exc} ({exc.filename})") from exc
            raise
        # Masks of images that became good are no longer anybody's.
        _unlink_all(folder / i.mask_path for i, _, mask_target in moves if i.mask_path and mask_target is None)
        return len(moves)

    def defect_mask_state(self, dataset_id: int) -> bool | None:
        """Whether the dataset's defect images have masks: True, False, or None while it has none."""
        rows = self._query("SELECT mask_path IS NOT NULL AS masked FROM images "
                           "WHERE dataset_id = ? AND split = 'test' AND defect != ? LIMIT 1", (dataset_id, GOOD))
        return bool(rows[0]["masked"]) if rows else None

    def add_images(self, dataset_id: int, images: list[NewImage]) -> list[ImageRecord]:
        """Move staged images into the dataset folder and record them; returns the records added.

        A large import must not stall the jobs that write progress meanwhile, so the files move before any
        transaction (names checked against one listing of each folder) and the rows go in by short
        transactions of ``ROWS_PER_TRANSACTION``. An image whose hash the dataset gained meanwhile (another
        upload at the same moment) is not recorded and its files are taken back out; so are the files of rows
        not recorded because of an error.
        """
        self.get_dataset(dataset_id)
        folder = self.dataset_dir(dataset_id)
        stems: dict[Path, set[str]] = {}
        placed: list[tuple[NewImage, str, str | None, str, list[Path]]] = []
        try:
            for image in images:
                placed.append(self._place(folder, image, stems))
        except BaseException:
            _unlink_all(path for *_, files in placed for path in files)
            raise
        ids: list[int] = []
        for start in range(0, len(placed), ROWS_PER_TRANSACTION):
            chunk = placed[start:start + ROWS_PER_TRANSACTION]
            try:
                with self._connect() as conn:
                    if not conn.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone():
                        raise StoreError(f"dataset {dataset_id} was deleted during the import")
                    now, refused = time.time(), []
                    for image, rel_image, rel_mask, rel_thumb, files in chunk:
                        cursor = conn.execute(
                            "INSERT OR IGNORE INTO images (dataset_id, split, defect, path, mask_path, thumb_path, "
                            "sha256, bytes, width, height, source_name, added_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (dataset_id, image.split, image.defect, rel_image, rel_mask, rel_thumb, image.sha256,
                             image.bytes, image.width, image.height, image.source_name, now))
                        if cursor.rowcount:
                            ids.append(cursor.lastrowid)
                        else:  # the thumbnail is named by hash: it is the other copy's too, so it stays
                            refused += files[:-1]
            except BaseException:
                _unlink_all(path for *_, files in placed[start:] for path in files)
                raise
            _unlink_all(refused)
        return [record for start in range(0, len(ids), 500) for record in
                (_record(ImageRecord, row) for row in self._query(
                    f"SELECT * FROM images WHERE id IN ({','.join('?' * len(ids[start:start + 500]))})",
                    tuple(ids[start:start + 500])))]

    @staticmethod
    def _place(folder: Path, image: NewImage,
               stems: dict[Path, set[str]]) -> tuple[NewImage, str, str | None, str, list[Path]]:
        """Move one staged image (then its mask, then its thumbnail) into ``folder``: the image, the relative paths
        of each and the files moved. ``stems`` caches each folder's file stems across calls."""
        sub = folder / image.split / image.defect
        sub.mkdir(parents=True, exist_ok=True)
        if sub not in stems:
            stems[sub] = {Path(name).stem for name in os.listdir(sub)}
        target = _unique_path(sub / image.name, image.sha256, stems[sub])
        os.replace(image.staged, target)
        stems[sub].add(target.stem)
        moved = [target]
        rel_mask = None
        if image.staged_mask is not None:
            # load_dataset pairs masks by stem: ground_truth/<defect>/<stem>_mask.<ext>
            mask = folder / "ground_truth" / image.defect / f"{target.stem}_mask{image.mask_suffix}"
            mask.parent.mkdir(parents=True, exist_ok=True)
            os.replace(image.staged_mask, mask)
            moved.append(mask)
            rel_mask = mask.relative_to(folder).as_posix()
        thumb = folder / "thumbs" / f"{image.sha256}.jpg"
        thumb.parent.mkdir(exist_ok=True)
        os.replace(image.staged_thumb, thumb)
        moved.append(thumb)
        return image, target.relative_to(folder).as_posix(), rel_mask, thumb.relative_to(folder).as_posix(), moved

    # ------------------------------------------------------------------------------- jobs
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

    # ------------------------------------------------------------------------------- models
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

    # ---------------------------------------------------------------------- review (kdcore.scoring, kdcore.review)
    def map_file(self, model_id: int, sha256: str) -> Path:
        return self.root / "maps" / str(model_id) / f"{sha256}.npy"

    def upload_file(self, sha256: str, suffix: str) -> Path:
        return self.root / "uploads" / f"{sha256}{suffix}"

    def set_model_threshold(self, model_id: int, threshold: dict) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE models SET threshold = ? WHERE id = ?", (json.dumps(threshold), model_id))

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

    def _rows_in(self, sql: str, params: tuple, values: Sequence) -> list[sqlite3.Row]:
        """Run ``sql`` whose ``{}`` is an IN list, over ``values`` in chunks (SQLite limits bound parameters)."""
        rows = []
        for start in range(0, len(values), 500):
            chunk = values[start:start + 500]
            rows += self._query(sql.format(",".join("?" * len(chunk))), (*params, *chunk))
        return rows

    # ------------------------------------------------------------------------------- the worker lock
    @property
    def worker_lock_path(self) -> Path:
        return self.root / "worker.lock"

    @contextlib.contextmanager
    def hold_worker_lock(self, pid: int, wait_seconds: float = 3.0) -> Iterator[bool]:
        """Try to become the one worker of this directory; yields whether it succeeded.

        An flock dies with its process, so a killed worker never leaves a stale lock behind. It is retried for
        ``wait_seconds`` because ``worker_pid`` briefly takes a shared lock to look.
        """
        with open(self.worker_lock_path, "a+") as fh:
            deadline = time.monotonic() + wait_seconds
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        yield False
                        return
                    time.sleep(0.1)
            fh.seek(0)
            fh.truncate()
            fh.write(str(pid))
            fh.flush()
            try:
                yield True
            finally:
                fh.truncate(0)
                fcntl.flock(fh, fcntl.LOCK_UN)

    def worker_pid(self) -> int | None:
        """Pid of the worker holding the lock, or None if no worker is running."""
        try:
            fh = open(self.worker_lock_path, "r")
        except FileNotFoundError:
            return None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = fh.read().strip()
                return int(text) if text.isdigit() else -1  # -1: locked, pid not written yet
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None


class _JobGone(Exception):
    """Raised inside register_model's transaction to roll it back."""


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


def _unique_path(path: Path, sha256: str, taken_stems: set[str]) -> Path:
    """``path``, or ``<stem>_<hash prefix><suffix>`` when its folder has a file with that stem (``taken_stems``).

    Stems, not names, must be unique: load_dataset pairs images with masks by stem, so ``a.png`` and ``a.jpg``
    in one folder would share a mask.
    """
    if path.stem not in taken_stems:
        return path
    return path.with_name(f"{path.stem}_{sha256[:10]}{path.suffix}")


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
