"""`python -m kdcore`: train, evaluate and predict as a user runs them, and one-line errors."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest

from kdcore.cli import main

TRAIN = ["--size", "64", "--epochs", "2", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def model(synthetic_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "rd.pt"
    assert main(["train", "--method", "rd", "--data", str(synthetic_root), "--out", str(path), *TRAIN]) == 0
    return path


def test_evaluate_writes_exactly_the_documented_keys(model, synthetic_root, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(model), "--data", str(synthetic_root), "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_all_defective", "aupr", "n_images",
                           "n_defective", "per_defect", "per_defect_pixel", "per_defect_localization"}
    assert result["n_images"] == 24 and result["n_defective"] == 16
    assert result["f1_all_defective"] == pytest.approx(2 * 16 / (24 + 16))
    assert set(result["per_defect"]) == {"scratch", "spot"}
    assert all(0.0 <= value <= 1.0 for value in result["per_defect"].values())
    assert set(result["per_defect_pixel"]) == {"scratch", "spot"}
    assert set(result["per_defect_localization"]) == {"scratch", "spot"}
    assert 0.0 <= result["aupro"] <= 1.0
    assert "pixel AUROC" in capsys.readouterr().out


def test_evaluate_without_masks_gives_null_pixel_metrics(model, synthetic_root, tmp_path):
    image_level = tmp_path / "image_level"
    shutil.copytree(synthetic_root, image_level, ignore=shutil.ignore_patterns("ground_truth"))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(model), "--data", str(image_level), "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["pixel_auroc"] is None and result["aupro"] is None and result["image_auroc"] is not None


def test_predict_folders_and_files_to_csv_and_heatmaps(model, synthetic_root, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    csv_path, heatmaps = tmp_path / "scores.csv", tmp_path / "heatmaps"
    good = synthetic_root / "test" / "good" / "good_000.png"
    args = ["predict", str(model), str(synthetic_root / "test" / "spot"), str(good), str(tmp_path / "broken.png"),
            "--csv", str(csv_path), "--heatmaps", str(heatmaps), "--quiet"]
    assert main(args) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 9 and set(rows[0]) == {"path", "score", "verdict"}
    assert {row["verdict"] for row in rows} <= {"OK", "NG"}
    assert len(list(heatmaps.glob("*_heatmap.png"))) == 9


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "rd", "--data", "/does/not/exist", "--out", "m.pt"], "not found"),
    (["train", "--method", "nope", "--data", ".", "--out", "m.pt"], "unknown method"),
    (["train", "--method", "rd", "--data", ".", "--out", "m.pt", "--size", "100"], "multiple of 32"),
    (["evaluate", "/does/not/exist.pt", "--data", "."], "model file not found"),
    (["predict", "/does/not/exist.pt", "x.png"], "model file not found"),
])
def test_errors_are_one_line_and_nonzero(args, message):
    proc = subprocess.run([sys.executable, "-m", "kdcore", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_bad_input_is_one_line_never_a_traceback(synthetic_root, model, tmp_path, capsys):
    import torch

    (tmp_path / "junk.pth").write_text("junk")
    payload = torch.load(model, weights_only=True)
    payload["format_version"] = "abc"
    torch.save(payload, tmp_path / "bad_version.pt")
    cases = [
        (["train", "--method", "rd", "--data", str(synthetic_root), "--out", str(tmp_path / "m.pt"),
          "--set", "lr=abc", *TRAIN], "lr must be a number, got 'abc'"),
        (["train", "--method", "rd", "--data", str(synthetic_root), "--out", str(tmp_path / "m.pt"),
          "--weights", str(tmp_path / "junk.pth"), *TRAIN], "is not a weights file torch can read"),
        (["predict", str(tmp_path / "bad_version.pt"), str(synthetic_root / "test" / "good")],
         "its format version is 'abc'"),
        (["worker", "--data-dir", str(tmp_path / "typo"), "--idle-exit", "0"], "pass --create"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "typo").exists() and not (tmp_path / "m.pt").exists()
