"""The Ray executor on a real local Ray (loopback only): jobs end to end, cancel, and a task killed mid-job."""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import threading

import pytest

import synthetic
from kdcore import ingest, worker
from kdcore.store import CANCELLED, DONE, EVALUATE, EXPORT, FAILED, RUNNING, TRAIN, Store
from test_worker import LONG, TINY, wait_for

# ray is in requirements.txt; it is imported only once the local Ray is set to loopback (``connect``).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")


def listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine, from /proc."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A":
                    address, port = local.split(":")
                    found.add((address, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with a tiny dataset, and this process connected to its own local Ray (checked: loopback only)."""
    from kdcore import ray_executor

    before = listening_sockets()
    ray_executor.connect(ray_executor.LOCAL)
    import ray

    try:
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        new = listening_sockets() - before
        assert new and {address for address, _ in new} <= LOOPBACK, new
        source = synthetic.make_dataset(tmp_path_factory.mktemp("source"), n_train=10, n_test_good=2,
                                        n_test_defect=2)
        store = Store(tmp_path_factory.mktemp("data"))
        dataset = store.create_dataset("synthetic")
        ingest.import_folder(store, dataset.id, source)
        yield store
    finally:
        ray.shutdown()


def test_train_evaluate_and_export_run_as_ray_tasks(store):
    dataset = store.list_datasets()[0]
    train = store.enqueue_job(TRAIN, "stpm", TINY, dataset.id)
    assert worker.run_worker(store.root, 0, ray_address="local") == 1
    trained = store.get_job(train.id)
    assert trained.status == DONE, trained.message
    assert trained.executor == "ray" and trained.node and store.job_points(train.id)  # progress came back
    assert "running on node" in store.job_log_tail(train.id)
    model = store.get_model(trained.model_id)
    evaluation = store.enqueue_job(EVALUATE, "stpm", {}, dataset.id, model_id=model.id)
    export = store.enqueue_job(EXPORT, "stpm", {}, dataset.id, model_id=model.id)
    assert worker.run_worker(store.root, 0, ray_address="local", max_parallel=2) == 2
    assert store.get_job(evaluation.id).status == DONE, store.get_job(evaluation.id).message
    assert store.get_job(export.id).status == DONE, store.get_job(export.id).message
    assert store.get_model(model.id).metrics["n_images"] == 6
    assert store.bundle_file(model).stat().st_size > 0


def test_cancel_and_a_killed_task_on_ray(store):
    dataset = store.list_datasets()[0]
    models_before = len(store.list_models())
    cancelled = store.enqueue_job(TRAIN, "stpm", LONG, dataset.id)
    killed = store.enqueue_job(TRAIN, "stpm", LONG, dataset.id)
    thread = threading.Thread(target=worker.run_worker, args=(store.root, 0),
                              kwargs={"ray_address": "local", "max_parallel": 2})
    thread.start()
    try:
        wait_for(lambda: store.get_job(cancelled.id).progress > 0, timeout=180, what="the first training to run")
        store.request_cancel(cancelled.id)
        wait_for(lambda: store.get_job(cancelled.id).status == CANCELLED, what="the cancel")
        pid = wait_for(lambda: re.search(r"running on node \S+, pid (\d+)", store.job_log_tail(killed.id)),
                       timeout=180, what="the second training to start")
        assert store.get_job(killed.id).status == RUNNING
        os.kill(int(pid.group(1)), signal.SIGKILL)  # the task's process dies mid-job, as with a lost node
        wait_for(lambda: store.get_job(killed.id).status == FAILED, what="the lost task to be noticed")
    finally:
        for job in (cancelled, killed):
            store.request_cancel(job.id)
        thread.join(timeout=120)
    assert "the Ray task was lost" in store.get_job(killed.id).message
    assert "no model" in store.get_job(cancelled.id).message
    assert len(store.list_models()) == models_before
