"""Does the synthetic-defect check predict the real thing? Rank agreement between it and the real test set.

    python -m bench.synthetic_vs_real --data ../shared/data/magnetic_tile --models bench/results/models/*.pt
        [--out bench/results]

For models trained on one dataset (e.g. by ``bench.accuracy``), each is scored by the synthetic check
(``kdcore.synthetic_check``, made from the dataset's normal hold-out only) and by the one evaluator on the real
labelled test split. Reported per metric pair (image AUROC, pixel AUROC, AU-PRO): Spearman's rho over the
models, and whether the model the synthetic check ranks first is the real best (and the real rank of its
pick). Writes ``<out>/synthetic_vs_real_<data>.{md,json}``. A set with image labels only (no masks) compares
the image AUROCs alone.

With few models a rank correlation is coarse: with five, rho moves in steps of 0.1 and only rho >= 0.9 has a
one-sided p below 0.05. Read it as evidence on this set, not as a property of the check.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import kdcore
from kdcore import data
from kdcore.evaluation import evaluate_model
from kdcore.synthetic_check import synthetic_check

PAIRS = (("image_auroc", "synthetic_image_auroc"), ("pixel_auroc", "synthetic_pixel_auroc"),
         ("aupro", "synthetic_aupro"))


def agreement(real: list[float], synthetic: list[float]) -> dict:
    """Spearman's rho of two scorings of the same models, and how the synthetic favourite fares for real."""
    real_order = np.argsort(-np.asarray(real), kind="stable")
    pick = int(np.argmax(synthetic))
    rho = spearmanr(real, synthetic).statistic if len(real) > 2 else None
    return {"spearman_rho": None if rho is None or np.isnan(rho) else float(rho),
            "synthetic_pick_is_real_best": bool(pick == real_order[0]),
            "real_rank_of_synthetic_pick": int(np.nonzero(real_order == pick)[0][0]) + 1,
            "real_loss_of_synthetic_pick": float(max(real) - real[pick])}


def model_row(path: Path, dataset: data.AnomalyDataset) -> dict:
    method = kdcore.load(path)
    real = evaluate_model(method, dataset) if dataset.test else {}
    row = {"model": path.name, "method": method.name, **synthetic_check(method, dataset)}
    row.update({key: real.get(key) for key, _ in PAIRS})
    row.update({key: real[key] for key in ("per_defect", "per_defect_pixel") if key in real})
    print(f"{method.name}: " + ", ".join(f"{k} {row[k]:.3f}" for pair in PAIRS for k in pair
                                         if row.get(k) is not None), flush=True)
    return row


def report(rows: list[dict]) -> dict:
    result = {}
    for real_key, synthetic_key in PAIRS:
        scored = [r for r in rows if r.get(real_key) is not None and r.get(synthetic_key) is not None]
        if len(scored) >= 2:
            result[real_key] = {"n_models": len(scored), **agreement([r[real_key] for r in scored],
                                                                    [r[synthetic_key] for r in scored])}
    return result


def markdown(rows: list[dict], summary: dict) -> str:
    keys = [k for pair in PAIRS for k in pair if any(r.get(k) is not None for r in rows)]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['method']} | " + " | ".join("n/a" if r.get(k) is None else f"{r[k]:.3f}" for k in keys) + " |"
              for r in rows]
    lines += ["", "| real metric | models | Spearman rho | synthetic pick is the real best | its real rank | "
                  "its real loss |", "|---|---|---|---|---|---|"]
    for key, s in summary.items():
        rho = "n/a" if s["spearman_rho"] is None else f"{s['spearman_rho']:.2f}"
        lines.append(f"| {key} | {s['n_models']} | {rho} | {'yes' if s['synthetic_pick_is_real_best'] else 'no'} | "
                     f"{s['real_rank_of_synthetic_pick']} | {s['real_loss_of_synthetic_pick']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", nargs="+", required=True, help="model files trained on --data")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    dataset = data.load_dataset(args.data)
    rows = [model_row(Path(path), dataset) for path in args.models]
    summary = report(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"synthetic_vs_real_{Path(args.data).name}"
    (out / f"{stem}.json").write_text(json.dumps({"data": str(Path(args.data).resolve()), "models": rows,
                                                  "agreement": summary}, indent=2) + "\n")
    table = markdown(rows, summary)
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
