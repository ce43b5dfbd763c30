"""Running the worker's jobs as Ray tasks: ``python -m kdcore worker --ray ADDRESS``.

The worker stays the only writer of the SQLite store. For each job it claims it ships the inputs through Ray's
object store (the dataset folder as one zip, the model file as bytes), runs ``kdcore.jobs`` in a Ray task on
whichever node has room (one GPU per training when the cluster has GPUs, one CPU otherwise), and records the
outcome with the same functions as the local executor; the model file or bundle comes back as bytes. Progress
and log lines flow back through a Ray queue while the task runs. Cancel stops the task (``ray.cancel``); a
task whose process or node dies ends its job failed with Ray's reason. Nodes need kdcore and its requirements
installed, not the data directory.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kdcore import jobs
from kdcore.store import CANCELLED, EVALUATE, EXPORT, FAILED, TRAIN, Job, Store

LOCAL = "local"
ADDRESS_ENV = "KDCORE_RAY_ADDRESS"
_QUEUE_BATCH = 1000


def connect(address: str) -> None:
    """Join the Ray cluster at ``address``, or start a Ray of its own on this machine for ``"local"``."""
    if address == LOCAL:
        # Loopback only: by default Ray binds every interface and advertises the host's address. This switch
        # (read when ray is imported) is how Ray runs single-machine on macOS and Windows; it holds on Linux too.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no report to Ray's servers from a private run
    import ray

    if ray.is_initialized():  # a second worker run in the same process (tests) keeps the connection
        return
    if address == LOCAL:
        from ray._private import ray_constants
        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError("ray was imported before a local Ray could be limited to the loopback interface; "
                               "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing it")
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


# ------------------------------------------------------------------------------------------- on the node
class _QueueEvents:
    """``kdcore.jobs.JobEvents`` inside a Ray task: everything goes back to the worker through a Ray queue."""

    def __init__(self, queue, job_id: int):
        self.queue = queue
        self.log = logging.getLogger(f"kdcore.ray.job{job_id}")
        self.log.setLevel(logging.INFO)
        self.log.addHandler(_QueueLogHandler(queue))

    def report(self, points=(), **fields) -> None:
        self.queue.put(("progress", list(points), fields))

    def cancel_requested(self) -> bool:
        return False  # the worker cancels the whole task (ray.cancel)


class _QueueLogHandler(logging.Handler):
    def __init__(self, queue):
        super().__init__()
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record.levelno, record.getMessage()))


def run_task(kind: str, job_id: int, method: str, params: dict, threshold: dict | None,
             dataset_zip: bytes | None, model_bytes: bytes | None, queue) -> dict:
    """The body of a job's Ray task; returns its outcome as plain data (bytes for files)."""
    events = _QueueEvents(queue, job_id)
    queue.put(("started", socket.gethostname(), os.getpid()))
    with tempfile.TemporaryDirectory(prefix=f"kdcore-job-{job_id}-") as folder:
        folder = Path(folder)
        dataset_dir, model_file = folder / "dataset", folder / "model.pt"
        if dataset_zip is not None:
            with zipfile.ZipFile(io.BytesIO(dataset_zip)) as archive:  # made by the worker from its own store
                archive.extractall(dataset_dir)
        if model_bytes is not None:
            model_file.write_bytes(model_bytes)
        if kind == TRAIN:
            trained = jobs.train(dataset_dir, method, params, folder, events)
            return {"cancelled": True} if trained is None else \
                {"model": trained.file.read_bytes(), "record": trained.record}
        if kind == EVALUATE:
            return {"metrics": jobs.evaluate(dataset_dir, model_file, events)}
        return {"bundle": jobs.export(model_file, threshold, folder, events).read_bytes()}


# ------------------------------------------------------------------------------------------- in the worker
@dataclass
class _Running:
    job: Job
    ref: object  # the task's ObjectRef
    queue: object
    log: logging.Logger
    cancelling: bool = False


class RayExecutor:
    """Starts claimed jobs as Ray tasks and records them as they report and end; one per worker."""

    def __init__(self, store: Store, max_parallel: int | None = None):
        import ray

        self.store = store
        resources = ray.cluster_resources()
        self.has_gpus = resources.get("GPU", 0) > 0
        self.max_parallel = max_parallel or max(1, int(resources.get("CPU", 1)))
        self.running: dict[int, _Running] = {}

    def has_room(self) -> bool:
        return len(self.running) < self.max_parallel

    def start(self, job: Job, log: logging.Logger) -> None:
        import ray
        from ray.util.queue import Queue

        from kdcore.worker import require_dataset, require_model

        dataset_zip = model_bytes = threshold = None
        if job.kind in (TRAIN, EVALUATE):
            dataset_zip = ray.put(_zip_folder(self.store.dataset_dir(require_dataset(job))))
        if job.kind in (EVALUATE, EXPORT):
            model = require_model(self.store, job)
            model_bytes = ray.put(self.store.model_file(model).read_bytes())
            threshold = model.threshold if job.kind == EXPORT else None
        gpus = 1 if job.kind == TRAIN and self.has_gpus else 0
        queue = Queue()
        task = ray.remote(run_task).options(num_cpus=1, num_gpus=gpus, max_retries=0)
        ref = task.remote(job.kind, job.id, job.method, job.params, threshold, dataset_zip, model_bytes, queue)
        self.store.report_progress(job.id, stage="waiting for a Ray node with room")
        log.info("job %d submitted to Ray (%s GPU)", job.id, gpus)
        self.running[job.id] = _Running(job, ref, queue, log)

    def poll(self) -> None:
        """Forward every running job's events to the store, pass on cancels, record the jobs that ended."""
        import ray

        for run in list(self.running.values()):
            self._forward_events(run)
            if not run.cancelling and self.store.cancel_requested(run.job.id):
                run.cancelling = True
                run.log.info("cancel requested: stopping the Ray task")
                ray.cancel(run.ref, force=True)
            ready, _ = ray.wait([run.ref], timeout=0)
            if ready:
                del self.running[run.job.id]
                self._finish(run)

    def stop_all(self, reason: str) -> None:
        import ray

        from kdcore import worker

        for run in self.running.values():
            ray.cancel(run.ref, force=True)
            self.store.finish_job(run.job.id, FAILED, reason)
            worker.close_job_logger(run.log)
        self.running.clear()

    def _forward_events(self, run: _Running) -> None:
        try:
            events = run.queue.get_nowait_batch(min(run.queue.qsize(), _QUEUE_BATCH))
        except Exception:  # noqa: BLE001 - the queue actor is gone with a dead task: the task's end says why
            return
        for event in events:
            if event[0] == "progress":
                self.store.report_progress(run.job.id, event[1], **event[2])
            elif event[0] == "log":
                run.log.log(event[1], event[2])
            else:  # started
                self.store.report_progress(run.job.id, stage="starting", node=event[1])
                run.log.info("running on node %s, pid %d", event[1], event[2])
        if not events:
            self.store.heartbeat(run.job.id)

    def _finish(self, run: _Running) -> None:
        """Record how the job's task ended; whatever goes wrong fails that job, never the worker."""
        from kdcore import worker

        try:
            self._record(run)
        except Exception as exc:  # noqa: BLE001 - e.g. the model was deleted meanwhile
            run.log.exception("job %d could not be recorded", run.job.id)
            self.store.finish_job(run.job.id, FAILED, worker.describe_failure(exc))
        finally:
            worker.close_job_logger(run.log)

    def _record(self, run: _Running) -> None:
        import ray
        from kdcore import worker

        job, log = run.job, run.log
        try:
            outcome = ray.get(run.ref)
        except ray.exceptions.TaskCancelledError:
            self.store.finish_job(job.id, CANCELLED, "cancelled; no model was saved")
            return
        except ray.exceptions.RayTaskError as exc:  # the job's own error, raised on the node
            log.error("job %d failed on Ray: %s", job.id, exc)
            self.store.finish_job(job.id, FAILED, worker.describe_failure(exc.cause or exc))
            return
        except ray.exceptions.RayError as exc:  # Ray lost the task: its process or node died
            log.error("job %d lost on Ray: %s", job.id, exc)
            first_line = (str(exc).strip().splitlines() or [""])[0]
            self.store.finish_job(job.id, FAILED, f"the Ray task was lost ({type(exc).__name__}): {first_line}")
            return
        finally:
            self._forward_events(run)
            run.queue.shutdown()
        staging = self.store.make_tmp_dir(f"job-{job.id}-")
        try:
            if job.kind == TRAIN:
                trained = None
                if "model" in outcome:
                    (staging / "model.pt").write_bytes(outcome["model"])
                    trained = jobs.TrainedModel(staging / "model.pt", outcome["record"])
                worker.record_training(self.store, job, trained, log)
            elif job.kind == EVALUATE:
                worker.record_metrics(self.store, job, outcome["metrics"])
            else:
                (staging / "bundle.zip").write_bytes(outcome["bundle"])
                worker.record_bundle(self.store, job, staging / "bundle.zip", log)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _zip_folder(folder: Path) -> bytes:
    """The dataset folder as zip bytes (images are compressed already: stored, not deflated)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "thumbs" not in path.relative_to(folder).parts:
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()
