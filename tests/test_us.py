"""Uninformed Students: dense = patch equivalence, learning on the synthetic set, persistence, parameters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdcore
import synthetic
from kdcore import data, metrics
from kdcore.methods.us import (PatchDescriptorNet, compactness_loss, ensemble_scores, image_descriptor,
                               sample_patch_pairs, standardization)

SIZE = 64
# Small enough for a CPU test: one receptive field, quarter width, a short teacher phase.
TINY = dict(size=SIZE, patch_sizes=(33,), width=0.25, n_students=3, teacher_steps=20, teacher_batch_size=16,
            epochs=2, batch_size=8, crop_size=32, device="cpu")


@pytest.mark.parametrize("patch_size", [17, 33, 65])
def test_dense_descriptors_equal_patch_network_on_cropped_patches(patch_size):
    torch.manual_seed(patch_size)
    net = PatchDescriptorNet(patch_size, descriptor_dim=16, width=0.25).eval()
    image = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        dense = net.dense(image)
        assert dense.shape == (1, 16, 70, 70)
        # The patch centred on a pixel, cut from the image reflect-padded by p//2 on every side.
        padded = F.pad(image, (patch_size // 2,) * 4, mode="reflect")
        for y, x in [(0, 0), (69, 69), (0, 69), (7, 41), (35, 3)]:
            patch = padded[:, :, y:y + patch_size, x:x + patch_size]
            torch.testing.assert_close(net(patch)[0], dense[0, :, y, x], atol=1e-4, rtol=0)


def test_image_target_reads_the_whole_image_embedding_at_each_upright_patch_centre():
    torch.manual_seed(0)
    # Dense images of 48 px whose embedding has a 12×12 grid (stride 4): channel 0 holds each cell's row
    # centre, channel 1 its column centre, in dense pixels, and channel 2 the image index.
    images = torch.arange(2 * 3 * 48 * 48, dtype=torch.float32).view(2, 3, 48, 48)
    centres_of_cells = torch.arange(12, dtype=torch.float32) * 4 + 2
    embeddings = torch.stack([centres_of_cells.view(12, 1).expand(12, 12), centres_of_cells.view(1, 12).expand(12, 12),
                              torch.zeros(12, 12)]).repeat(2, 1, 1, 1)
    embeddings[1, 2] = 1
    anchors, _, centres = sample_patch_pairs(images, patch_size=17, count=32, rotate=False)
    for anchor, (index, y, x) in zip(anchors, centres.tolist()):
        top, left = round(y - 8.5), round(x - 8.5)
        assert torch.equal(anchor, images[int(index), :, top:top + 17, left:left + 17])
    targets = image_descriptor(embeddings, centres, (48, 48))
    inside = ((centres[:, 1:] >= 2) & (centres[:, 1:] <= 46)).all(dim=1)
    assert inside.any()
    torch.testing.assert_close(targets[inside, :2], centres[inside, 1:], atol=1e-4, rtol=0)
    torch.testing.assert_close(targets[:, 2], centres[:, 0])


def test_image_distillation_target_learns(tmp_path):
    root = synthetic.make_dataset(tmp_path / "synthetic", size=SIZE)
    dataset = data.load_dataset(root)
    method = kdcore.create_method("us", **{**TINY, "distill_target": "image"}).fit(dataset)
    assert method.teacher_strides() == (8, 16)
    labels = np.array([sample.label for sample in dataset.test])
    _, scores = method.predict(method.preprocess_paths([sample.path for sample in dataset.test]))
    assert metrics.evaluate(labels, scores)["image_auroc"] >= 0.9


def test_patch_teacher_learns_its_backbone_target_only_without_the_compactness_and_triplet_terms(tmp_path):
    # With those terms the descriptors collapse to decorrelated noise (r2 near 0 at every budget), which the
    # module notes measure; ``r2`` in the training info is what shows it.
    root = synthetic.make_dataset(tmp_path / "synthetic", size=SIZE)
    fitted = {}
    for terms in (1.0, 0.0):
        torch.manual_seed(0)
        method = kdcore.create_method("us", **{**TINY, "teacher_steps": 100, "epochs": 1, "compact_weight": terms,
                                               "metric_weight": terms, "teacher_lr": 1e-3,
                                               "standardize_targets": True})
        fitted[terms] = method.fit(data.load_dataset(root)).training_info["teacher"]["p33"]["r2"]
    assert fitted[0.0] >= 0.4 and fitted[1.0] < 0.2


def test_files_written_before_the_distillation_target_load_with_the_patch_target(trained, tmp_path):
    method, _, x, (maps, _) = trained
    assert method.config.distill_target == "patch"
    payload = torch.load(method.save(tmp_path / "us.pt"), weights_only=True)
    del payload["config"]["distill_target"]  # as written before the option existed
    torch.save(payload, tmp_path / "old.pt")
    old = kdcore.load(tmp_path / "old.pt", device="cpu")
    assert old.config.distill_target == "patch" and old.teacher_strides() == (16, 32)
    assert np.array_equal(old.predict(x)[0], maps)


def test_ensemble_scores_are_error_and_variance_of_the_mean():
    predictions = torch.randn(3, 2, 5, 4, 4)
    targets = torch.randn(2, 5, 4, 4)
    error, variance = ensemble_scores(iter(predictions), targets)
    mean = predictions.mean(dim=0)
    torch.testing.assert_close(error[:, 0], (mean - targets).pow(2).sum(dim=1))
    # The mean over students of the squared distance to their mean, summed over dimensions.
    torch.testing.assert_close(variance[:, 0], (predictions - mean).pow(2).sum(dim=2).mean(dim=0))


def test_global_standardization_is_the_papers_scalar_z_score():
    values = torch.randn(6, 16, 16, dtype=torch.float64) * 3 + 2
    stats = standardization(values, "global")
    assert stats.shape == (2, 16, 16)
    torch.testing.assert_close(stats[0], torch.full((16, 16), float(values.mean())))
    torch.testing.assert_close(stats[1], torch.full((16, 16), float(values.std())))


def test_position_standardization_removes_a_noisier_border_band():
    # Normal maps whose border band is brighter and noisier than the centre, like magnetic_tile's.
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(40, 32, 32, generator=generator, dtype=torch.float64)
    border = torch.ones(32, 32, dtype=torch.float64)
    border[4:-4, 4:-4] = 0
    holdout = noise * (1 + 4 * border) + 10 * border
    normal = torch.randn(20, 32, 32, generator=generator, dtype=torch.float64) * (1 + 4 * border) + 10 * border
    defective = normal.clone()
    defective[:, 14:18, 14:18] += 4  # a modest defect in the centre
    for mode, expect_separation in (("global", False), ("position", True)):
        mean, std = standardization(holdout, mode)
        z = lambda maps: ((maps - mean) / std).amax(dim=(1, 2)).numpy()
        labels = np.r_[np.zeros(20), np.ones(20)]
        auroc = metrics.image_auroc(labels, np.r_[z(normal), z(defective)])
        assert (auroc > 0.9) == expect_separation, (mode, auroc)


def test_compactness_is_zero_for_uncorrelated_descriptors_and_positive_otherwise():
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # orthogonal columns
    assert compactness_loss(signs).item() == pytest.approx(0.0, abs=1e-6)
    correlated = torch.stack([signs[:, 0], signs[:, 0] + 0.1 * signs[:, 1]], dim=1)
    assert compactness_loss(correlated).item() > 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = synthetic.make_dataset(tmp_path_factory.mktemp("synthetic"), size=SIZE)
    dataset = data.load_dataset(root)
    method = kdcore.create_method("us", **TINY).fit(dataset)
    x = method.preprocess_paths([sample.path for sample in dataset.test])
    return method, dataset, x, method.predict(x)


def test_learns_synthetic_defects(trained):
    method, dataset, _, (maps, scores) = trained
    labels = np.array([sample.label for sample in dataset.test])
    masks = np.stack([data.read_mask(s.mask_path, SIZE) if s.label else np.zeros((SIZE, SIZE), bool)
                      for s in dataset.test])
    assert maps.shape == (len(dataset.test), SIZE, SIZE)
    assert metrics.evaluate(labels, scores, masks, maps)["image_auroc"] >= 0.9
    assert method.training_info["teacher"]["p33"]["steps"] == TINY["teacher_steps"]


def test_save_load_gives_identical_maps(trained, tmp_path):
    method, _, x, (maps, scores) = trained
    loaded = kdcore.load(method.save(tmp_path / "us.pt"), device="cpu")
    assert loaded.config == method.config
    loaded_maps, loaded_scores = loaded.predict(x)
    assert np.array_equal(loaded_maps, maps) and np.array_equal(loaded_scores, scores)


def test_presets_fill_only_unset_parameters():
    paper = kdcore.create_method("us", preset="paper", size=256).config
    assert (paper.patch_sizes, paper.n_students, paper.width, paper.dense_size) == ((17, 33, 65), 3, 1.0, 256)
    assert (paper.crop_size, paper.teacher_steps, paper.epochs, paper.batch_size) == (256, 50_000, 100, 1)
    fast = kdcore.create_method("us", size=256, patch_sizes=[17, 33], epochs=7).config
    assert (fast.preset, fast.patch_sizes, fast.epochs, fast.dense_size, fast.width) == ("fast", (17, 33), 7, 128, 0.25)


@pytest.mark.parametrize("params, message", [
    (dict(preset="slow"), "preset"),
    (dict(patch_sizes=(21,)), "patch_sizes"),
    (dict(patch_sizes=(33, 33)), "patch_sizes"),
    (dict(patch_sizes=()), "patch_sizes"),
    (dict(n_students=1), "n_students"),
    (dict(width=0), "width"),
    (dict(dense_size=512), "dense_size"),
    (dict(size=64, patch_sizes=(65,)), "dense_size"),
    (dict(crop_size=0), "crop_size"),
    (dict(teacher_steps=0), "teacher_steps"),
    (dict(teacher_batch_size=1), "teacher_batch_size"),
    (dict(distill_size=16), "distill_size"),
    (dict(distill_target="crop"), "distill_target"),
    (dict(lr=0.0), "lr"),
    (dict(kd_weight=0.0), "kd_weight"),
    (dict(metric_weight=-1.0), "metric_weight"),
    (dict(epochs=0), "epochs"),
    (dict(standardize="pixel"), "standardize"),
    (dict(colour=1), "unknown"),
])
def test_invalid_parameters_raise(params, message):
    with pytest.raises(ValueError, match=message):
        kdcore.create_method("us", **params)
