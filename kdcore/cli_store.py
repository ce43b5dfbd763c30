"""Command line on the app's data directory: ``python -m kdcore datasets ...`` and ``python -m kdcore jobs ...``.

The same store, rules and messages as the web app's pages, so that engineers can script what they click and CI
can drive it. Every command takes ``--data-dir`` (default ``$KDCORE_DATA_DIR`` or ``./kdcore_data``); errors
are one line and exit 2 (``kdcore.cli.main``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kdcore import ingest
from kdcore.store import (ACTIVE_STATUSES, DONE, EVALUATE, GOOD, TRAIN, Job, Store, StoreError,
                          existing_data_dir)

WAIT_POLL_SECONDS = 1.0


def add_parsers(sub) -> None:
    datasets = sub.add_parser("datasets", help="datasets of the app's data directory")
    datasets_sub = datasets.add_subparsers(dest="action", required=True)
    create = datasets_sub.add_parser("create", help="a new dataset from a folder or a zip")
    create.add_argument("name")
    create.add_argument("--from", dest="source", required=True,
                        help="an MVTec-layout folder, a plain folder of normal images, or a zip of either")
    create.set_defaults(run=cmd_datasets_create, create_store=True)
    listing = datasets_sub.add_parser("list", help="the datasets and their image counts")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_datasets_list)

    jobs = sub.add_parser("jobs", help="queue, list, cancel and wait for the worker's jobs")
    jobs_sub = jobs.add_subparsers(dest="action", required=True)
    train = jobs_sub.add_parser("train", help="queue a training; prints the job id")
    train.add_argument("--dataset", required=True, help="dataset name")
    train.add_argument("--method", required=True)
    train.add_argument("--size", type=int)
    train.add_argument("--epochs", type=int, help="default: the method's own for the device it runs on")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="method parameter, e.g. --set lr=0.1")
    train.set_defaults(run=cmd_jobs_train)
    evaluate = jobs_sub.add_parser("evaluate", help="queue an evaluation of a model; prints the job id")
    evaluate.add_argument("model_id", type=int)
    evaluate.set_defaults(run=cmd_jobs_evaluate)
    listing = jobs_sub.add_parser("list", help="the jobs, newest first")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_jobs_list)
    cancel = jobs_sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id", type=int)
    cancel.set_defaults(run=cmd_jobs_cancel)
    wait = jobs_sub.add_parser("wait", help="wait for a job: exit 0 when done, 1 when failed or cancelled")
    wait.add_argument("job_id", type=int)
    wait.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 2)")
    wait.set_defaults(run=cmd_jobs_wait)

    for command in (create, datasets_sub.choices["list"], train, evaluate, listing, cancel, wait):
        command.add_argument("--data-dir", help="default: $KDCORE_DATA_DIR or ./kdcore_data")


def open_store(args: argparse.Namespace) -> Store:
    """The data directory's store; only ``datasets create`` starts a new one (a typo must not)."""
    if getattr(args, "create_store", False):
        return Store(args.data_dir)
    return Store(existing_data_dir(args.data_dir, "create a dataset there first"))


# ------------------------------------------------------------------------------------------- datasets
def cmd_datasets_create(args: argparse.Namespace) -> int:
    store = open_store(args)
    source = Path(args.source).expanduser()
    if not source.exists():
        raise StoreError(f"no such folder or zip: {source}")
    dataset = store.create_dataset(args.name)
    try:
        if source.is_file():
            report = ingest.import_zip(store, dataset.id, source)
        else:
            report = ingest.import_folder(store, dataset.id, source)
    except BaseException:
        store.delete_dataset(dataset.id)  # a refused source leaves no empty dataset behind
        raise
    for name, reason in report.problems:
        print(f"not added: {name}: {reason}", file=sys.stderr)
    for name, existing in report.duplicates:
        print(f"duplicate: {name} (same as {existing})", file=sys.stderr)
    if not report.added:
        store.delete_dataset(dataset.id)
        raise StoreError(f"nothing was added from {source}: no usable images (see the lines above)")
    print(f"dataset '{dataset.name}' (id {dataset.id}): {report.summary()}")
    return 0


def dataset_rows(store: Store) -> list[dict]:
    rows = []
    for dataset in store.list_datasets():
        counts = store.dataset_counts(dataset.id)
        rows.append({"id": dataset.id, "name": dataset.name, "train": counts.get(("train", GOOD), 0),
                     "test_good": counts.get(("test", GOOD), 0),
                     "test_defective": sum(n for (split, defect), n in counts.items()
                                           if split == "test" and defect != GOOD),
                     "created_at": dataset.created_at})
    return rows


def cmd_datasets_list(args: argparse.Namespace) -> int:
    rows = dataset_rows(open_store(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':>4}  {'train':>6}  {'test good':>9}  {'defective':>9}  name")
    for row in rows:
        print(f"{row['id']:>4}  {row['train']:>6}  {row['test_good']:>9}  {row['test_defective']:>9}  {row['name']}")
    return 0


# ------------------------------------------------------------------------------------------- jobs
def cmd_jobs_train(args: argparse.Namespace) -> int:
    from kdcore.cli import parse_settings
    from kdcore.registry import check_params

    store = open_store(args)
    dataset = store.get_dataset_by_name(args.dataset)
    params = {key: value for key, value in (("size", args.size), ("epochs", args.epochs)) if value is not None}
    params.update(parse_settings(args.set))
    check_params(args.method, params)  # before queueing, as the Train page does
    job = store.enqueue_job(TRAIN, args.method, params, dataset.id)
    print(job.id)
    return 0


def cmd_jobs_evaluate(args: argparse.Namespace) -> int:
    store = open_store(args)
    model = store.get_model(args.model_id)
    blocker = store.evaluation_blocker(model)
    if blocker:
        raise StoreError(f"model {model.id} cannot be evaluated: {blocker}")
    print(store.enqueue_job(EVALUATE, model.method, {}, model.dataset_id, model_id=model.id).id)
    return 0


def job_row(job: Job) -> dict:
    return {"id": job.id, "kind": job.kind, "status": job.status, "method": job.method, "dataset": job.dataset_name,
            "model_id": job.model_id, "error": job.message if job.status == "failed" else None,
            "executor": job.executor, "node": job.node}


def cmd_jobs_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    store.fail_orphaned_jobs()  # a job whose worker died shows as failed, as in the app
    jobs = store.list_jobs(limit=1000)
    if args.json:
        print(json.dumps([job_row(job) for job in jobs], indent=2))
        return 0
    print(f"{'id':>5}  {'kind':<8}  {'status':<9}  {'method':<11}  dataset")
    for job in jobs:
        line = f"{job.id:>5}  {job.kind:<8}  {job.status:<9}  {job.method:<11}  {job.dataset_name}"
        if job.status == "queued":
            line += f"  (place {store.queue_position(job)} in the queue)"
        elif job.message:
            line += f"  · {job.message}"
        print(line)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    job = open_store(args).request_cancel(args.job_id)
    state = "cancelled" if job.status == "cancelled" else \
        "cancel requested: the worker stops it after its current step" if job.active else f"already {job.status}"
    print(f"job {job.id}: {state}")
    return 0


def cmd_jobs_wait(args: argparse.Namespace) -> int:
    store = open_store(args)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    warned = False
    while True:
        store.fail_orphaned_jobs()
        job = store.get_job(args.job_id)
        if job.status not in ACTIVE_STATUSES:
            print(f"job {job.id}: {job.status}" + (f" · {job.message}" if job.message else ""))
            return 0 if job.status == DONE else 1
        if not warned and store.worker_pid() is None:
            print("no worker is running: start one with 'python -m kdcore worker' (or open the app)", file=sys.stderr)
            warned = True
        if deadline is not None and time.monotonic() >= deadline:
            raise StoreError(f"job {job.id} is still {job.status} after {args.timeout:g} s")
        time.sleep(WAIT_POLL_SECONDS)
