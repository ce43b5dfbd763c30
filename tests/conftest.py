"""Shared fixtures: small synthetic datasets in MVTec layout (see synthetic.py)."""
from __future__ import annotations

import contextlib
import shutil

import pytest

import synthetic
from kdcore import ingest, worker
from kdcore.store import TRAIN, Store


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A 64-px textured set: 40 normal training images, 8 good and 16 defective test images with masks."""
    return synthetic.make_dataset(tmp_path_factory.mktemp("synthetic"), size=64, seed=1)


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models on a shared, busy CPU run several times faster on one thread than on threads fighting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def single_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def review_template(synthetic_root, tmp_path_factory):
    """A data directory holding the synthetic set as dataset 'synthetic' and two tiny models trained on it by the
    worker (#1 STPM, #2 RD; 64 px, 1 epoch). Tests copy it (``review_store``): training is the slow part."""
    store = Store(tmp_path_factory.mktemp("review-template"))
    dataset = store.create_dataset("synthetic")
    ingest.import_folder(store, dataset.id, synthetic_root)
    for method in ("stpm", "rd"):
        store.enqueue_job(TRAIN, method, {"size": 64, "epochs": 1, "batch_size": 8}, dataset.id)
    with one_torch_thread():
        assert worker.run_worker(store.root, idle_exit_seconds=0) == 2
    assert [model.method for model in store.list_models()] == ["rd", "stpm"]
    return store.root


@pytest.fixture
def review_store(review_template, tmp_path, monkeypatch, single_torch_thread):
    """A fresh copy of ``review_template``, which the app (``KDCORE_DATA_DIR``, no worker autostart) also uses."""
    root = shutil.copytree(review_template, tmp_path / "data")
    monkeypatch.setenv("KDCORE_DATA_DIR", str(root))
    monkeypatch.setenv(worker.AUTOSTART_ENV, "0")
    return Store(root)
