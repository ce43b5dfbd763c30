"""DSKD-style dual students: learning, persistence, validation, the two-student map and their interaction."""
import numpy as np
import pytest
import torch

import kdcore
from kdcore import data, metrics
from kdcore.methods.dskd import pyramid_matching_loss
from kdcore.ops import GaussianBlur, cosine_distance_map, fuse_levels

import synthetic

SIZE = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return data.load_dataset(synthetic.make_dataset(tmp_path_factory.mktemp("dskd"), size=SIZE))


@pytest.fixture(scope="module")
def fitted(dataset):
    return kdcore.create_method("dskd", size=SIZE, epochs=10, batch_size=4).fit(dataset)


@pytest.fixture(scope="module")
def test_inputs(fitted, dataset):
    return fitted.preprocess_paths([s.path for s in dataset.test])


def test_learns_synthetic_defects(fitted, dataset, test_inputs):
    maps, scores = fitted.predict(test_inputs)
    labels = np.array([s.label for s in dataset.test])
    masks = np.stack([data.read_mask(s.mask_path, SIZE) if s.label else np.zeros((SIZE, SIZE), bool)
                      for s in dataset.test])
    result = metrics.evaluate(labels, scores, masks, maps)
    assert result["image_auroc"] >= 0.9, result


def test_save_load_gives_identical_maps(fitted, test_inputs, tmp_path):
    maps, scores = fitted.predict(test_inputs)
    loaded = kdcore.load(fitted.save(tmp_path / "model.pt"), device="cpu")
    maps2, scores2 = loaded.predict(test_inputs)
    assert np.array_equal(maps, maps2) and np.array_equal(scores, scores2)


def _student_map(teacher_features, student_features, level_std, blur):
    """One student's map: its stride-8 and stride-16 levels (``map_strides``), each divided by its hold-out std
    (``standardize_levels``)."""
    distances = [cosine_distance_map(t, s) / std for t, s, std in zip(teacher_features, student_features, level_std)]
    return blur(fuse_levels(distances[1:], SIZE, mode="sum", align_corners=True))


def test_map_is_mean_of_both_students_maps(fitted, dataset, test_inputs):
    net, blur = fitted.net, GaussianBlur(sigma=4.0)
    normalized, _ = fitted.predict(test_inputs)
    maps = normalized * fitted.map_scale + fitted.map_offset.numpy()  # the network's own map (square images)
    images = test_inputs.images
    with torch.inference_mode(), fitted._autocast():
        teacher = net.teacher(images)
        forward = net.forward_student(images)
        reverse = net.reverse_student(net.embedding(teacher, forward[-1]))
        forward_std, reverse_std = net.level_scale.std
        assert not torch.equal(forward_std, reverse_std)  # each student's levels have their own scale
        forward_map = _student_map(teacher, forward, forward_std, blur)[:, 0].numpy()
        reverse_map = _student_map(teacher, reverse, reverse_std, blur)[:, 0].numpy()
    np.testing.assert_allclose(maps, (forward_map + reverse_map) / 2, rtol=1e-5, atol=1e-6)
    # Neither student is negligible: each one's map alone finds the fixture's defective images.
    labels = np.array([sample.label for sample in dataset.test])
    for student_map in (forward_map, reverse_map):
        assert metrics.image_auroc(labels, student_map.max(axis=(1, 2))) >= 0.8


def _gradients(net, loss) -> dict[str, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in net.forward_student.named_parameters() if p.grad is not None}


def test_reverse_students_loss_trains_the_forward_student():
    method = kdcore.create_method("dskd", size=SIZE)
    method._build("default")
    net = method.net.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    teacher, forward, _ = net.features(x)
    own = _gradients(net, pyramid_matching_loss(teacher, forward))
    teacher, _, reverse = net.features(x)
    through_embedding = _gradients(net, pyramid_matching_loss(teacher, reverse))
    # Every forward-student weight its own loss trains also receives gradient from the reverse student's loss.
    assert own and through_embedding.keys() == own.keys()
    assert all(g.abs().sum() > 0 for g in through_embedding.values())
    assert all(p.grad is None for p in net.teacher.parameters())


@pytest.mark.parametrize("params", [
    {"lr": 0.0}, {"lr": -1.0}, {"betas": (0.5, 1.0)}, {"betas": (0.9,)}, {"bottleneck_blocks": 0},
    {"decoder_blocks": 0}, {"epochs": 0}, {"size": 100}, {"unknown": 1},
])
def test_rejects_bad_parameters(params):
    with pytest.raises(ValueError):
        kdcore.create_method("dskd", **params)
