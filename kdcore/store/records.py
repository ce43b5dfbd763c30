"""What the store holds, as frozen records, and the names its rows use (statuses, job kinds, defect types)."""
from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

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


class StoreError(ValueError):
    """A request the store refuses; the message is meant for the user."""


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
