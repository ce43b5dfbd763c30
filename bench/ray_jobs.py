"""Cost of running jobs on Ray: one tiny training through the local executor against the same on a local Ray,
and two trainings one after the other against both at once on a local Ray of two CPUs.

    python -m bench.ray_jobs [--size 64] [--epochs 2] [--out bench/results]

Wall time from queueing to the job's end, as a user waits for it; the local Ray is started (and its start
timed) before any job.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import synthetic  # noqa: E402 - the tests' small textured set
from kdcore import ingest, ray_executor, worker  # noqa: E402
from kdcore.store import TRAIN, Store  # noqa: E402


def run_jobs(root: Path, params: dict, n: int, **worker_options) -> float:
    store = Store(root)
    dataset = store.list_datasets()[0]
    start = time.perf_counter()
    for _ in range(n):
        store.enqueue_job(TRAIN, "stpm", params, dataset.id)
    assert worker.run_worker(root, 0, **worker_options) == n
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    params = {"size": args.size, "epochs": args.epochs, "batch_size": 8}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        store = Store(root)
        ingest.import_folder(store, store.create_dataset("bench").id,
                             synthetic.make_dataset(Path(folder) / "source", size=args.size))
        local_one = run_jobs(root, params, 1)
        local_two = run_jobs(root, params, 2)
        start = time.perf_counter()
        ray_executor.connect(ray_executor.LOCAL)
        ray_start = time.perf_counter() - start
        ray_one = run_jobs(root, params, 1, ray_address="local", max_parallel=1)
        ray_two_serial = run_jobs(root, params, 2, ray_address="local", max_parallel=1)
        ray_two_parallel = run_jobs(root, params, 2, ray_address="local", max_parallel=2)
    result = {"params": params, "local_one_s": local_one, "local_two_in_a_row_s": local_two,
              "ray_start_s": ray_start, "ray_one_s": ray_one, "ray_two_in_a_row_s": ray_two_serial,
              "ray_two_at_once_s": ray_two_parallel}
    for key, value in result.items():
        print(f"{key:<22} {value if isinstance(value, dict) else f'{value:.1f}'}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ray_jobs.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
