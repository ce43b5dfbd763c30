"""`ensemble`: trained models of one dataset combined into one model that saves, loads, predicts and exports."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kdcore
from conftest import one_torch_thread
from kdcore import create_method, data
from kdcore.cli import main
from kdcore.evaluation import evaluate_model

SMALL = {"size": 64, "epochs": 1, "batch_size": 8}


@pytest.fixture(scope="module")
def members(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble-members")
    with one_torch_thread():
        return [create_method(name, **SMALL).fit(synthetic_root).save(folder / f"{name}.pt")
                for name in ("stpm", "teacher_knn")]


def test_the_map_is_the_mean_of_the_members_standardised_maps(members, synthetic_root, tmp_path):
    dataset = data.load_dataset(synthetic_root)
    with one_torch_thread():
        ensemble = create_method("ensemble", members=members, precision="fp32").fit(dataset)
        path = ensemble.save(tmp_path / "ensemble.pt")
        images = [sample.path for sample in dataset.test[:6]]
        maps, scores = ensemble.predict(ensemble.preprocess_paths(images))
        expected = []
        for i, member_path in enumerate(members):
            member = kdcore.load(member_path)
            member.config.precision = "fp32"
            member_maps, _ = member.predict(member.preprocess_paths(images))
            expected.append((member_maps - float(ensemble.net.holdout_mean[i])) / float(ensemble.net.holdout_std[i]))
        np.testing.assert_allclose(maps, np.mean(expected, axis=0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(scores, maps.reshape(len(maps), -1).max(1), rtol=1e-6)

        reloaded = kdcore.load(path)  # without the member files: their weights are inside
        reloaded.config.precision = "fp32"
        for member_path in members:
            member_path.rename(member_path.with_suffix(".moved"))
        try:
            np.testing.assert_allclose(reloaded.predict(reloaded.preprocess_paths(images))[0], maps, rtol=1e-5,
                                       atol=1e-5)
        finally:
            for member_path in members:
                member_path.with_suffix(".moved").rename(member_path)
        result = evaluate_model(ensemble, dataset)
    assert result["image_auroc"] > 0.9  # it finds the synthetic defects


def test_an_ensemble_saved_with_one_scale_per_member_still_loads(members, synthetic_root, tmp_path):
    """Files written before members could carry a per-position map scale hold one number per member."""
    with one_torch_thread():
        path = create_method("ensemble", members=members).fit(synthetic_root).save(tmp_path / "e.pt")
    payload = torch.load(path, weights_only=False)
    payload["state_dict"]["map_scale"] = torch.tensor([2.0, 3.0])
    torch.save(payload, path)
    scale = kdcore.load(path).net.map_scale
    assert scale.shape == (2, 64, 64) and bool((scale[0] == 2.0).all()) and bool((scale[1] == 3.0).all())


def test_cli_ensemble_and_its_errors(members, synthetic_root, tmp_path, capsys):
    out = tmp_path / "e.pt"
    with one_torch_thread():
        assert main(["ensemble", *map(str, members), "--out", str(out), "--data", str(synthetic_root)]) == 0
        assert kdcore.load(out).name == "ensemble"
        assert main(["ensemble", str(members[0]), "--out", str(tmp_path / "one.pt")]) == 2
        other = create_method("stpm", **{**SMALL, "size": 96}).fit(synthetic_root).save(tmp_path / "big.pt")
        assert main(["ensemble", str(members[0]), str(other), "--out", str(tmp_path / "mixed.pt")]) == 2
    err = capsys.readouterr().err
    assert "two or more" in err and "share input size" in err


def test_an_ensemble_exports(members, synthetic_root, tmp_path):
    from kdcore.export import export_bundle

    with one_torch_thread():
        path = create_method("ensemble", members=members).fit(synthetic_root).save(tmp_path / "e.pt")
        bundle = export_bundle(path, tmp_path / "bundle")  # verified against torch by onnxruntime inside
    assert (bundle / "model.onnx").stat().st_size > 0
