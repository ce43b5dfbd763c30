"""What each kind of job computes, apart from where its inputs come from and where its results go.

The local executor (``kdcore.worker``) runs these against the data directory; the Ray executor
(``kdcore.ray_executor``) runs them on a cluster node against inputs shipped through Ray's object store. Both
report through a :class:`JobEvents` and record the outcome in the store the same way.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

REPORT_SECONDS = 1.0  # progress is reported, and the cancel flag read, at most this often


class JobEvents(Protocol):
    """Where a running job reports to."""

    log: logging.Logger

    def report(self, points: list[dict] = (), **fields) -> None:
        """Progress fields (stage, progress, epoch, epochs, loss, eta_seconds) and new loss-curve points."""

    def cancel_requested(self) -> bool:
        """Whether the job should stop."""


@dataclass
class TrainedModel:
    """A training's outcome: the saved model file and the record the store keeps of it."""

    file: Path
    record: dict


def train(dataset_dir: Path, method_name: str, params: dict, out_dir: Path, events: JobEvents) -> TrainedModel | None:
    """Train ``method_name`` on the dataset folder and save it under ``out_dir``; None when cancelled."""
    from kdcore import create_method, data

    dataset = data.load_dataset(dataset_dir)
    events.log.info(dataset.summary())
    for path, reason in dataset.skipped:
        events.log.warning("skipped %s: %s", path, reason)
    method = create_method(method_name, **params)
    events.report(stage="reading images")
    reporter = _TrainReporter(events)
    method.fit(dataset, progress=reporter.progress, should_stop=reporter.should_stop)
    if reporter.cancelled or events.cancel_requested():
        events.log.info("cancelled after %d step(s); no model saved", method.training_info["steps"])
        return None
    events.report(stage="saving model")
    return TrainedModel(method.save(out_dir / "model.pt"), {
        "method": method.name, "params": params, "teacher_weights": method.teacher_weights.as_dict(),
        "training": method.training_info, "calibration": method.calibration, "threshold": method.threshold})


def evaluate(dataset_dir: Path, model_file: Path, events: JobEvents) -> dict:
    """The model's metrics on the dataset's labelled test split (None where it has no good and defective test
    images) and on synthetic defects made from its hold-out normals (``kdcore.synthetic_check``)."""
    from kdcore import data, load
    from kdcore.evaluation import EVALUATION_KEYS, evaluate_model
    from kdcore.synthetic_check import synthetic_check

    method = load(model_file)
    dataset = data.load_dataset(dataset_dir)
    events.log.info(dataset.summary())
    if {sample.label for sample in dataset.test} == {0, 1}:
        events.report(stage="scoring test images")
        total = max(1, len(dataset.test))
        metrics = evaluate_model(method, dataset, on_chunk=lambda done: events.report(progress=done / total))
    else:
        events.log.info("no labelled good and defective test images: synthetic defects only")
        metrics = dict.fromkeys(EVALUATION_KEYS)
    events.report(stage="scoring synthetic defects")
    metrics.update(synthetic_check(method, dataset))
    events.log.info("metrics: %s", metrics)
    return metrics


def export(model_file: Path, threshold: dict | None, out_dir: Path, events: JobEvents) -> Path:
    """The model's export bundle (``kdcore.export``) with ``threshold``, zipped under ``out_dir``."""
    from kdcore.export import export_bundle

    events.report(stage="exporting to ONNX and checking it with onnxruntime")
    folder = export_bundle(model_file, out_dir / "bundle", threshold=threshold)
    events.report(stage="zipping the bundle")
    archive = Path(shutil.make_archive(str(out_dir / "bundle"), "zip", root_dir=folder))
    shutil.rmtree(folder)
    return archive


class _TrainReporter:
    """``fit``'s progress and should_stop callbacks, reporting at most every REPORT_SECONDS."""

    def __init__(self, events: JobEvents):
        self.events = events
        self.points: list[dict] = []
        self.cancelled = False
        self._last_report = self._last_cancel_check = 0.0

    def progress(self, p) -> None:  # p: kdcore.TrainProgress
        self.points.append({"step": p.step, "epoch": p.epoch, "loss": p.loss, "holdout_score": p.holdout_score,
                            "elapsed_seconds": p.elapsed_seconds})
        end_of_epoch = p.holdout_score is not None
        if end_of_epoch:
            self.events.log.info("epoch %d/%d: loss %.4g, mean hold-out score %.4g (%.0f s)",
                                 p.epoch, p.epochs, p.loss, p.holdout_score, p.elapsed_seconds)
        if end_of_epoch or p.step == p.total_steps or time.monotonic() - self._last_report >= REPORT_SECONDS:
            # NaN (no estimate yet) is stored as NULL by SQLite, which the pages show as "unknown".
            eta = p.eta_seconds if math.isfinite(p.eta_seconds) else None
            self.events.report(self.points, stage="training", progress=p.step / p.total_steps, epoch=p.epoch,
                               epochs=p.epochs, loss=p.loss, eta_seconds=eta)
            self.points = []
            self._last_report = time.monotonic()

    def should_stop(self) -> bool:
        if not self.cancelled and time.monotonic() - self._last_cancel_check >= REPORT_SECONDS:
            self.cancelled = self.events.cancel_requested()
            self._last_cancel_check = time.monotonic()
            if self.cancelled:
                self.events.log.info("cancel requested: stopping")
        return self.cancelled


