"""Train and evaluate methods on one dataset with the one evaluator; write a markdown table and a JSON file.

    python -m bench.accuracy --data ../shared/data/magnetic_tile [--methods stpm rd] [--size 256]
        [--epochs 20 | --epochs stpm=20 rd=40] [--batch-size 16] [--seed 0] [--out bench/results]

Each method runs in its own process so that its peak memory (max RSS) is its own. Rows of other methods from
an earlier run with the same seed, size and data are kept in the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import kdcore
from kdcore import data
from kdcore.evaluation import evaluate_model, predict_paths

from bench.memory import peak_rss_mib

COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AU-PRO"),
           ("f1_max", "F1-max"), ("train_seconds", "train s"), ("seconds_per_epoch", "s/epoch"),
           ("images_per_second", "infer img/s"), ("peak_memory_mib", "peak MiB")]


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


def _report_epoch(p: kdcore.TrainProgress) -> None:
    if p.holdout_score is not None:  # the report that ends an epoch
        print(f"  epoch {p.epoch}/{p.epochs}: loss {p.loss:.4g}, hold-out mean score {p.holdout_score:.4g}, "
              f"{p.elapsed_seconds:.0f} s", file=sys.stderr, flush=True)


def run_one(name: str, params: dict, data_dir: str, model_dir: Path) -> dict:
    dataset = data.load_dataset(data_dir)
    method = kdcore.create_method(name, **params)
    method.fit(dataset, progress=_report_epoch)
    model_path = method.save(model_dir / f"{name}.pt")
    start = time.perf_counter()
    metrics = evaluate_model(method, dataset)
    info = method.training_info
    return {
        # US distils its teacher before the epochs: that counts as training time, not as time per epoch.
        "method": name, **metrics, "train_seconds": info["seconds"] + info.get("teacher", {}).get("seconds", 0),
        "seconds_per_epoch": info["seconds"] / info["epochs_run"], "best_epoch": info["best_epoch"],
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


def markdown_table(rows: list[dict]) -> str:
    def fmt(value):
        if value is None:
            return "n/a"
        return f"{value:.3f}" if isinstance(value, float) and value < 10 else f"{value:.0f}"
    lines = ["| method | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    lines += ["| " + r["method"] + " | " + " | ".join(fmt(r.get(key)) for key, _ in COLUMNS) + " |" for r in rows]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--methods", nargs="+", default=kdcore.list_methods())
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", nargs="+", help="N for all, or NAME=N per method")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME.KEY=VALUE", help="extra method parameter")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = parser.parse_args(argv)
    out = Path(args.out)

    if args.single:
        params = json.loads(args.single)
        name = params.pop("method")
        print("RESULT " + json.dumps(run_one(name, params, args.data, out / "models")), flush=True)
        return 0

    rows = []
    for name in args.methods:
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
                               "--single", json.dumps(params)], stdout=subprocess.PIPE, text=True)
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
    table = markdown_table([r for r in rows if "error" not in r])
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
