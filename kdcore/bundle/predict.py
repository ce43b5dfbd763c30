"""Score images with this exported kdcore model. Needs onnxruntime, numpy and Pillow only.

    python predict.py IMAGES_OR_FOLDERS... [--csv out.csv] [--heatmaps DIR] [--threshold T] [--check]

Prints (or writes to --csv) ``path,score,verdict`` rows; an image is NG iff its score > the threshold, which
is manifest.json's saved threshold unless --threshold is given. --heatmaps writes one overlay PNG per image.
--check first verifies the bundle against the vectors the torch model produced at export (parity.npz) and
exits 1 on a mismatch; with no images it only checks. Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kdcore_imaging as imaging  # noqa: E402 - the bundle's own copy, found next to this script
import kdcore_verdicts as verdicts  # noqa: E402
import kdcore_visualize as visualize  # noqa: E402

SUPPORTED_FORMAT = 1
# Relative tolerance of --check: scores and maps against the torch model's, as a fraction of their range.
PARITY_TOLERANCE = 1e-4


class BundleError(Exception):
    """A problem the user can act on; printed as one line."""


class Bundle:
    """The exported graph with the preprocessing and verdict rule its manifest states."""

    def __init__(self, folder: Path = HERE):
        import onnxruntime

        self.folder = folder
        self.manifest = json.loads((folder / "manifest.json").read_text())
        if self.manifest.get("format_version") != SUPPORTED_FORMAT:
            raise BundleError(f"bundle format {self.manifest.get('format_version')!r} is not {SUPPORTED_FORMAT}")
        graph = self.manifest["graph"]
        model_path = folder / graph["file"]
        digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
        if digest != graph["sha256"]:
            raise BundleError(f"{model_path.name} does not match the manifest's sha256 (file changed or damaged)")
        self.session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self.batch = graph["batch"]  # None: any batch size
        preprocessing = self.manifest["preprocessing"]
        self.size, self.resize = preprocessing["size"], preprocessing["resize"]
        self.extensions = set(preprocessing["extensions"])

    def prepare(self, path: Path) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        return imaging.read_model_input(path, self.size, self.resize)

    def run(self, images: np.ndarray, boxes: np.ndarray, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """uint8 N×S×S×3 images and N×4 boxes → maps N×S×S (image frame) and scores N."""
        step = self.batch or chunk
        maps, scores = [], []
        for start in range(0, len(images), step):
            part_images, part_boxes = images[start:start + step], boxes[start:start + step]
            n = len(part_images)
            if self.batch and n < self.batch:  # a fixed-batch graph: fill with copies, keep the real rows
                fill = np.arange(self.batch) % n
                part_images, part_boxes = part_images[fill], part_boxes[fill]
            part_maps, part_scores = self.session.run(
                ["anomaly_map", "score"], {"image": part_images, "box": part_boxes.astype(np.int64)})
            maps.append(part_maps[:n])
            scores.append(part_scores[:n])
        return np.concatenate(maps), np.concatenate(scores)

    def check(self) -> list[str]:
        """Differences between this runtime and the torch model's parity vectors; empty when it reproduces them."""
        expected = np.load(self.folder / "parity.npz")
        problems = []
        for name, stored in zip(expected["files"], expected["images"]):
            prepared, _ = self.prepare(self.folder / "parity" / str(name))
            if not np.array_equal(prepared, stored):
                problems.append(f"preprocessing of parity/{name} differs by up to "
                                f"{np.abs(prepared.astype(int) - stored).max()} grey levels (Pillow version?)")
        maps, scores = self.run(expected["images"], expected["boxes"])
        for label, got, want in (("score", scores, expected["scores"]), ("map", maps, expected["maps"])):
            scale = max(float(np.abs(want).max()), 1e-12)
            worst = float(np.abs(got - want).max()) / scale
            if worst > PARITY_TOLERANCE:
                problems.append(f"{label}s differ from the torch model's by {worst:.2e} of their range "
                                f"(tolerance {PARITY_TOLERANCE:.0e})")
        return problems


def expand(items: list[str], extensions: set[str]) -> list[Path]:
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        elif path.is_file():
            paths.append(path)
        else:
            raise BundleError(f"no such file or folder: {path}")
    return paths


def score_images(bundle: Bundle, paths: list[Path]) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Maps and scores of the readable images; unreadable ones are reported on stderr and skipped."""
    read, arrays, boxes = [], [], []
    for path in paths:
        try:
            array, box = bundle.prepare(path)
        except imaging.DataError as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        read.append(path)
        arrays.append(array)
        boxes.append(box)
    if not read:
        raise BundleError("no readable images among the given paths")
    maps, scores = bundle.run(np.stack(arrays), np.array(boxes, dtype=np.int64))
    return read, maps, scores


def write_heatmaps(bundle: Bundle, paths: list[Path], maps: np.ndarray, threshold: float, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    calibration = bundle.manifest["calibration"]
    for path, anomaly_map in zip(paths, maps):
        shown = visualize.normalize(anomaly_map, threshold, calibration["min"], calibration["max"])
        image, _ = imaging.read_model_input(path, bundle.size, "stretch")  # the image frame the maps are in
        Image.fromarray(visualize.overlay(image, shown)).save(folder / f"{path.stem}_heatmap.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="image files or folders of images")
    parser.add_argument("--csv", help="write path,score,verdict rows here instead of printing them")
    parser.add_argument("--heatmaps", help="folder for heatmap overlays")
    parser.add_argument("--threshold", type=float, help="override the manifest's threshold")
    parser.add_argument("--check", action="store_true", help="verify the bundle against its parity vectors")
    args = parser.parse_args(argv)
    try:
        bundle = Bundle()
        if args.check:
            problems = bundle.check()
            for problem in problems:
                print(f"parity check failed: {problem}", file=sys.stderr)
            if problems:
                return 1
            print("parity check passed", file=sys.stderr)
            if not args.paths:
                return 0
        if not args.paths:
            raise BundleError("give image files or folders (or --check)")
        threshold = bundle.manifest["threshold"]["value"] if args.threshold is None else args.threshold
        paths, maps, scores = score_images(bundle, expand(args.paths, bundle.extensions))
        verdicts.report(paths, scores, threshold, args.csv)
        if args.heatmaps:
            write_heatmaps(bundle, paths, maps, threshold, Path(args.heatmaps))
        return 0
    except (BundleError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
