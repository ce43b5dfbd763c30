"""The job worker: a separate process that runs the store's queued training and evaluation jobs, one at a time.

Training never runs inside the Streamlit process: a widget click there interrupts the script, a page reload
drops its threads, and the app would share its memory with torch. Instead the app queues jobs in the store
and makes sure a worker is running (``ensure_worker``); the worker (``python -m kdcore worker``) claims the
oldest queued job, trains, and writes progress, loss, ETA, a heartbeat and a log to the store, which the pages
poll. One worker per data directory (an flock), so one job at a time: on a CPU-only machine two trainings
would only slow each other down.

A job that fails or is cancelled never touches ``models/``: the model is saved under ``tmp/`` and registered
(moved into place and recorded) only when training succeeded.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kdcore import jobs
from kdcore.store import (CANCELLED, DONE, EVALUATE, EXPORT, FAILED, LANES, TRAIN, Job, Store,
                          existing_data_dir)

POLL_SECONDS = 1.0  # how often an idle worker looks for queued jobs
HEARTBEAT_SECONDS = 5.0
APP_WORKER_IDLE_EXIT_SECONDS = 600.0  # a worker the app started frees its memory after 10 idle minutes
AUTOSTART_ENV = "KDCORE_WORKER_AUTOSTART"  # "0": the app never starts a worker (tests; a managed worker)
_PROJECT_ROOT = Path(__file__).resolve().parents[1]

logger = logging.getLogger("kdcore.worker")


class WorkerStopped(BaseException):
    """The worker process was asked to stop (SIGTERM) while running a job."""


# ------------------------------------------------------------------------------------------- the worker loop
def run_worker(data_dir: str | Path | None = None, idle_exit_seconds: float | None = None,
               ray_address: str | None = None, max_parallel: int | None = None) -> int:
    """Run queued jobs until idle for ``idle_exit_seconds`` (None: forever; 0: until the queue is empty).

    With ``ray_address`` (``"local"``: a Ray of its own on this machine) the jobs run as Ray tasks, up to
    ``max_parallel`` at once (default: the cluster's CPUs); otherwise in this process, one per lane.
    Returns the number of jobs run; 0 at once if another worker already serves this data directory.
    """
    store = Store(data_dir)
    pid = os.getpid()
    with store.hold_worker_lock(pid) as held:
        if not held:
            logger.info("another worker (pid %s) serves %s; exiting", store.worker_pid(), store.root)
            return 0
        for job in store.fail_orphaned_jobs():
            logger.warning("job %d was left running by a worker that is gone; marked failed", job.id)
        store.clean_tmp()
        logger.info("worker %d serving %s", pid, store.root)
        if ray_address:
            return _serve_on_ray(store, pid, idle_exit_seconds, ray_address, max_parallel)
        jobs_run, idle_since = 0, time.monotonic()
        running: dict[str, tuple[threading.Thread, Job]] = {}  # lane -> its job, run in a thread
        try:
            while True:
                for lane, kinds in LANES.items():
                    if lane in running and running[lane][0].is_alive():
                        continue
                    job = store.claim_next_job(pid, kinds=kinds)
                    running.pop(lane, None)
                    if job is not None:
                        # Daemon: a stopped worker exits at once; its jobs were marked failed below.
                        thread = threading.Thread(target=run_job, args=(store, job), name=f"job-{job.id}", daemon=True)
                        thread.start()
                        running[lane] = (thread, job)
                        jobs_run += 1
                if any(thread.is_alive() for thread, _ in running.values()):
                    idle_since = time.monotonic()
                elif _idle_long_enough(store, idle_since, idle_exit_seconds):
                    return jobs_run
                time.sleep(POLL_SECONDS)
        except BaseException as exc:  # stopped (signal, Ctrl-C): its running jobs end failed, with the reason
            for thread, job in running.values():
                if thread.is_alive():
                    store.finish_job(job.id, FAILED, describe_failure(exc))
            raise


def _idle_long_enough(store: Store, idle_since: float, idle_exit_seconds: float | None) -> bool:
    """Whether a worker with nothing running may exit: idle for ``idle_exit_seconds`` and nothing queued."""
    if idle_exit_seconds is None or time.monotonic() - idle_since < idle_exit_seconds or store.has_queued_jobs():
        return False
    logger.info("no queued jobs for %.0f s; exiting", idle_exit_seconds)
    return True


def _serve_on_ray(store: Store, pid: int, idle_exit_seconds: float | None, address: str,
                  max_parallel: int | None) -> int:
    from kdcore import ray_executor

    ray_executor.connect(address)
    executor = ray_executor.RayExecutor(store, max_parallel)
    logger.info("running jobs on Ray at %s, up to %d at once", address, executor.max_parallel)
    jobs_run, idle_since = 0, time.monotonic()
    try:
        while True:
            while executor.has_room() and (job := store.claim_next_job(pid, executor="ray", node="")) is not None:
                jobs_run += 1
                log = _job_logger(store, job.id)
                log.info("job %d: %s %s on dataset '%s' with %s", job.id, job.kind, job.method, job.dataset_name,
                         job.params)
                try:
                    executor.start(job, log)
                except Exception as exc:  # noqa: BLE001 - e.g. its dataset was deleted: the job fails, not the worker
                    log.exception("job %d could not start", job.id)
                    store.finish_job(job.id, FAILED, describe_failure(exc))
                    close_job_logger(log)
            executor.poll()
            if executor.running:
                idle_since = time.monotonic()
            elif _idle_long_enough(store, idle_since, idle_exit_seconds):
                return jobs_run
            time.sleep(POLL_SECONDS)
    except BaseException as exc:
        executor.stop_all(describe_failure(exc))
        raise


def run_job(store: Store, job: Job) -> None:
    """Run one claimed job to its end; every outcome, including a crash, is recorded in the store."""
    log = _job_logger(store, job.id)
    heartbeat = _Heartbeat(store, job.id, log)
    heartbeat.start()
    log.info("job %d: %s %s on dataset '%s' with %s", job.id, job.kind, job.method, job.dataset_name, job.params)
    try:
        _JOBS[job.kind](store, job, log)
    except BaseException as exc:  # also WorkerStopped/KeyboardInterrupt: record why, then let them end the worker
        log.exception("job %d failed", job.id)
        store.finish_job(job.id, FAILED, describe_failure(exc))
        if not isinstance(exc, Exception):
            raise
    finally:
        heartbeat.stop()
        close_job_logger(log)


def close_job_logger(log: logging.Logger) -> None:
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, (WorkerStopped, KeyboardInterrupt)):
        return "the worker process was stopped while the job was running"
    if isinstance(exc, (ValueError, FileNotFoundError)):  # DataError and bad parameters: the message says it all
        return str(exc)
    return f"{type(exc).__name__}: {exc} (see the job log)"


# ------------------------------------------------------------------------------------------- the jobs
class StoreEvents:
    """``kdcore.jobs.JobEvents`` of a job run by this process: straight into the store."""

    def __init__(self, store: Store, job_id: int, log: logging.Logger):
        self.store, self.job_id, self.log = store, job_id, log

    def report(self, points=(), **fields) -> None:
        self.store.report_progress(self.job_id, points, **fields)

    def cancel_requested(self) -> bool:
        return self.store.cancel_requested(self.job_id)


def _train(store: Store, job: Job, log: logging.Logger) -> None:
    staging = store.make_tmp_dir(f"job-{job.id}-")
    try:
        trained = jobs.train(store.dataset_dir(require_dataset(job)), job.method, job.params, staging,
                             StoreEvents(store, job.id, log))
        record_training(store, job, trained, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _evaluate(store: Store, job: Job, log: logging.Logger) -> None:
    model = require_model(store, job)
    metrics = jobs.evaluate(store.dataset_dir(require_dataset(job)), store.model_file(model),
                            StoreEvents(store, job.id, log))
    record_metrics(store, job, metrics)


def _export(store: Store, job: Job, log: logging.Logger) -> None:
    model = require_model(store, job)
    staging = store.make_tmp_dir(f"job-{job.id}-")
    try:
        # The threshold QA saved, which may differ from the one in the model file.
        archive = jobs.export(store.model_file(model), model.threshold, staging, StoreEvents(store, job.id, log))
        record_bundle(store, job, archive, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_JOBS = {TRAIN: _train, EVALUATE: _evaluate, EXPORT: _export}


# Recording outcomes: the same for jobs run here and on a Ray cluster.
def record_training(store: Store, job: Job, trained: "jobs.TrainedModel | None", log: logging.Logger) -> None:
    """Register the trained model (its file is moved into ``models/``), or finish the job as cancelled."""
    if trained is None:
        store.finish_job(job.id, CANCELLED, "cancelled; no model was saved")
        return
    model = store.register_model(job.id, trained.file, trained.record)
    if model is None:
        log.warning("job %d was ended meanwhile (cancelled or declared dead): model discarded", job.id)
    else:
        training = trained.record["training"]
        log.info("model %d saved: %.1f s of training, best epoch %d", model.id, training["seconds"],
                 training["best_epoch"])


def record_metrics(store: Store, job: Job, metrics: dict) -> None:
    store.set_model_metrics(job.model_id, {**metrics, "evaluated_at": time.time(), "job_id": job.id})
    summary = f"synthetic defects: image AUROC {metrics['synthetic_image_auroc']:.3f}"
    if metrics.get("image_auroc") is not None:
        summary = f"image AUROC {metrics['image_auroc']:.3f} on {metrics['n_images']} images; {summary}"
    store.finish_job(job.id, DONE, summary)


def record_bundle(store: Store, job: Job, archive: Path, log: logging.Logger) -> None:
    model = store.get_model(job.model_id)
    target = store.bundle_file(model)
    target.parent.mkdir(exist_ok=True)
    os.replace(archive, target)
    size_mb = target.stat().st_size / 1e6
    store.finish_job(job.id, DONE, f"bundle ready ({size_mb:.1f} MB) at threshold {model.threshold['value']:.4g}")
    log.info("bundle of model %d written to %s", model.id, target)


def require_dataset(job: Job) -> int:
    if job.dataset_id is None:
        raise ValueError(f"dataset '{job.dataset_name}' was deleted")
    return job.dataset_id


def require_model(store: Store, job: Job):
    if job.model_id is None:
        raise ValueError(f"the model to {job.kind} was deleted")
    return store.get_model(job.model_id)


class _Heartbeat(threading.Thread):
    """Proves the worker alive even during long steps without progress reports (reading data, hold-out)."""

    def __init__(self, store: Store, job_id: int, log: logging.Logger):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.store, self.job_id, self.log = store, job_id, log
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            # A failed write (e.g. the database busy beyond the store's patience) must not end the thread, or
            # a healthy job would later be declared dead: say so in the job log and try again next beat.
            try:
                self.store.heartbeat(self.job_id)
            except Exception as exc:  # noqa: BLE001 - any failure is retried the same way
                self.log.warning("heartbeat not written (%s: %s); retrying", type(exc).__name__, exc)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _job_logger(store: Store, job_id: int) -> logging.Logger:
    log = logging.getLogger(f"kdcore.worker.job{job_id}")
    handler = logging.FileHandler(store.job_log(job_id), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return log


# ------------------------------------------------------------------------------------------- app side
_spawn_lock = threading.Lock()
_spawned: subprocess.Popen | None = None  # the worker this process started, while it may still be starting


def autostart_enabled() -> bool:
    return os.environ.get(AUTOSTART_ENV, "1") != "0"


def ensure_worker(store: Store) -> int | None:
    """What the app calls on every page view: fail orphaned jobs, start a worker if jobs wait for one.

    Returns the worker's pid (-1 while it is starting up), or None when none runs.
    """
    global _spawned
    store.fail_orphaned_jobs()
    pid = store.worker_pid()
    if pid is not None or not store.has_queued_jobs() or not autostart_enabled():
        return pid
    with _spawn_lock:
        # A worker takes seconds to import torch before it takes the lock; don't start a second meanwhile.
        if _spawned is None or _spawned.poll() is not None:
            _spawned = start_worker_process(store)
        return -1


def start_worker_process(store: Store) -> subprocess.Popen:
    """A detached ``python -m kdcore worker``: its own session, so it outlives the app and keeps training."""
    with open(store.root / "worker.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kdcore", "worker", "--data-dir", str(store.root),
             "--idle-exit", str(APP_WORKER_IDLE_EXIT_SECONDS)],
            cwd=_PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)


# ------------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="the app's data directory (default: $KDCORE_DATA_DIR or ./kdcore_data)")
    parser.add_argument("--ray", metavar="ADDRESS", default=os.environ.get("KDCORE_RAY_ADDRESS"),
                        help="run jobs as tasks on the Ray cluster at ADDRESS ('local': start a Ray on this machine, "
                             "loopback only); default $KDCORE_RAY_ADDRESS, else in this process")
    parser.add_argument("--max-parallel", type=int, metavar="N",
                        help="with --ray: at most N jobs at once (default: the cluster's CPUs)")
    parser.add_argument("--create", action="store_true",
                        help="start a new, empty data directory when there is none at --data-dir")
    parser.add_argument("--idle-exit", type=float, metavar="SECONDS",
                        help="exit after this long without jobs (default: run until stopped; 0: drain the queue)")


def command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def stop(signum, frame):
        raise WorkerStopped(f"signal {signum}")

    # A mistyped path would otherwise start an empty store and wait there forever for jobs.
    root = args.data_dir if args.create else existing_data_dir(args.data_dir, "pass --create to start a new one there")
    signal.signal(signal.SIGTERM, stop)
    try:
        run_worker(root, args.idle_exit, ray_address=args.ray, max_parallel=args.max_parallel)
    except (WorkerStopped, KeyboardInterrupt):
        logger.info("worker stopped")
    return 0
