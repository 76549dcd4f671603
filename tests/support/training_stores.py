"""Module-scoped fixtures shared by the training and grid tests: the tiny backbone, a small
ProGAN-style tree and tap stores extracted from it. Import them into a test module by name
(`from support.training_stores import backbone, data, stores`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rine.data.augment import CenterView, TrainAugment
from rine.data.datasets import progan_items
from rine.model.backbones import load_backbone
from rine.training.features import extract_features

from support.image_trees import make_progan


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    return load_backbone(str(tiny_backbone_dir))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("progan")
    make_progan(root, per_label=5)
    make_progan(root, per_label=2, split="val")
    return root


@pytest.fixture(scope="module")
def stores(backbone, data, tmp_path_factory):
    base = tmp_path_factory.mktemp("stores")
    items = progan_items(data, "train", ["car", "cat"])
    train32 = extract_features(backbone, items, base / "train32", TrainAugment(0), seed=0, dtype="float32", batch_size=8)
    val = extract_features(backbone, progan_items(data, "val"), base / "val", CenterView(), batch_size=8)
    return items, train32, val
