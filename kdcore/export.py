"""Export bundles: a trained model as an ONNX graph plus everything the line side needs to run it without torch.

A bundle folder holds ``model.onnx`` (uint8 RGB images and their content boxes in; image-frame anomaly maps and
image scores out, normalisation and hold-out map normalisation inside the graph), ``manifest.json``
(preprocessing, threshold and verdict rule, calibration, identities and versions), ``parity.npz`` with the
``parity/`` images it came from (what the torch model produced, for ``predict.py --check``), the standalone
``predict.py`` with its helper modules (kdcore's own ``imaging``, ``visualize`` and ``verdicts``, copied, so the
images are prepared by the same code that trained the model and judged by the same rule), a ``README.md`` and a ``requirements.txt``.

The threshold stays outside the graph: QA can change it in the manifest (or with ``--threshold``) without
exporting again. Every export is checked with onnxruntime against the torch model before it is written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from kdcore import data
from kdcore.methods.base import AnomalyMethod, load
from kdcore.ops import to_image_frame

BUNDLE_FORMAT_VERSION = 1
FORMATS = ("onnx", "openvino")
OPSET = 18
PARITY_IMAGES = 4
# Export fails when onnxruntime's scores or maps differ from torch's by more than this fraction of their range.
PARITY_TOLERANCE = 1e-4
_BUNDLE_FILES = Path(__file__).with_name("bundle")


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why."""


class ExportedGraph(nn.Module):
    """Pixels in, maps and scores out: ``(uint8 N×S×S×3, int64 N×4 boxes) -> (N×S×S maps, N scores)``.

    The maps are the model's, normalised on the hold-out as ``predict`` does and brought to the image frame
    (the content box stretched to the square); the score is their maximum, so it equals ``predict``'s.
    """

    def __init__(self, method: AnomalyMethod):
        super().__init__()
        self.net = method.net
        size = method.config.size
        self.register_buffer("mean", method._mean.detach().cpu().view(1, 3, 1, 1).clone())
        self.register_buffer("std", method._std.detach().cpu().view(1, 3, 1, 1).clone())
        offset = torch.zeros(size, size) if method.map_offset is None else method.map_offset.detach().clone()
        self.register_buffer("map_offset", offset.float())
        scale = torch.as_tensor(method.map_scale, dtype=torch.float32)  # one number, or one per position
        self.register_buffer("map_scale", scale.expand(size, size).clone())

    def forward(self, image: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        maps = (self.net.anomaly_map(x)[:, 0].float() - self.map_offset) / self.map_scale
        maps = to_image_frame(maps, box)
        return maps, maps.amax(dim=(1, 2))


def export_bundle(model_path: str | Path, out_dir: str | Path, format: str = "onnx", batch: int | None = None,
                  parity_images: Sequence[str | Path] | None = None, threshold: dict | None = None) -> Path:
    """Write the bundle of the model file ``model_path`` into the new (or empty) folder ``out_dir``.

    ``batch`` fixes the graph's batch size (default: any). ``parity_images`` are the images whose torch results
    the bundle carries for ``--check``; by default the first few hold-out images of the model's dataset, or
    generated ones when that dataset is not on this machine. ``threshold`` (a ``set_threshold`` record, as the
    app's store keeps it) replaces the one saved in the model file.
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "openvino":
        raise ExportError("OpenVINO bundles are not built yet: export to ONNX (the default); OpenVINO and "
                          "onnxruntime's OpenVINO execution provider both read model.onnx")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ExportError(f"batch must be a positive integer, got {batch!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not an empty folder; choose a new one")
    method = load(model_path, device="cpu")
    method.config.precision = "fp32"  # the graph is float32; its reference must be too
    if threshold is not None:
        method.threshold = dict(threshold)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the bundle private to this user
    try:
        _write_bundle(method, Path(model_path), staging, batch, parity_images)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_bundle(method: AnomalyMethod, model_path: Path, folder: Path, batch: int | None,
                  parity_images: Sequence[str | Path] | None) -> None:
    parity_files = _write_parity_images(method, folder / "parity", parity_images)
    arrays, boxes = data.read_model_inputs(parity_files, method.config.size, method.config.resize)
    maps, scores = method.predict(method._model_input(arrays, boxes))
    graph_path = folder / "model.onnx"
    _export_onnx(method, graph_path, arrays, boxes, batch)
    _check_onnxruntime(graph_path, arrays, boxes, maps, scores, batch)
    np.savez_compressed(folder / "parity.npz", files=np.array([p.name for p in parity_files]), images=arrays,
                        boxes=boxes.astype(np.int64), maps=maps.astype(np.float32), scores=scores.astype(np.float32))
    shutil.copyfile(_BUNDLE_FILES / "predict.py", folder / "predict.py")
    shutil.copyfile(Path(data.__file__).with_name("imaging.py"), folder / "kdcore_imaging.py")
    for module in ("visualize", "verdicts"):
        shutil.copyfile(Path(data.__file__).with_name(f"{module}.py"), folder / f"kdcore_{module}.py")
    manifest = build_manifest(method, model_path, graph_path, batch)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "requirements.txt").write_text("".join(f"{name}=={_version(name)}\n"
                                                     for name in ("onnxruntime", "numpy", "pillow")))
    readme = (_BUNDLE_FILES / "README.md").read_text()
    (folder / "README.md").write_text(readme.format(method=method.name, size=method.config.size,
                                                    resize=method.config.resize, **_readme_fields(manifest)))


def _write_parity_images(method: AnomalyMethod, folder: Path, sources: Sequence[str | Path] | None) -> list[Path]:
    """Lossless 8-bit copies of the parity images in the bundle (so ``--check`` reads exactly these pixels)."""
    folder.mkdir()
    if sources is None:
        sources = _default_parity_sources(method)
    written = []
    for index, source in enumerate(sources):
        picture = data.open_upright(source) if not isinstance(source, np.ndarray) else None
        image = data.to_8bit(picture) if picture is not None else _generated_image(source)
        target = folder / f"{index:02d}.png"
        image.save(target)
        written.append(target)
    if not written:
        raise ExportError("no parity images: give at least one")
    return written


def _default_parity_sources(method: AnomalyMethod) -> list:
    root = method.training_info.get("dataset")
    if root:
        try:
            return list(data.load_dataset(root).holdout[:PARITY_IMAGES])
        except (data.DataError, OSError):
            pass  # the dataset lives on another machine: generated images still test the graph
    generator = np.random.default_rng(0)
    shapes = [(method.config.size, method.config.size), (method.config.size // 2, method.config.size),
              (method.config.size, method.config.size * 3 // 4)]
    return [generator.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _generated_image(array: np.ndarray):
    from PIL import Image
    return Image.fromarray(array)


def _export_onnx(method: AnomalyMethod, path: Path, arrays: np.ndarray, boxes: np.ndarray, batch: int | None) -> None:
    graph = ExportedGraph(method).eval()
    n = batch or 2  # an example batch above 1, so a dynamic batch is traced as such
    index = np.arange(n) % len(arrays)
    example = (torch.from_numpy(arrays[index]), torch.from_numpy(boxes[index].astype(np.int64)))
    dynamic = None
    if batch is None:
        batch_dim = torch.export.Dim("batch", min=1)
        dynamic = {"image": {0: batch_dim}, "box": {0: batch_dim}}
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The exporter warns that the two inputs share the batch axis, which is the intent.
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            program = torch.onnx.export(graph, example, dynamo=True, opset_version=OPSET,
                                        input_names=["image", "box"], output_names=["anomaly_map", "score"],
                                        dynamic_shapes=dynamic, external_data=False, verbose=False)
        program.save(str(path), external_data=False)
    except ExportError:
        raise
    except Exception as exc:  # the exporter's own errors name the operator that failed
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export of '{method.name}' failed: {detail}") from exc


def _check_onnxruntime(path: Path, arrays: np.ndarray, boxes: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                       batch: int | None) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_maps, got_scores = [], []
    step = batch or len(arrays)
    for start in range(0, len(arrays), step):
        index = np.arange(start, start + step) % len(arrays) if batch else np.arange(start, len(arrays))
        try:
            part_maps, part_scores = session.run(None, {"image": arrays[index], "box": boxes[index].astype(np.int64)})
        except Exception as exc:  # onnxruntime's errors have no common base class
            raise ExportError(f"onnxruntime cannot run the exported graph: {exc}") from exc
        keep = min(step, len(arrays) - start)
        got_maps.append(part_maps[:keep])
        got_scores.append(part_scores[:keep])
    for label, got, want in (("scores", np.concatenate(got_scores), scores), ("maps", np.concatenate(got_maps), maps)):
        worst = float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12)
        if worst > PARITY_TOLERANCE:
            raise ExportError(f"onnxruntime does not reproduce the torch model: its {label} differ by {worst:.2e} "
                              f"of their range (tolerance {PARITY_TOLERANCE:.0e}); nothing was written")


def build_manifest(method: AnomalyMethod, model_path: Path, graph_path: Path, batch: int | None) -> dict:
    config = method.config
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method.name,
        "parameters": {k: v for k, v in vars(config).items()},
        "teacher": {"backbone": config.backbone, **method.teacher_weights.as_dict()},
        "source_model": {"file": model_path.name, "sha256": _sha256(model_path)},
        "versions": {"kdcore": _kdcore_version(), "torch": str(torch.__version__), "onnx": _version("onnx"),
                     "onnxruntime": _version("onnxruntime"), "opset": OPSET},
        "graph": {
            "file": graph_path.name, "sha256": _sha256(graph_path), "batch": batch,
            "inputs": {
                "image": f"uint8 [N, {config.size}, {config.size}, 3], RGB, channels last, the prepared picture",
                "box": "int64 [N, 4]: top, left, height, width of the picture inside the square"},
            "outputs": {
                "anomaly_map": f"float32 [N, {config.size}, {config.size}]: the map of the picture alone, "
                               "stretched to the square (the image frame)",
                "score": "float32 [N]: the maximum of anomaly_map"},
            "inside": "scaling to [0, 1], mean/std normalisation, the network, hold-out map normalisation",
        },
        "preprocessing": {
            "steps": ["decode; apply EXIF orientation", "16-bit grey scaled to 8 bits (/257); palette and "
                      "alpha resolved to RGB; grey replicated to RGB after resizing",
                      "resize: " + ("scale the longer side to size, bilinear (Pillow), centre it and repeat "
                                    "the edge pixels into the margins" if config.resize == "letterbox" else
                                    "stretch to size×size, bilinear (Pillow)")],
            "size": config.size, "resize": config.resize, "interpolation": "bilinear (Pillow, antialiased)",
            "mean": [float(v) for v in method._mean.flatten()], "std": [float(v) for v in method._std.flatten()],
            "extensions": sorted(data.IMAGE_EXTENSIONS),
            "implementation": "kdcore_imaging.read_model_input(path, size, resize)",
        },
        "threshold": method.threshold,
        "verdict": "NG iff score > threshold.value",
        "calibration": method.calibration,
    }


def _readme_fields(manifest: dict) -> dict:
    threshold = manifest["threshold"]
    return {"threshold": f"{threshold['value']:.6g}", "threshold_mode": threshold["mode"],
            "kdcore": manifest["versions"]["kdcore"], "created": manifest["created_at"]}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _kdcore_version() -> str:
    from kdcore import __version__
    return __version__
