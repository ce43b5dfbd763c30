"""teacher_knn, the no-student reference: it fits without training, separates defects, and round-trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kdcore
from kdcore import data
from kdcore.evaluation import evaluate_model
from kdcore.methods.teacher_knn import nearest_distances

SMALL = {"size": 64, "bank_size": 500, "bank_images": 20}


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return data.load_dataset(synthetic_root)


@pytest.fixture(scope="module")
def fitted(dataset):
    return kdcore.create_method("teacher_knn", **SMALL).fit(dataset)


def test_nearest_distances_equal_a_brute_force_search():
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 8, generator=generator), torch.randn(30, 8, generator=generator)
    expected = torch.cdist(queries, bank).amin(dim=1)
    torch.testing.assert_close(nearest_distances(queries, bank), expected, atol=1e-4, rtol=1e-4)


def test_fits_without_training_and_separates_defects(fitted, dataset):
    assert fitted.training_info["steps"] == 0 and fitted.training_info["epochs_run"] == 0
    bank = fitted.net.bank
    assert bank.shape == (500, 40 + 112) and bank.abs().sum(dim=1).min() > 0  # no zero rows
    result = evaluate_model(fitted, dataset)
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.9, result


def test_maps_are_z_scored_per_position_on_the_holdout(fitted, dataset):
    assert fitted.config.map_normalization == "zscore"
    scale = fitted.map_scale
    assert scale.shape == fitted.map_offset.shape == (64, 64) and scale.min() > 0
    assert scale.std() > 0  # one std per position, not one number
    x = fitted.preprocess_paths([s.path for s in dataset.test[:3]])
    normalized, _ = fitted.predict(x)
    offset = fitted.map_offset
    fitted.map_offset, fitted.map_scale = None, 1.0
    try:
        raw, _ = fitted.predict(x)
    finally:
        fitted.map_offset, fitted.map_scale = offset, scale
    np.testing.assert_allclose(normalized, (raw - offset.numpy()) / scale.numpy(), rtol=1e-5, atol=1e-5)
    holdout, _ = fitted.predict(fitted.preprocess_paths(dataset.holdout))
    assert abs(holdout.mean()) < 0.2


def test_a_memory_smaller_than_asked_repeats_real_vectors(dataset):
    method = kdcore.create_method("teacher_knn", size=64, bank_size=20000, bank_images=1).fit(dataset)
    bank = method.net.bank
    # One 64-px image has 8x8 stride-8 positions: 64 real vectors, repeated to fill the memory.
    assert torch.equal(bank[64:128], bank[:64]) and bank.abs().sum(dim=1).min() > 0


def test_save_load_gives_identical_maps(fitted, dataset, tmp_path):
    x = fitted.preprocess_paths([s.path for s in dataset.test[:4]])
    loaded = kdcore.load(fitted.save(tmp_path / "knn.pt"))
    np.testing.assert_array_equal(loaded.predict(x)[0], fitted.predict(x)[0])


@pytest.mark.parametrize("params, message", [
    ({"bank_size": 0}, "bank_size"), ({"bank_images": -1}, "bank_images"), ({"sigma": 0}, "sigma"),
    ({"strides": ()}, "strides"),
])
def test_invalid_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        kdcore.create_method("teacher_knn", **params)
