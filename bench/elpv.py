"""Build the second real benchmark set, solar cells of the PyPI package ``elpv-dataset``, in MVTec layout.

    pip download --no-deps elpv-dataset -d /tmp/elpv
    python -m bench.elpv /tmp/elpv/elpv_dataset-*.whl --out /tmp/elpv_mono [--type mono] [--train 400]

Normal: cells with defect probability 0; defective: probability 1 (the uncertain 1/3 and 2/3 are left out).
The normal cells are shuffled with a fixed seed; ``--train`` of them go to ``train/good``, the rest to
``test/good``. Image-level labels only (no masks).
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import zipfile
from pathlib import Path

LABELS = "elpv_dataset/data/labels.csv"


def build(wheel: Path, out: Path, cell_type: str, n_train: int, seed: int = 0) -> tuple[int, int, int]:
    """Write the set; returns the numbers of training, good test and defective test images."""
    with zipfile.ZipFile(wheel) as archive:
        rows = [line.split() for line in archive.read(LABELS).decode().splitlines() if line.strip()]
        chosen = [(path, float(probability)) for path, probability, kind in rows if kind == cell_type]
        good = sorted(path for path, probability in chosen if probability == 0.0)
        defective = sorted(path for path, probability in chosen if probability == 1.0)
        if len(good) <= n_train:
            raise SystemExit(f"only {len(good)} normal {cell_type} cells; --train must be smaller")
        random.Random(seed).shuffle(good)
        shutil.rmtree(out, ignore_errors=True)
        targets = [(path, "train/good" if i < n_train else "test/good") for i, path in enumerate(good)]
        targets += [(path, "test/defect") for path in defective]
        for path, folder in targets:
            destination = out / folder / Path(path).name
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(f"elpv_dataset/data/{path}"))
    return n_train, len(good) - n_train, len(defective)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--type", default="mono", choices=["mono", "poly"])
    parser.add_argument("--train", type=int, default=400)
    args = parser.parse_args(argv)
    n_train, n_good, n_defective = build(args.wheel, args.out, args.type, args.train)
    print(f"{args.out}: {n_train} train, {n_good} good and {n_defective} defective test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
