"""Training: stored taps == images end to end, byte-identical reruns, the CLI's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rine.data.augment import TrainAugment
from rine.data.datasets import progan_items
from rine.data.tap_store import FeatureStore
from rine.training.features import extract_features
from rine.training.trainer import (
    ImageTaps,
    StoreTaps,
    TrainConfig,
    average_precision,
    build_head,
    train_head,
)

from support.training_stores import backbone, data, stores  # noqa: F401  (module fixtures)


def test_stored_taps_train_the_same_head_as_images(backbone, stores):
    """One epoch from a float32 store == one epoch end to end on images (same seeds)."""
    items, train32, _ = stores
    cfg = TrainConfig(nproj=2, proj_dim=32, batch_size=6, epochs=1, seed=0)  # 20 items: 4 batches, last partial
    from_store = train_head(StoreTaps(train32), cfg).head.state_dict()
    from_images = train_head(ImageTaps(backbone, items, TrainAugment(0)), cfg).head.state_dict()
    torch.manual_seed(0)
    init = build_head(cfg, 64, 3).state_dict()
    for k in from_store:
        torch.testing.assert_close(from_store[k], from_images[k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(from_store[k], init[k]), f"{k} did not train"
    # a different augmentation seed gives different views, hence different weights
    other = train_head(ImageTaps(backbone, items, TrainAugment(1)), cfg).head.state_dict()
    assert not torch.allclose(other["proj1.1.weight"], from_images["proj1.1.weight"])


def test_multi_view_store_serves_view_e_at_epoch_e(backbone, data, tmp_path):
    items = progan_items(data, "train", ["cat"])
    store = extract_features(backbone, items, tmp_path / "s", TrainAugment(0), views=2, dtype="float32")
    cfg = TrainConfig(nproj=1, proj_dim=16, batch_size=4, epochs=2)
    a = train_head(StoreTaps(store), cfg).head.state_dict()
    b = train_head(ImageTaps(backbone, items, TrainAugment(0)), cfg).head.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_lr_schedule_and_validation(stores, tmp_path):
    _, train32, val = stores
    cfg = TrainConfig(nproj=1, proj_dim=16, batch_size=8, epochs=3, lr_milestones=(2, 3))
    assert [cfg.lr_at(e) for e in range(3)] == pytest.approx([1e-3, 1e-4, 1e-5])
    res = train_head(StoreTaps(train32), cfg, val=val, log_path=tmp_path / "log.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["event"] == "epoch"]
    assert [e["lr"] for e in epochs] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert all(0 <= e["val_acc"] <= 1 and np.isfinite(e["loss"]) for e in epochs)
    best = max(epochs, key=lambda e: (e["val_acc"], -e["val_loss"]))
    assert res.best_epoch == best["epoch"] == lines[-1]["best_epoch"]


def test_ablations_shape_the_head(stores):
    _, train32, _ = stores
    no_tie = train_head(StoreTaps(train32), TrainConfig(nproj=1, proj_dim=8, use_tie=False)).head
    assert "alpha" not in no_tie.state_dict()
    last = train_head(StoreTaps(train32), TrainConfig(nproj=1, proj_dim=8, blocks="last")).head
    assert last.config.n_blocks == 1 and last.alpha.shape == (1, 1, 8)
    half = train_head(StoreTaps(train32), TrainConfig(nproj=1, proj_dim=8, fraction=0.5, contrastive=False))
    assert half.history[0]["supcon"] == 0


def test_validation_taps_must_fit_the_head(stores):
    """A validation store of another depth is refused before training (HeadConfig.takes); a
    last-block head takes the last block of any depth."""
    from types import SimpleNamespace

    _, train32, _ = stores
    train = StoreTaps(train32)
    deeper = SimpleNamespace(blocks=train.blocks + 1, width=train.width)
    with pytest.raises(ValueError, match=r"validation taps \[\*, 4, 64\] do not fit"):
        train_head(train, TrainConfig(nproj=1, proj_dim=8, epochs=1), val=deeper)
    narrower = SimpleNamespace(blocks=train.blocks, width=train.width // 2)
    with pytest.raises(ValueError, match="do not fit"):
        train_head(train, TrainConfig(nproj=1, proj_dim=8, epochs=1, blocks="last"), val=narrower)
    from rine.config import HeadConfig

    assert HeadConfig.for_backbone(64, 3, "last", nproj=1, proj_dim=8).takes(5)
    assert not HeadConfig.for_backbone(64, 3, nproj=1, proj_dim=8).takes(4)


def test_average_precision_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 50)
        s = np.round(rng.random(50), 1)  # ties included
        assert average_precision(y, s) == pytest.approx(sklearn.average_precision_score(y, s))


def test_cli_train_is_byte_reproducible_and_loadable(stores, tmp_path):
    from rine.cli import main
    from rine.inference.detector import Detector

    _, train32, val = stores
    args = ["train", "--features", str(train32.root), "--val-features", str(val.root), "--nproj", "2",
            "--proj-dim", "32", "--factor", "0.2", "--epochs", "2", "--seed", "0", "--batch-size", "8", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    for name in ("config.json", "train_log.jsonl", "train_config.json", "importance.png"):
        assert (tmp_path / "a" / name).is_file()
    assert main([*args[:-3], "--seed", "1", "--no-progress", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != a
    det = Detector.from_pretrained(str(tmp_path / "a"), device="cpu")
    preds = det.predict(val.paths[:2])
    assert all(p.error is None and 0 <= p.prob_fake <= 1 for p in preds)
    # the checkpoint scores images as its stored taps say
    head_logits = det.model.head(torch.from_numpy(np.asarray(val.taps[:2], dtype=np.float32))).logits
    np.testing.assert_allclose([p.logit for p in preds], head_logits.detach().numpy(), atol=1e-2)


def test_cli_train_errors(stores, tmp_path):
    from rine.cli import main

    _, train32, _ = stores
    assert main(["train", "--out", str(tmp_path / "x")]) == 2
    assert main(["train", "--features", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert main(["train", "--features", str(train32.root), "--fraction", "0", "--out", str(tmp_path / "x")]) == 2
    assert FeatureStore.open(train32.root).complete



def test_cli_train_checks_out_device_and_lists_before_loading(stores, tmp_path, monkeypatch, capsys):
    import rine.model.backbones
    from rine.cli import main

    _, train32, _ = stores

    def forbidden(*a, **k):
        raise AssertionError("a store or a backbone was loaded before the usage check")

    monkeypatch.setattr(FeatureStore, "open", forbidden)
    monkeypatch.setattr(rine.model.backbones, "load_backbone", forbidden)
    existing = tmp_path / "taken"
    existing.write_text("keep me")
    for args, message in [
        (["--features", str(train32.root), "--out", str(existing)], f"--out {existing}: is a file, not a folder"),
        (["--root", str(tmp_path), "--backbone", "ViT-L/14", "--out", str(existing)], "is a file, not a folder"),
        (["--features", str(train32.root), "--out", str(existing / "ckpt")], "so the folder cannot be created"),
        (["--features", str(train32.root), "--out", str(tmp_path / "x"), "--device", "nope"],
         "--device nope: not a device; use auto, cpu, cuda or cuda:N"),
    ]:
        assert main(["train", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("rine: error: ") and message in err and "Traceback" not in err, err
    assert existing.read_text() == "keep me" and not (tmp_path / "x").exists()
    for args, message in [
        (["--lr-milestones", "3,y"], "argument --lr-milestones: 'y' is not a whole number (example: --lr-milestones 6,11)"),
        (["--lr-milestones", "0"], "'0': each value must be at least 1"),
        (["--nproj", "0"], "argument --nproj: '0': must be at least 1"),
        (["--epochs", "two"], "argument --epochs: 'two' is not a whole number"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["train", "--features", str(train32.root), "--out", str(tmp_path / "x"), *args])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "_ints" not in err and "invalid" not in err, err


def test_cli_train_accepts_device_auto_and_no_milestones(stores, tmp_path):
    from rine.cli import main

    _, train32, _ = stores
    out = tmp_path / "auto"
    assert main(["train", "--features", str(train32.root), "--nproj", "1", "--proj-dim", "8", "--batch-size", "8",
                 "--device", "auto", "--lr-milestones", "", "--no-plot", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "train_config.json").read_text())["train"]["lr_milestones"] == []

def test_preloaded_taps_keep_the_store_dtype_and_train_the_same_head(stores, monkeypatch):
    """A float16 store is held in RAM as float16 (half of float32) and widened per batch,
    which is exact: the same rows and the same trained head as reading the shards."""
    import rine.training.trainer

    _, _, val = stores  # float16, the extraction default
    cached, mapped = StoreTaps(val, preload=True), StoreTaps(val, preload=False)
    assert cached.cache.dtype == torch.float16 and mapped.cache is None
    rows = np.arange(len(val))[::-1].copy()
    a, b = cached.gather(rows), mapped.gather(rows)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    cfg = TrainConfig(nproj=1, proj_dim=8, batch_size=4, epochs=1, seed=0)
    ha, hb = train_head(cached, cfg).head.state_dict(), train_head(mapped, cfg).head.state_dict()
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    # preload=None: in RAM only when the taps take at most half the available memory
    assert rine.training.trainer._fits_in_memory(0) and not rine.training.trainer._fits_in_memory(1 << 62)
    monkeypatch.setattr(rine.training.trainer, "_fits_in_memory", lambda nbytes: False)
    assert StoreTaps(val, preload=None).cache is None
    monkeypatch.setattr(rine.training.trainer, "_fits_in_memory", lambda nbytes: nbytes == val.taps.nbytes)
    assert StoreTaps(val, preload=None).cache is not None


def test_cli_train_from_images_equals_training_on_their_store(stores, data, tiny_backbone_dir, tmp_path):
    """`rine train --root --layout progan --classes` through the CLI trains the head that the
    same images' float32 store trains (same seed, same augmented views)."""
    from rine.cli import main
    from rine.model.checkpoints import load_pretrained

    _, train32, _ = stores
    common = ["--nproj", "2", "--proj-dim", "32", "--epochs", "1", "--seed", "0", "--batch-size", "6",
              "--no-progress", "--no-plot"]
    assert main(["train", "--features", str(train32.root), "--out", str(tmp_path / "store"), *common]) == 0
    assert main(["train", "--root", str(data), "--layout", "progan", "--classes", "car,cat",
                 "--backbone", str(tiny_backbone_dir), "--out", str(tmp_path / "images"), *common]) == 0
    a, _ = load_pretrained(tmp_path / "store")
    b, config = load_pretrained(tmp_path / "images")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert config.meta["layout"] == "progan" and config.meta["classes"] == ["car", "cat"]
    # Negative control: one class fewer is other training data, hence another head.
    assert main(["train", "--root", str(data), "--layout", "progan", "--classes", "car",
                 "--backbone", str(tiny_backbone_dir), "--out", str(tmp_path / "car"), *common]) == 0
    assert not torch.allclose(load_pretrained(tmp_path / "car")[0].state_dict()["proj1.1.weight"], a.state_dict()["proj1.1.weight"])


def test_fraction_is_a_seeded_share_of_the_training_items(stores, tmp_path):
    """--fraction f trains on floor(n * f) items drawn by the seed: the same seed draws the same
    subset (byte-identical heads), another seed another subset."""
    from rine.cli import main
    from rine.training.trainer import subset

    n = 40
    a, b, c = subset(n, 0, 0.25), subset(n, 0, 0.25), subset(n, 1, 0.25)
    assert len(a) == 10 and a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist()) and 0 <= a.min() and a.max() < n
    assert a.tolist() != list(range(10))  # a random share, not the first items
    assert subset(n, 0, 1.0).tolist() == list(range(n))

    _, train32, _ = stores
    args = ["train", "--features", str(train32.root), "--nproj", "2", "--proj-dim", "32", "--epochs", "1",
            "--batch-size", "4", "--fraction", "0.5", "--no-progress", "--no-plot"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main([*args, "--seed", seed, "--out", str(tmp_path / name)]) == 0
    start = json.loads((tmp_path / "a" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["items"] == len(train32) // 2 and start["config"]["fraction"] == 0.5
    weights = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert weights["a"] == weights["b"] and weights["a"] != weights["c"]


def test_ldm_layout_reads_the_reference_lists(tmp_path):
    """The latent-diffusion training set as the reference reads it: LSUN reals named
    <class>_<file> in real_lsun.txt, COCO reals from train2014 or else val2014, one folder of
    fakes per generator; "val" means the "valid" split."""
    from rine.data.datasets import layout_items

    from conftest import write_image

    base = tmp_path / "latent_diffusion_trainingset"
    for split in ("train", "valid"):
        (base / split).mkdir(parents=True)
        (base / split / "real_lsun.txt").write_text(f"car_{split}1.png\ncat_{split}2.png\n")
        (base / split / "real_coco.txt").write_text("000001.jpg\n000002.jpg\n")
        write_image(base / split / "ldm_a" / "0.png", (32, 32))
        write_image(base / split / "ldm_a" / "1.png", (32, 32))
        write_image(base / split / "ldm_b" / "0.png", (32, 32))
    write_image(tmp_path / "coco" / "train2014" / "COCO_train2014_000001.jpg", (32, 32), fmt="JPEG")
    write_image(tmp_path / "coco" / "val2014" / "COCO_val2014_000002.jpg", (32, 32), fmt="JPEG")
    items = layout_items(tmp_path, "ldm", "train")
    assert [(Path(it.path).relative_to(tmp_path).as_posix(), it.label, it.set) for it in items] == [
        ("train/car/0_real/train1.png", 0, "lsun"),
        ("train/cat/0_real/train2.png", 0, "lsun"),
        ("coco/train2014/COCO_train2014_000001.jpg", 0, "coco"),
        ("coco/val2014/COCO_val2014_000002.jpg", 0, "coco"),
        ("latent_diffusion_trainingset/train/ldm_a/0.png", 1, "ldm_a"),
        ("latent_diffusion_trainingset/train/ldm_a/1.png", 1, "ldm_a"),
        ("latent_diffusion_trainingset/train/ldm_b/0.png", 1, "ldm_b"),
    ]
    val = layout_items(tmp_path, "ldm", "val")
    assert [it.path for it in val][:2] == [str(tmp_path / "train/car/0_real/valid1.png"), str(tmp_path / "train/cat/0_real/valid2.png")]
    assert {it.set for it in val if it.label == 1} == {"ldm_a", "ldm_b"}
    with pytest.raises(FileNotFoundError, match="latent_diffusion_trainingset"):
        layout_items(tmp_path / "nothing", "ldm", "train")
