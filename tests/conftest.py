"""Shared fixtures: small synthetic datasets in MVTec layout (see synthetic.py)."""
from __future__ import annotations

import pytest

import synthetic


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A 64-px textured set: 40 normal training images, 8 good and 16 defective test images with masks."""
    return synthetic.make_dataset(tmp_path_factory.mktemp("synthetic"), size=64, seed=1)
