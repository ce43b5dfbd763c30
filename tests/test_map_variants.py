"""bench.map_variants: its "cosine" map is the method's own, so the other variants are compared like for like."""
from __future__ import annotations

import pytest

import kdcore
from bench.map_variants import VARIANTS, evaluate_variants
from kdcore import data
from kdcore.evaluation import evaluate_model


@pytest.mark.usefixtures("single_torch_thread")
def test_cosine_variant_reproduces_the_methods_own_map(synthetic_root, tmp_path):
    dataset = data.load_dataset(synthetic_root)
    method = kdcore.create_method("rd", size=64, epochs=1, batch_size=8, precision="fp32").fit(dataset)
    # The diagnosis loads saved models, so go through a file as it does.
    method = kdcore.load(method.save(tmp_path / "rd.pt"), device="cpu")
    own = evaluate_model(method, dataset)
    variants = evaluate_variants(method, dataset)
    assert list(variants) == list(VARIANTS)
    cosine = variants["cosine"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert cosine[key] == pytest.approx(own[key], abs=2e-3), key
    for result in variants.values():
        assert set(result["per_defect_pixel"]) == set(own["per_defect_pixel"])
        assert set(result["per_defect_localization"]) == set(own["per_defect_localization"])
    assert variants["std-L2"]["pixel_auroc"] != pytest.approx(cosine["pixel_auroc"], abs=1e-6)
    pooled = evaluate_variants(method, dataset, pool=3)["cosine"]
    assert pooled["pixel_auroc"] != pytest.approx(cosine["pixel_auroc"], abs=1e-6)
