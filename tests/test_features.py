"""The feature store: contents equal the backbone's taps, resumes are exact (also after kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rine.data.augment import CenterView, TrainAugment
from rine.data.datasets import Item, progan_items
from rine.data.preprocess import center_crop_array, normalize
from rine.data.tap_store import COMMITS_NAME, FeatureStore, StoreError
from rine.model.backbones import load_backbone
from rine.training.features import extract_features

from conftest import write_image
from support.image_trees import make_progan


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    return load_backbone(str(tiny_backbone_dir))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_progan(tmp_path_factory.mktemp("progan"))
    (root / "train" / "car" / "0_real" / "broken.png").write_bytes(b"not an image")
    return root


def test_decode_options_reach_the_extraction(backbone, data, tmp_path):
    """`decode=DecodeOptions(max_pixels=...)` is the limit extraction decodes with: images
    over it are skipped as too_many_pixels, the ones at it are stored (the limit is inclusive)."""
    from rine.data.decoding import DecodeOptions

    items = [it for it in progan_items(data, "train", ["car"]) if "broken" not in it.path]
    limit = 210 * 250  # images are (180 + 30 i) x 250: i = 0, 1 fit
    store = extract_features(backbone, items, tmp_path / "s", CenterView(), dtype="float32",
                             decode=DecodeOptions(max_pixels=limit, workers=1))
    over = {it.path for it in items if not it.path.endswith(("/0.png", "/1.png"))}
    assert over and set(store.error_kinds) == over and set(store.error_kinds.values()) == {"too_many_pixels"}
    assert set(store.paths) == {it.path for it in items} - over


def test_store_holds_the_backbone_taps(backbone, data, tmp_path):
    from rine.data.images import load_image

    items = progan_items(data, "train", ["car", "cat"])
    store = extract_features(backbone, items, tmp_path / "s", CenterView(), dtype="float32", batch_size=4, shard_size=5)
    assert store.complete and len(store) == len(items) - 1
    assert store.meta["blocks"] == 3 and store.meta["width"] == 64
    assert [p for p, _ in store.errors] == [str(data / "train/car/0_real/broken.png")]
    assert store.error_kinds == {str(data / "train/car/0_real/broken.png"): "not_image"}  # kept in commits.jsonl
    good = [it for it in items if "broken" not in it.path]
    assert store.paths == [it.path for it in good]
    assert store.labels.tolist() == [it.label for it in good]
    assert store.sets == [it.set for it in good]
    views = np.stack([center_crop_array(np.asarray(load_image(it.path)), 224) for it in good])
    expected = backbone(normalize(torch.from_numpy(views), store_mean(), store_std())).numpy()
    np.testing.assert_allclose(store.taps[:], expected, rtol=1e-5, atol=1e-5)
    # gathers across shards keep the requested order
    rows = np.array([10, 0, 7, 3, 10])
    np.testing.assert_array_equal(store.taps[rows], store.taps[:][rows])
    np.testing.assert_array_equal(store.taps[-1], store.taps[:][-1])
    assert isinstance(np.load(store.root / "shard-000000.npy", mmap_mode="r"), np.memmap)


def store_mean():
    from rine.config import CLIP_MEAN

    return CLIP_MEAN


def store_std():
    from rine.config import CLIP_STD

    return CLIP_STD


def test_views_and_float16(backbone, data, tmp_path):
    items = progan_items(data, "train", ["cat"])
    store = extract_features(backbone, items, tmp_path / "s", TrainAugment(3), views=2, seed=3, batch_size=8)
    assert store.taps.dtype == np.float16 and len(store) == 2 * len(items)
    assert store.views.tolist() == [0, 1] * len(items)
    assert not np.array_equal(store.taps[0], store.taps[1])  # two different augmented views
    assert store.rows_of_view(1).tolist() == list(range(1, 2 * len(items), 2))


def test_refuses_to_mix_settings(backbone, data, tmp_path):
    items = progan_items(data, "train", ["cat"])
    extract_features(backbone, items, tmp_path / "s", TrainAugment(0), seed=0)
    with pytest.raises(StoreError, match=r"seed: store has 0, this run has 1"):
        extract_features(backbone, items, tmp_path / "s", TrainAugment(1), seed=1)
    with pytest.raises(StoreError, match="transform"):
        extract_features(backbone, items, tmp_path / "s", CenterView(), seed=0)
    with pytest.raises(StoreError, match="items_sha1"):
        extract_features(backbone, items[:-1], tmp_path / "s", TrainAugment(0), seed=0)
    # rows of another backbone, revision, dtype or number of views cannot join the store
    with pytest.raises(StoreError, match=r"dtype: store has 'float16', this run has 'float32'"):
        extract_features(backbone, items, tmp_path / "s", TrainAugment(0), seed=0, dtype="float32")
    with pytest.raises(StoreError, match=r"views: store has 1, this run has 2"):
        extract_features(backbone, items, tmp_path / "s", TrainAugment(0), seed=0, views=2)
    source, revision = backbone.source, backbone.revision
    try:
        backbone.source = str(tmp_path / "another-clip")
        with pytest.raises(StoreError, match=r"backbone: store has '.*', this run has '.*another-clip'"):
            extract_features(backbone, items, tmp_path / "s", TrainAugment(0), seed=0)
        backbone.source, backbone.revision = source, "0123abc"
        with pytest.raises(StoreError, match=r"revision: store has .*, this run has '0123abc'"):
            extract_features(backbone, items, tmp_path / "s", TrainAugment(0), seed=0)
    finally:
        backbone.source, backbone.revision = source, revision
    # and the settings the store was made with still resume it
    assert extract_features(backbone, items, tmp_path / "s", TrainAugment(0), seed=0).complete


def test_cli_extract_exits_1_when_images_are_unreadable(data, tiny_backbone_dir, tmp_path, capsys):
    """The readable images are stored, the unreadable one is listed, and the exit status says
    that not everything was extracted (0 once no image is unreadable)."""
    from rine.cli import main

    args = ["extract", "--root", str(data), "--layout", "progan", "--split", "train", "--backbone",
            str(tiny_backbone_dir), "--no-progress", "--dtype", "float32"]
    assert main([*args, "--classes", "car", "--out", str(tmp_path / "car")]) == 1
    assert "1 skipped" in capsys.readouterr().err
    store = FeatureStore.open(tmp_path / "car")
    assert store.complete and [p for p, _ in store.errors] == [str(data / "train/car/0_real/broken.png")]
    assert len(store) == 6
    assert main([*args, "--classes", "cat", "--out", str(tmp_path / "cat")]) == 0  # no broken file there


def test_resume_after_torn_commit_and_stray_tmp(backbone, data, tmp_path):
    items = progan_items(data, "train", ["car", "cat"])
    aug = TrainAugment(0)
    full = extract_features(backbone, items, tmp_path / "full", aug, dtype="float32", shard_size=3)
    part = tmp_path / "part"
    extract_features(backbone, items, part, aug, dtype="float32", shard_size=3)
    lines = (part / COMMITS_NAME).read_bytes().splitlines(keepends=True)
    # keep two commits, tear the third mid-line, leave a half-written shard behind
    (part / COMMITS_NAME).write_bytes(b"".join(lines[:2]) + lines[2][:25])
    (part / "shard-000003.npy.tmp").write_bytes(b"garbage")
    (part / "shard-000004.npy").write_bytes(b"uncommitted garbage")
    assert not FeatureStore.open(part).complete
    resumed = extract_features(backbone, items, part, aug, dtype="float32", shard_size=3)
    assert_same_rows(full, resumed)
    assert not list(part.glob("*.tmp"))


def assert_same_rows(a: FeatureStore, b: FeatureStore) -> None:
    assert a.complete and b.complete
    assert len(a) == len(b)
    assert a.paths == b.paths and a.views.tolist() == b.views.tolist() and a.items.tolist() == b.items.tolist()
    assert a.labels.tolist() == b.labels.tolist() and a.errors == b.errors
    np.testing.assert_array_equal(a.taps[:], b.taps[:])


def _commits(store: Path) -> int:
    try:
        return (store / COMMITS_NAME).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# `rine extract` with a pause before each shard (12 shards here): the kills land while the
# extraction runs however fast the machine is, instead of only when it is slow enough.
SLOW_EXTRACT = """
import sys, time
import rine.data.tap_extract as extract
shard = extract._extract_shard
extract._extract_shard = lambda *a, **k: (time.sleep(0.3), shard(*a, **k))[1]
from rine.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume(tiny_backbone_dir, tmp_path):
    """A real SIGKILL of `python -m rine extract` at several points; the resumed store equals
    an uninterrupted one row by row."""
    from rine.cli import main

    root = make_progan(tmp_path / "data", per_label=6)
    store = tmp_path / "killed"
    args = ["extract", "--root", str(root), "--layout", "progan", "--split", "train", "--classes", "car,cat",
            "--backbone", str(tiny_backbone_dir), "--shard-size", "2", "--views", "2", "--seed", "5",
            "--batch-size", "2", "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    killed_incomplete = 0
    # kill points: as soon as the store exists, after 1 commit, after 4 commits
    for wait_for in (lambda: (store / "meta.json").exists(), lambda: _commits(store) >= 1, lambda: _commits(store) >= 4):
        proc = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT, *args, "--out", str(store)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not wait_for() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and (store / "meta.json").exists():
            killed_incomplete += not FeatureStore.open(store).complete
    assert killed_incomplete >= 2, "the kills should land while the extraction was running"
    assert main([*args, "--out", str(store)]) == 0  # the resume
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    a, b = FeatureStore.open(tmp_path / "clean"), FeatureStore.open(store)
    assert len(a) == 2 * 24
    assert_same_rows(a, b)
    assert json.loads((store / "meta.json").read_text())["seed"] == 5


def test_items_are_plain_records():
    it = Item("a.png", 1, "car")
    assert (it.path, it.label, it.set) == ("a.png", 1, "car")


def test_extract_checks_out_and_device_before_any_work(tmp_path, monkeypatch, capsys):
    import rine.data.datasets
    import rine.model.backbones
    from rine.cli import main

    def forbidden(*a, **k):
        raise AssertionError("the dataset was scanned or the backbone loaded before the usage check")

    monkeypatch.setattr(rine.data.datasets, "layout_items", forbidden)
    monkeypatch.setattr(rine.model.backbones, "load_backbone", forbidden)
    existing = tmp_path / "store.bin"
    existing.write_text("keep me")
    base = ["extract", "--root", str(tmp_path), "--backbone", "ViT-L/14", "--no-progress"]
    for args, message in [
        (["--out", str(existing)], f"--out {existing}: is a file, not a folder"),
        (["--out", str(existing / "store")], "is a file, so the folder cannot be created"),
        (["--out", str(tmp_path / "s"), "--device", "nope"], "--device nope: not a device"),
    ]:
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("rine: error: ") and message in err and "Traceback" not in err, err
    assert existing.read_text() == "keep me" and not (tmp_path / "s").exists()
    for option in ("--workers", "--views", "--batch-size", "--shard-size", "--limit"):
        with pytest.raises(SystemExit) as e:
            main([*base, "--out", str(tmp_path / "s"), option, "0"])
        assert e.value.code == 2
        assert f"argument {option}: '0': must be at least 1" in capsys.readouterr().err

    # an existing folder (a store to resume) passes the checks and goes on to read the dataset
    def no_dataset(*a, **k):
        raise FileNotFoundError("no dataset here")

    monkeypatch.setattr(rine.data.datasets, "layout_items", no_dataset)
    (tmp_path / "resume").mkdir()
    assert main([*base, "--out", str(tmp_path / "resume")]) == 2
    assert capsys.readouterr().err == "rine: error: no dataset here\n"


def test_ten_crop_stores_score_as_the_live_ten_crop(sensitive_checkpoint_dir, tmp_path):
    """`rine extract --transform ten` stores the ten crops of each image; scored as the
    mean of their logits they give the detector's own ten-crop scores, and `rine grid`
    takes such a store as a test transform."""
    from rine.cli import main
    from rine.cli.grid import is_test_transform
    from rine.inference.detector import Detector
    from rine.metrics import average_precision
    from rine.model.checkpoints import load_pretrained
    from rine.training.trainer import StoreTaps, evaluate_store, probabilities, score_taps

    root = make_progan(tmp_path / "data", per_label=2, split="val")
    for i, p in enumerate(sorted(root.rglob("*.png"))[:2]):  # some smaller than the crop: padded
        write_image(p, (150 + 20 * i, 260), seed=40 + i)
    store_dir = tmp_path / "ten"
    head, config = load_pretrained(sensitive_checkpoint_dir)
    base = ["extract", "--root", str(root), "--layout", "progan", "--split", "val", "--backbone", config.backbone,
            "--no-progress", "--transform", "ten"]
    assert main([*base, "--out", str(store_dir)]) == 0
    assert main([*base, "--views", "2", "--out", str(tmp_path / "x")]) == 2
    store = FeatureStore.open(store_dir)
    assert store.n_views == 10 and store.meta["transform"] == "ten-crop/v1(size=224)"
    detector = Detector.from_pretrained(str(sensitive_checkpoint_dir), crop="ten", precision="fp32")
    paths = [it.path for it in progan_items(root, "val")]
    live = [p.logit for p in detector.predict(paths)]
    src = StoreTaps(store)
    stored = score_taps(head, src.cache if src.cache is not None else store.taps)[src.rows].mean(axis=1)
    # float16 taps (the store's default) round by 2^-11 relative: measured 4.2e-4 on logits up to 10
    np.testing.assert_allclose(stored, live, rtol=2e-3, atol=1e-4)
    assert np.ptp(live) > 1.0  # the sensitive head: logits that a wrong crop or view order would move
    labels = np.array([it.label for it in progan_items(root, "val")])
    assert evaluate_store(head, store)["ap"] == pytest.approx(average_precision(labels, probabilities(np.array(live))))
    assert is_test_transform(store.meta["transform"]) and is_test_transform("eval:ten:224:clean")
    assert not is_test_transform("eval:center:224:jpeg-s0") and not is_test_transform(TrainAugment(0).transform_id)
