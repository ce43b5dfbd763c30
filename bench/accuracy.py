"""Train and evaluate methods on one dataset with the one evaluator; write a markdown table and a JSON file.

    python -m bench.accuracy --data ../shared/data/magnetic_tile [--methods stpm rd] [--size 256]
        [--epochs 20 | --epochs stpm=20 rd=40] [--batch-size 16] [--seed 0] [--out bench/results] [--trace]

Each method runs in its own process so that its peak memory (max RSS) is its own. Rows of other methods from
an earlier run with the same seed, size and data are kept in the table. The reference ``teacher_knn`` (the
teacher's features, no student) runs too unless the table has its row: every method's AUROCs and AU-PRO are
shown with their gain over it, F1-max beside the F1 of calling everything defective, and a second table gives
the image AUROC per defect type. ``--trace`` prints the test metrics and the synthetic-defect check (raw maps)
after every epoch, to diagnose budgets and the epoch selection; it never selects anything.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kdcore
from kdcore.registry import list_trainable_methods
from kdcore import data
from kdcore import metrics, synthetic_check
from kdcore.evaluation import evaluate_model, test_masks

from bench.memory import peak_rss_mib

REFERENCE = "teacher_knn"  # the teacher's own features, no student: every row shows its gain over this one
COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AU-PRO"),
           ("f1_max", "F1-max"), ("f1_all_defective", "F1 all-NG"), ("train_seconds", "train s"),
           ("seconds_per_epoch", "s/epoch"), ("images_per_second", "infer img/s"), ("peak_memory_mib", "peak MiB")]
# Columns whose difference to the reference row is printed beside the value.
GAIN_COLUMNS = ("image_auroc", "pixel_auroc", "aupro")


def _inference_rate(method, paths, batch_size: int = 32, repeats: int = 3) -> float:
    """Images per second from a preprocessed tensor to maps and scores (disk reading excluded); best of runs."""
    x = method.preprocess_paths(paths[:64])
    method.predict(x[:batch_size], batch_size)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        method.predict(x, batch_size)
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def _epoch_reporter(method, dataset, trace: bool):
    """Progress callback printing each epoch's loss and hold-out score; with ``trace`` also the test metrics
    of that epoch's network and its synthetic-defect check (``kdcore.synthetic_check``, on raw maps). The
    trace is a diagnosis of the selection rule and the budget: it never selects."""
    test = synthetic = None  # (input, labels, masks) of each, made at the first epoch's end and reused

    def report(p: kdcore.TrainProgress) -> None:
        nonlocal test, synthetic
        if p.holdout_score is None:  # only the report that ends an epoch
            return
        line = f"  epoch {p.epoch}/{p.epochs}: loss {p.loss:.4g}, hold-out mean score {p.holdout_score:.4g}, " \
               f"{p.elapsed_seconds:.0f} s"
        if trace:
            if test is None:
                test = (method.preprocess_paths([s.path for s in dataset.test]),
                        np.array([s.label for s in dataset.test]), test_masks(dataset, method.config.size))
                synthetic = synthetic_check.check_inputs(method, dataset)[:3]
            for label, (x, labels, masks) in (("test", test), ("synthetic", synthetic)):
                maps, scores = method._predict(x, 32)
                result = metrics.evaluate(labels, scores, masks, maps)
                line += f" | {label} image AUROC {result['image_auroc']:.3f}, " \
                        f"pixel AUROC {result['pixel_auroc'] or 0:.3f}"
        print(line, file=sys.stderr, flush=True)
    return report


def run_one(name: str, params: dict, data_dir: str, model_dir: Path, trace: bool = False) -> dict:
    dataset = data.load_dataset(data_dir)
    method = kdcore.create_method(name, **params)
    method.fit(dataset, progress=_epoch_reporter(method, dataset, trace))
    model_path = method.save(model_dir / f"{name}.pt")
    start = time.perf_counter()
    metrics = evaluate_model(method, dataset)
    info = method.training_info
    return {
        # US distils its teacher before the epochs: that counts as training time, not as time per epoch.
        "method": name, **metrics, "train_seconds": info["seconds"] + info.get("teacher", {}).get("seconds", 0),
        "seconds_per_epoch": info["seconds"] / info["epochs_run"] if info["epochs_run"] else None,
        "best_epoch": info["best_epoch"],
        "epochs_run": info["epochs_run"], "evaluate_seconds": time.perf_counter() - start,
        "images_per_second": _inference_rate(method, [s.path for s in dataset.test]),
        "peak_memory_mib": peak_rss_mib(),
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(method.config).items()},
        "teacher_weights": method.teacher_weights.as_dict(), "model": str(model_path),
    }


def _epochs_for(spec: list[str] | None, name: str) -> int | None:
    for item in spec or []:
        key, sep, value = item.partition("=")
        if not sep:
            return int(item)
        if key == name:
            return int(value)
    return None


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) and value < 10 else f"{value:.0f}"


def markdown_table(rows: list[dict]) -> str:
    """One row per method; AUROCs and AU-PRO with their gain over ``teacher_knn`` when it is among the rows."""
    reference = next((r for r in rows if r["method"] == REFERENCE), None)

    def cell(row, key):
        text = _fmt(row.get(key))
        if reference is not None and row is not reference and key in GAIN_COLUMNS \
                and row.get(key) is not None and reference.get(key) is not None:
            text += f" ({row[key] - reference[key]:+.3f})"
        return text
    lines = ["| method | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + r["method"] + " | " + " | ".join(cell(r, key) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def per_defect_table(rows: list[dict], key: str = "per_defect") -> str:
    """AUROC of each defect type (``key``: "per_defect" images against the good test images,
    "per_defect_pixel" pixels with the good images', "per_defect_localization" within its own images), one row per
    method."""
    defects = sorted({d for r in rows for d in r.get(key) or {}})
    if not defects:
        return ""
    lines = ["| method | " + " | ".join(defects) + " |", "|---" * (len(defects) + 1) + "|"]
    lines += ["| " + r["method"] + " | " + " | ".join(_fmt((r.get(key) or {}).get(d)) for d in defects)
              + " |" for r in rows]
    return "\n".join(lines)


def merge_results(path: Path, rows: list[dict], seed: int) -> list[dict]:
    """This run's rows plus the other methods' rows of an earlier run with the same seed, in method order.

    Methods are benchmarked one command at a time when the budget is short; the table keeps all of them.
    """
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return rows
    if earlier.get("seed") != seed:
        return rows
    fresh = {r["method"] for r in rows}
    kept = [r for r in earlier.get("results", []) if r.get("method") not in fresh and "error" not in r]
    return sorted(kept + rows, key=lambda r: r["method"])


def _has_reference(path: Path, seed: int) -> bool:
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return earlier.get("seed") == seed and any(r.get("method") == REFERENCE and "error" not in r
                                               for r in earlier.get("results", []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--methods", nargs="+", default=list_trainable_methods())
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", nargs="+", help="N for all, or NAME=N per method")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME.KEY=VALUE", help="extra method parameter")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--trace", action="store_true",
                        help="diagnosis: print the test metrics and the synthetic-defect check after every epoch "
                             "(slower; never used to select)")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = parser.parse_args(argv)
    out = Path(args.out)

    if args.single:
        params = json.loads(args.single)
        name = params.pop("method")
        print("RESULT " + json.dumps(run_one(name, params, args.data, out / "models", args.trace)), flush=True)
        return 0

    rows = []
    methods = list(args.methods)
    if REFERENCE not in methods and not _has_reference(out / f"accuracy_{Path(args.data).name}_{args.size}.json",
                                                       args.seed):
        methods.insert(0, REFERENCE)
    for name in methods:
        params = {"method": name, "size": args.size, "seed": args.seed, "device": args.device}
        if (epochs := _epochs_for(args.epochs, name)) is not None:
            params["epochs"] = epochs
        if args.batch_size:
            params["batch_size"] = args.batch_size
        for item in args.set:
            key, _, value = item.partition("=")
            target, _, param = key.partition(".")
            if target == name:
                params[param] = json.loads(value)
        print(f"== {name} {params}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "bench.accuracy", "--data", args.data, "--out", args.out,
                               "--single", json.dumps(params), *(["--trace"] if args.trace else [])], stdout=subprocess.PIPE, text=True)
        result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not result_lines:
            # The child's traceback went to stderr above.
            rows.append({"method": name, "error": f"exit status {proc.returncode}"})
            continue
        rows.append(json.loads(result_lines[-1][len("RESULT "):]))
        print(markdown_table([rows[-1]]), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    stem = f"accuracy_{Path(args.data).name}_{args.size}"
    rows = merge_results(out / f"{stem}.json", rows, args.seed)
    report = {"data": str(Path(args.data).resolve()), "size": args.size, "seed": args.seed,
              "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "results": rows}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    good = [r for r in rows if "error" not in r]
    table = markdown_table(good) + "\n\nImage AUROC per defect type (against the good test images):\n\n" \
        + per_defect_table(good)
    pixel_table = per_defect_table(good, "per_defect_pixel")
    if pixel_table:
        table += "\n\nPixel AUROC per defect type (its images' pixels with the good test images'):\n\n" + pixel_table
        table += ("\n\nLocalisation per defect type (its defect pixels against the same images' other pixels; 0.5: "
                  "none):\n\n" + per_defect_table(good, "per_defect_localization"))
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
