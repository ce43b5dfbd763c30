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

One class, ``Store``, serves all of it; its methods come by table, one module each (the records they return
in ``records``, the connection, schema and migrations in ``database``): ``datasets`` (datasets and images),
``jobs`` (the queue), ``models``, ``reviews`` (cached scores, inspections, QA marks, audit) and ``worker_lock``.

This package needs neither torch nor streamlit.
"""
from kdcore.store.database import (BUSY_TIMEOUT_SECONDS, DATA_DIR_ENV, DATABASE_FILE, DEFAULT_DATA_DIR, IDENTITY_FILE,
                                   MAX_BUSY_SECONDS, SCHEMA_VERSION, Database, default_data_dir, existing_data_dir)
from kdcore.store.datasets import ROWS_PER_TRANSACTION, DatasetTables
from kdcore.store.jobs import STALE_HEARTBEAT_SECONDS, JobTables
from kdcore.store.models import ModelTables
from kdcore.store.records import (ACTIVE_STATUSES, CANCELLED, DEFECT_NAME, DEFECT_NAME_RULE, DONE, EVALUATE, EXPORT,
                                  FAILED, GOOD, LANES, QUEUED, RUNNING, TRAIN, Dataset, ImageRecord, Inspection, Job,
                                  Model, NewImage, StoreError)
from kdcore.store.reviews import ReviewTables
from kdcore.store.worker_lock import WorkerLock

__all__ = ["ACTIVE_STATUSES", "BUSY_TIMEOUT_SECONDS", "CANCELLED", "DATABASE_FILE", "DATA_DIR_ENV", "DEFAULT_DATA_DIR",
           "DEFECT_NAME", "DEFECT_NAME_RULE", "DONE", "EVALUATE", "EXPORT", "FAILED", "GOOD", "IDENTITY_FILE", "LANES",
           "MAX_BUSY_SECONDS", "QUEUED", "ROWS_PER_TRANSACTION", "RUNNING", "SCHEMA_VERSION", "STALE_HEARTBEAT_SECONDS",
           "TRAIN", "Dataset", "ImageRecord", "Inspection", "Job", "Model", "NewImage", "Store", "StoreError",
           "default_data_dir", "existing_data_dir"]


class Store(DatasetTables, JobTables, ModelTables, ReviewTables, WorkerLock, Database):
    """The data directory ``root`` (default ``default_data_dir()``), created or opened and checked."""
