"""How fast the Compare page answers with five models on one image: first view, later views, slider moves.

    python -m bench.compare_speed [--size 256] [--methods stpm rd us dskd rd_expert] [--repeats 5]

Trains each method for one epoch on a small synthetic set (speed does not depend on how good the weights are)
into a temporary store, then drives pages/compare.py with Streamlit's AppTest, which runs the page script as
the server does (browser rendering and the network are not included). Reported, in seconds:

- first view: models loaded from disk and run on the image (nothing cached yet);
- later view: a whole rerun with everything cached (a reload, or a widget outside the viewer);
- slider move: one threshold moved, i.e. the viewer fragment recolouring five cached maps;
- slider move with the plotly detail view on.

Later figures are medians of ``--repeats``. Use OMP_NUM_THREADS to match the server's thread count.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic image generator the tests use

import synthetic  # noqa: E402
from kdcore import ingest, worker  # noqa: E402
from kdcore.store import TRAIN, Store  # noqa: E402

METHODS = ["stpm", "rd", "us", "dskd", "rd_expert"]


def trained_store(root: Path, methods: list[str], size: int, n_test: int = 4) -> Store:
    """A store whose one dataset has ``n_test`` test images or a few more (half good, the rest spread over the
    synthetic defect types) and one model per method, trained for one epoch."""
    n_defect = max(1, -(-(n_test - n_test // 2) // len(synthetic.DEFECT_TYPES)))
    source = synthetic.make_dataset(root / "source", n_train=10, n_test_good=max(1, n_test // 2),
                                    n_test_defect=n_defect, size=size)
    store = Store(root / "data")
    dataset = store.create_dataset("bench")
    ingest.import_folder(store, dataset.id, source)
    for method in methods:
        store.enqueue_job(TRAIN, method, {"size": size, "epochs": 1, "batch_size": 8}, dataset.id)
    worker.run_worker(store.root, idle_exit_seconds=0)
    trained = [model.method for model in store.list_models()]
    if len(trained) != len(methods):
        raise SystemExit(f"only {trained} trained; see the job logs in {store.root / 'jobs'}")
    return store


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, float]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600).run()
    results = {"first view": seconds(lambda: at.switch_page("pages/compare.py").run())}
    assert not at.exception and len(at.image) == len(at.slider), at.exception
    results["later view"] = statistics.median(seconds(at.run) for _ in range(repeats))
    slider = at.slider[0]
    low, high = slider.min, slider.max

    def move(i: int) -> None:
        at.slider(key=slider.key).set_value(low + (high - low) * (i % 10) / 10).run()

    results["slider move"] = statistics.median(seconds(lambda: move(i)) for i in range(repeats))
    at.toggle(key="compare_detail_on").set_value(True).run()
    results["slider move, detail view on"] = statistics.median(seconds(lambda: move(i)) for i in range(repeats))
    assert not at.exception, at.exception
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        store = trained_store(Path(tmp), args.methods, args.size)
        print(f"trained {len(args.methods)} models at {args.size} px in {time.perf_counter() - started:.0f} s")
        os.environ.update({"KDCORE_DATA_DIR": str(store.root), worker.AUTOSTART_ENV: "0"})
        for name, value in measure(args.repeats).items():
            print(f"{name:<30} {value:7.3f} s")


if __name__ == "__main__":
    main()
