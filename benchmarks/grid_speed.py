"""Time the paper's 48-run grid both ways on a random-weight ViT-B/32-shaped backbone.

  A. backbone in every step: each run trains 1 epoch on augmented images (the reference's
     loop) and evaluates on the test images, running the encoder every time;
  B. extract once: one `extract_features` of the train views and of the test set, then each
     run trains and evaluates on the stored taps.

Both use the same seeds, so each run sees the same views either way. Also times the
single-run case (A with one run vs. B's extraction + one run).

  python benchmarks/grid_speed.py                 # default: 48 runs, 64 train + 32 test images
  python benchmarks/grid_speed.py --runs 4        # smoke run on the first 4 configs
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rine.data.augment import CenterView, TrainAugment
from rine.data.datasets import progan_items
from rine.model.backbones import TappedCLIPVision
from rine.training.features import extract_features
from rine.training.grid import PAPER_GRID, evaluate_sets, grid_configs, test_sets
from rine.training.trainer import ImageTaps, StoreTaps, TrainConfig, average_precision, train_head


def random_vit_b32() -> TappedCLIPVision:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           patch_size=32, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    torch.manual_seed(0)
    return TappedCLIPVision(CLIPVisionModel(cfg).eval(), source="random-vit-b32")


def make_data(root: Path, n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_test)):
        for i in range(n):
            label = "1_fake" if i % 2 else "0_real"
            arr = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            path = root / split / "car" / label / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)


class Clock:
    """Wall and process-CPU seconds: on a shared machine CPU time is the steadier figure."""

    def __init__(self):
        self.w, self.c = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        return time.perf_counter() - self.w, time.process_time() - self.c


def run_a(backbone, train_items, test_items, configs) -> tuple[float, float]:
    """Backbone in every step: train on images, then run the encoder over the test set."""
    center = CenterView()
    clock = Clock()
    for cfg in configs:
        head = train_head(ImageTaps(backbone, train_items, TrainAugment(cfg.seed)), cfg).head
        test = ImageTaps(backbone, test_items, lambda im, i, v: center(im, i, v))
        pos = np.arange(len(test))
        with torch.no_grad():
            logits = torch.cat([head(test.taps(0, pos[b : b + 64])).logits for b in range(0, len(pos), 64)]).numpy()
        y = test.labels
        _ = np.mean((logits > 0) == (y == 1)) + average_precision(y, logits)
    return clock.lap()


def run_b(backbone, train_items, test_items, configs, out: Path) -> tuple[tuple, tuple]:
    """Extract once, then train and evaluate every run on stored taps.
    -> ((extract wall, cpu), (extract + grid wall, cpu))"""
    clock = Clock()
    train = extract_features(backbone, train_items, out / "train", TrainAugment(0), seed=0, batch_size=32)
    test = extract_features(backbone, test_items, out / "test", CenterView(), batch_size=32)
    t1 = clock.lap()
    src, sets = StoreTaps(train, preload=True), test_sets([test])
    for cfg in configs:
        evaluate_sets(train_head(src, cfg).head, sets)
    return t1, clock.lap()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="training images (default 64)")
    ap.add_argument("--test-images", type=int, default=32, help="test images (default 32)")
    ap.add_argument("--runs", type=int, default=None, help="only the first N grid configs (smoke runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = grid_configs(PAPER_GRID, TrainConfig())[: args.runs]
    backbone = random_vit_b32()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data", args.images, args.test_images)
        train_items = progan_items(root / "data", "train", ["car"])
        test_items = progan_items(root / "data", "val", ["car"])
        print(f"backbone: random ViT-B/32 shape (768 wide, 12 blocks); {len(train_items)} train + "
              f"{len(test_items)} test images; {len(configs)} runs; torch threads {torch.get_num_threads()}")
        # single run: the paper's default config
        single = [TrainConfig()]
        a1 = run_a(backbone, train_items, test_items, single)
        e1, b1 = run_b(backbone, train_items, test_items, single, root / "single")
        for k, unit in ((0, "wall"), (1, "cpu")):
            print(f"single run [{unit}]: backbone-every-step {a1[k]:.2f} s; extract-once {b1[k]:.2f} s "
                  f"(extract {e1[k]:.2f} s); cached/direct = {b1[k] / a1[k]:.3f}x")
        a = run_a(backbone, train_items, test_items, configs)
        e, b = run_b(backbone, train_items, test_items, configs, root / "grid")
        for k, unit in ((0, "wall"), (1, "cpu")):
            print(f"grid of {len(configs)} runs [{unit}]: backbone-every-step {a[k]:.2f} s; extract-once "
                  f"{b[k]:.2f} s (extract {e[k]:.2f} s, {(b[k] - e[k]) / len(configs):.3f} s/run); "
                  f"speed-up {a[k] / b[k]:.1f}x")

if __name__ == "__main__":
    main()
