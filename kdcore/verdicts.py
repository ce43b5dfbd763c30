"""The verdict rule and its report, with the standard library only: kdcore's CLI and every export bundle's
``predict.py`` (which carries a copy of this file) write the same rows by the same rule."""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Iterable

OK, NG = "OK", "NG"


def verdict(score: float, threshold: float) -> str:
    """NG iff the score is above the threshold."""
    return NG if score > threshold else OK


def report(paths: Iterable[Path], scores: Iterable[float], threshold: float, csv_path: str | None,
           threshold_note: str = "") -> list[tuple[str, float, str]]:
    """``(path, score, verdict)`` rows, written to ``csv_path`` (header path,score,verdict) or printed, and a
    one-line summary on stderr."""
    rows = [(str(path), float(score), verdict(score, threshold)) for path, score in zip(paths, scores)]
    if csv_path:
        with open(csv_path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "score", "verdict"])
            writer.writerows(rows)
    else:
        for path, score, outcome in rows:
            print(f"{outcome}  {score:.5g}  {path}")
    n_ng = sum(row[2] == NG for row in rows)
    print(f"{len(rows)} images, {n_ng} NG at threshold {threshold:.5g}{threshold_note}", file=sys.stderr)
    return rows
