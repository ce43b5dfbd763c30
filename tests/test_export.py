"""Export bundles: every method's bundle reproduces ``python -m kdcore predict`` with onnxruntime alone."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import one_torch_thread
from kdcore import create_method, worker
from kdcore.registry import list_trainable_methods
from kdcore.cli import main
from kdcore.export import ExportError, export_bundle
from kdcore.store import DONE, EXPORT, TRAIN, Store

SMALL = {"size": 64, "epochs": 1, "batch_size": 8}
# US distils its patch teacher first; its CPU preset's 3000 steps would add minutes to a shape check.
SMALL_PER_METHOD = {"us": {"teacher_steps": 500}}
# Options that change a method's network beyond its defaults: name -> (method, parameters).
VARIANTS = {"rd_segment": ("rd", {"segment_steps": 5})}


@pytest.fixture(scope="module")
def line_images(synthetic_root, tmp_path_factory):
    """Test images as they come off a line: square ones, and crops of other aspect ratios (letterboxed)."""
    folder = tmp_path_factory.mktemp("line")
    sources = sorted((synthetic_root / "test" / "spot").glob("*.png"))[:3] + \
        sorted((synthetic_root / "test" / "good").glob("*.png"))[:3]
    for i, source in enumerate(sources):
        image = Image.open(source)
        if i % 2:  # 64×40 and 40×64 crops
            image = image.crop((0, 0, 64, 40) if i % 4 == 1 else (10, 0, 50, 64))
        image.save(folder / f"part_{i}.png")
    return folder


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """One tiny saved model per registered method and per ``VARIANTS`` entry (64 px, one epoch)."""
    folder = tmp_path_factory.mktemp("export-models")
    paths = {}
    with one_torch_thread():
        for name in [*list_trainable_methods(), *VARIANTS]:
            method, options = VARIANTS.get(name, (name, {}))
            params = {**SMALL, **SMALL_PER_METHOD.get(method, {}), **options}
            paths[name] = create_method(method, **params).fit(synthetic_root).save(folder / f"{name}.pt")
    return paths


def _torch_free_env(tmp_path):
    """Environment in which ``import torch`` and ``import kdcore`` fail, as on a line PC without them."""
    blocker = tmp_path / "blocker"
    for package in ("torch", "kdcore"):
        (blocker / package).mkdir(parents=True)
        (blocker / package / "__init__.py").write_text(f"raise ImportError('{package} is not installed here')\n")
    return {**os.environ, "PYTHONPATH": str(blocker)}


def _run_bundle(bundle, args, env, cwd):
    return subprocess.run([sys.executable, str(bundle / "predict.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _read_csv(path):
    return {row["path"]: (float(row["score"]), row["verdict"]) for row in csv.DictReader(open(path))}


@pytest.mark.parametrize("name", [*list_trainable_methods(), *VARIANTS])
def test_bundle_matches_kdcore_predict_without_torch(name, trained, line_images, tmp_path):
    bundle = tmp_path / "bundle"
    with one_torch_thread():
        export_bundle(trained[name], bundle, parity_images=sorted(line_images.glob("*.png"))[:3])
        assert main(["predict", str(trained[name]), str(line_images), "--precision", "fp32", "--quiet",
                     "--csv", str(tmp_path / "torch.csv")]) == 0

    env = _torch_free_env(tmp_path)
    assert subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True).returncode != 0
    run = _run_bundle(bundle, ["--check", str(line_images), "--csv", str(tmp_path / "bundle.csv"),
                               "--heatmaps", str(tmp_path / "heatmaps")], env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "parity check passed" in run.stderr

    expected, got = _read_csv(tmp_path / "torch.csv"), _read_csv(tmp_path / "bundle.csv")
    assert list(got) == list(expected) and len(got) == 6
    for path, (score, verdict) in expected.items():
        assert got[path][0] == pytest.approx(score, rel=1e-4, abs=1e-4 * max(abs(s) for s, _ in expected.values()))
        assert got[path][1] == verdict
    assert len(list((tmp_path / "heatmaps").glob("*_heatmap.png"))) == 6

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["method"] == VARIANTS.get(name, (name,))[0]
    assert manifest["verdict"] == "NG iff score > threshold.value"
    assert manifest["preprocessing"]["size"] == 64 and manifest["preprocessing"]["resize"] == "letterbox"
    assert manifest["teacher"]["sha256"] and manifest["graph"]["batch"] is None
    assert {"kdcore", "torch", "onnxruntime", "opset"} <= set(manifest["versions"])
    assert (bundle / "requirements.txt").read_text().startswith("onnxruntime==")


def test_threshold_lives_outside_the_graph(trained, line_images, tmp_path):
    bundle = export_bundle(trained["rd"], tmp_path / "bundle", batch=4,
                           threshold={"value": -1e9, "mode": "score", "parameter": None, "date": "2026-11-30"})
    env = _torch_free_env(tmp_path)
    all_ng = _run_bundle(bundle, [str(line_images), "--csv", str(tmp_path / "a.csv")], env, tmp_path)
    assert all_ng.returncode == 0, all_ng.stderr
    assert {verdict for _, verdict in _read_csv(tmp_path / "a.csv").values()} == {"NG"}
    # Fixed batch 4 with 6 images: the last chunk is filled and cut back.
    assert len(_read_csv(tmp_path / "a.csv")) == 6

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["threshold"]["value"] = 1e9  # QA raises it by hand: no re-export
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert _run_bundle(bundle, [str(line_images), "--csv", str(tmp_path / "b.csv")], env, tmp_path).returncode == 0
    assert {verdict for _, verdict in _read_csv(tmp_path / "b.csv").values()} == {"OK"}
    override = _run_bundle(bundle, [str(line_images), "--threshold=-1e9"], env, tmp_path)
    assert override.stdout.count("NG") == 6


def test_check_fails_on_a_damaged_bundle(trained, tmp_path):
    bundle = export_bundle(trained["stpm"], tmp_path / "bundle")
    env = _torch_free_env(tmp_path)
    parity = dict(np.load(bundle / "parity.npz"))
    parity["scores"] = parity["scores"] + 1.0
    np.savez(bundle / "parity.npz", **parity)
    run = _run_bundle(bundle, ["--check"], env, tmp_path)
    assert run.returncode == 1 and "scores differ" in run.stderr

    with open(bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    run = _run_bundle(bundle, ["--check"], env, tmp_path)
    assert run.returncode == 2 and "sha256" in run.stderr and "Traceback" not in run.stderr


def test_export_refuses_clearly(trained, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_bundle(trained["rd"], occupied)
    assert (occupied / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="OpenVINO"):
        export_bundle(trained["rd"], tmp_path / "ov", format="openvino")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    assert main(["export", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "out")]) == 2
    assert main(["export", str(trained["rd"]), "--out", str(tmp_path / "out"), "--batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "not a kdcore model file" in err and "batch must be a positive integer" in err
    assert not (tmp_path / "out").exists()


def test_export_job_zips_the_bundle_with_the_saved_threshold(synthetic_root, tmp_path):
    from kdcore import ingest

    store = Store(tmp_path / "data")
    dataset = store.create_dataset("synthetic")
    ingest.import_folder(store, dataset.id, synthetic_root)
    store.enqueue_job(TRAIN, "stpm", SMALL, dataset.id)
    with one_torch_thread():
        assert worker.run_worker(store.root, idle_exit_seconds=0) == 1
    (model,) = store.list_models()
    store.set_model_threshold(model.id, {"value": 1.25, "mode": "score", "parameter": None, "date": "2026-11-30"})
    store.delete_dataset(dataset.id)  # the bundle does not need the dataset
    job = store.enqueue_job(EXPORT, model.method, {}, None, model_id=model.id)
    with one_torch_thread():
        assert worker.run_worker(store.root, idle_exit_seconds=0) == 1
    assert store.get_job(job.id).status == DONE, store.get_job(job.id).message
    with zipfile.ZipFile(store.bundle_file(model)) as archive:
        assert {"model.onnx", "manifest.json", "predict.py", "parity.npz"} <= set(archive.namelist())
        assert json.loads(archive.read("manifest.json"))["threshold"]["value"] == 1.25
    store.delete_model(model.id)
    assert not store.bundle_file(model).exists()
