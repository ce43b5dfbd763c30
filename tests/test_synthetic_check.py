"""The synthetic-defect check: seeded, masked defects of four kinds made from hold-out normals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import one_torch_thread
from kdcore import create_method
from kdcore.cli import main
from kdcore.synthetic_check import KINDS, synthetic_defects


def test_defects_are_seeded_masked_and_stay_inside_the_picture():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(60, 200, (8, 3, 64, 64), generator=generator, dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 64, 64]] * 4 + [[16, 0, 32, 64]] * 4)  # the last four letterboxed
    made, masks, kinds = synthetic_defects(images, boxes, seed=7)
    again, masks_again, _ = synthetic_defects(images, boxes, seed=7)
    assert torch.equal(made, again) and torch.equal(masks, masks_again)
    assert sorted(set(kinds)) == sorted(KINDS)
    assert all(mask.any() for mask in masks)
    assert not masks[4:, :16].any() and not masks[4:, 48:].any()  # never in the letterbox margins
    assert torch.equal(made.permute(0, 2, 3, 1)[~masks], images.permute(0, 2, 3, 1)[~masks])  # only masks change
    assert (made.int() - images.int()).abs().amax(dim=1)[masks].float().mean() > 10  # and they do change


def test_evaluate_synthetic_on_a_plain_folder_of_normals(synthetic_root, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(synthetic_root / "train" / "good", plain)
    with one_torch_thread():
        model = create_method("stpm", size=64, epochs=2, batch_size=8).fit(plain).save(tmp_path / "m.pt")
        assert main(["evaluate", str(model), "--data", str(plain), "--synthetic", "--quiet",
                     "--json", str(tmp_path / "r.json")]) == 0
        assert main(["evaluate", str(model), "--data", str(plain), "--quiet"]) == 2  # no test split, no --synthetic
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["image_auroc"] is None and result["pixel_auroc"] is None
    assert all(0 <= result[key] <= 1 for key in ("synthetic_image_auroc", "synthetic_pixel_auroc", "synthetic_aupro"))
    assert set(result["synthetic_per_kind"]) == set(KINDS)
    assert np.isfinite(result["synthetic_image_auroc"])


def test_rank_agreement_of_the_synthetic_check_with_the_real_test_set():
    from bench.synthetic_vs_real import agreement

    same = agreement([0.9, 0.7, 0.8], [0.6, 0.4, 0.5])
    assert same == {"spearman_rho": pytest.approx(1.0), "synthetic_pick_is_real_best": True,
                    "real_rank_of_synthetic_pick": 1, "real_loss_of_synthetic_pick": 0.0}
    reversed_ = agreement([0.9, 0.7, 0.8], [0.4, 0.6, 0.5])
    assert reversed_["spearman_rho"] == pytest.approx(-1.0)
    assert (reversed_["real_rank_of_synthetic_pick"], reversed_["real_loss_of_synthetic_pick"]) == (3, pytest.approx(0.2))
