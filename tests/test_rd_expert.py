"""Reverse Distillation with expert (URD): learning, persistence, validation, GII and anomaly synthesis."""
import numpy as np
import pytest
import torch

import kdcore
from kdcore import data, metrics
from kdcore.methods.rd_expert import guided_injection
from kdcore.synthetic_anomalies import perlin_masks, synthesize_anomalies
from synthetic import within_relight_reach

SIZE = 64


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return data.load_dataset(synthetic_root)


@pytest.fixture(scope="module")
def fitted(dataset):
    method = kdcore.create_method("rd_expert", size=SIZE, epochs=3, batch_size=8)
    return method.fit(dataset)


def _test_inputs(method, dataset):
    return method.preprocess_paths([s.path for s in dataset.test])


def test_learns_synthetic_defects(fitted, dataset):
    maps, scores = fitted.predict(_test_inputs(fitted, dataset))
    labels = np.array([s.label for s in dataset.test])
    masks = np.stack([data.read_mask(s.mask_path, SIZE) if s.label else np.zeros((SIZE, SIZE), bool)
                      for s in dataset.test])
    result = metrics.evaluate(labels, scores, masks, maps)
    assert result["image_auroc"] >= 0.9, result
    assert fitted.training_info["best_epoch"] == 3  # no hold-out selection: the last epoch is kept


def test_teacher_trains_and_expert_stays_frozen(fitted):
    net = fitted.net
    assert all(not p.requires_grad for p in net.expert.parameters())
    assert all(p.requires_grad for p in net.teacher.parameters())
    assert not net.teacher.training  # frozen BatchNorm statistics, even after fit's net.train()
    expert, teacher = net.expert.state_dict(), net.teacher.state_dict()
    assert any(not torch.equal(expert[k], teacher[k]) for k in expert)
    assert all(torch.equal(expert[k], teacher[k]) for k in expert if k.endswith("running_mean"))


def test_save_load_gives_identical_maps(fitted, dataset, tmp_path):
    x = _test_inputs(fitted, dataset)
    maps, scores = fitted.predict(x)
    loaded = kdcore.load(fitted.save(tmp_path / "model.pt"), device="cpu")
    maps2, scores2 = loaded.predict(x)
    assert np.array_equal(maps, maps2) and np.array_equal(scores, scores2)


@pytest.mark.parametrize("params", [
    {"teacher_lr": 0.0}, {"lr": -1.0}, {"image_texture_prob": 1.5}, {"image_texture_prob": -0.1}, {"denoise": False},
    {"decoder_blocks": 0}, {"epochs": 0}, {"expert_lr": 1e-4},
])
def test_rejects_bad_parameters(params):
    with pytest.raises(ValueError):
        kdcore.create_method("rd_expert", **params)


def test_gii_passes_agreeing_features_unchanged():
    features = torch.randn(2, 5, 4, 4)
    assert torch.allclose(guided_injection(features, features, features), features)


def test_gii_similarity_carries_no_gradient():
    skip = torch.randn(2, 5, 4, 4)
    decoded = torch.randn(2, 5, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 4, 4, requires_grad=True)
    guided_injection(skip, decoded, teacher).sum().backward()
    sim = torch.nn.functional.cosine_similarity(decoded, teacher, dim=1).clamp_min(0).unsqueeze(1)
    # With sim constant, d/d(decoded) of skip·sim + decoded·(1 - sim) is exactly 1 - sim.
    assert torch.allclose(decoded.grad, (1 - sim).expand_as(decoded).detach())
    assert teacher.grad is None


def test_perlin_masks_are_binary_nonempty_and_seeded():
    def draw(seed):
        return perlin_masks(16, 64, torch.Generator().manual_seed(seed))

    masks = draw(0)
    assert masks.shape == (16, 1, 64, 64)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).amax(1) == 1).all()
    assert torch.equal(masks, draw(0))
    assert not torch.equal(masks, draw(1))


def test_synthesis_changes_only_masked_pixels():
    images = torch.rand(4, 3, 64, 64)
    defective, masks = synthesize_anomalies(images, torch.Generator().manual_seed(0))
    assert defective.shape == images.shape and masks.shape == (4, 1, 64, 64)
    outside = (masks == 0).expand_as(images)
    assert torch.equal(defective[outside], images[outside])
    assert 0 <= defective.min() and defective.max() <= 1



def test_relit_defects_change_brightness_inside_their_soft_masks_only():
    images = 0.2 + 0.3 * torch.rand(6, 3, 64, 64)  # no gain in [0.55, 1.8] clips these
    draw = lambda prob: synthesize_anomalies(images, torch.Generator().manual_seed(0), relight_prob=prob)
    textured, masks = draw(0.0)
    assert torch.equal(textured, synthesize_anomalies(images, torch.Generator().manual_seed(0))[0])
    relit, relit_masks = draw(1.0)
    assert torch.equal(relit_masks, masks)
    # Pixels beyond the edge blur's reach from every masked pixel keep their value; inside, the brightness moved.
    near = within_relight_reach(masks)
    assert torch.allclose(relit[~near.expand_as(images)], images[~near.expand_as(images)], atol=1e-4)
    core = (-torch.nn.functional.max_pool2d(-masks, kernel_size=9, stride=1, padding=4) > 0).expand_as(images)
    ratios = [float(image[inside].mean() / before[inside].mean())
              for image, before, inside in zip(relit, images, core) if inside.any()]
    assert ratios and all(ratio < 0.85 or ratio > 1.2 for ratio in ratios), ratios
    with pytest.raises(ValueError, match="relight_prob"):
        kdcore.create_method("rd", relight_prob=1.5)
