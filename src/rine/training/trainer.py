"""Training the RINE head, from stored taps or straight from images.

Both sources feed one loop, and every random choice in it has a fixed origin:
  * the head's initial weights and its dropout masks: the global torch RNG, seeded with
    `seed` inside a forked RNG state, and drawn from by nothing but the head;
  * the batch order of epoch e: a numpy permutation seeded by (seed, e), over item
    positions, whatever the taps come from;
  * the view of item i at epoch e: the augmentation seeded by (seed, e, i) (a store with
    K views serves view e mod K).
So one epoch on a float32 store equals one epoch on the images, to float rounding, and
the same store + config + seed gives byte-identical weights on CPU.

Paper defaults: Adam lr 1e-3, batch 128, 1 epoch, BCE(sum) + factor x SupCon(0.07),
lr / 10 at the start of epochs 6 and 11, seed 0.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics
from ..config import HeadConfig, PreprocessConfig, RINEConfig
from ..data.datasets import Item
from ..data.tap_store import FeatureStore
from ..model.head import RINEHead
from .losses import rine_loss

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: the paper's)."""

    nproj: int = 4
    proj_dim: int = 128
    factor: float = 0.2
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    lr_milestones: tuple[int, ...] = (6, 11)
    seed: int = 0
    dropout: float = 0.5
    # Ablations of the paper: no contrastive term, no TIE (uniform mean), last block only.
    contrastive: bool = True
    use_tie: bool = True
    blocks: str = "all"
    fraction: float = 1.0  # share of the training items used (the paper's dataset-size study)

    def __post_init__(self) -> None:
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based `epoch`: divided by 10 at each 1-based milestone reached."""
        return self.lr / 10 ** sum(epoch + 1 >= m for m in self.lr_milestones)


# --------------------------------------------------------------------------- tap sources


class StoreTaps:
    """Training taps from a store: item position p at epoch e -> the row (item, view e mod K).

    preload=True copies the taps into RAM once (grids reuse them many times), in the store's
    own dtype: a float16 store takes half the RAM of float32, and widening float16 to
    float32 per batch is exact. preload=None does so when the taps take at most half the
    memory available now, else reads them from the memory-mapped shards.
    """

    def __init__(self, store: FeatureStore, preload: bool | None = False):
        self.store = store
        self.blocks, self.width = store.meta["blocks"], store.meta["width"]
        k = store.n_views
        self.item_ids = np.unique(store.items)  # [n] item indices present (skipped ones absent)
        pos = {int(i): p for p, i in enumerate(self.item_ids)}
        self.rows = np.full((len(self.item_ids), k), -1, dtype=np.int64)
        for r, (i, v) in enumerate(zip(store.items, store.views, strict=True)):
            self.rows[pos[int(i)], v] = r
        if (self.rows < 0).any():
            raise ValueError(f"{store.root}: some items lack some of their {k} views (incomplete store?)")
        labels = np.zeros(len(self.item_ids), dtype=np.int64)
        labels[[pos[int(i)] for i in store.items]] = store.labels
        self.labels = labels
        if preload is None:
            preload = _fits_in_memory(store.taps.nbytes)
            if not preload:
                logger.info("%s: %.1f GB of taps, more than half the free memory: reading them from disk",
                            store.root, store.taps.nbytes / 1e9)
        self.cache = torch.from_numpy(np.ascontiguousarray(store.taps[:])) if preload else None

    def __len__(self) -> int:
        return len(self.item_ids)

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """Store rows -> float32 [len(rows), blocks, width]."""
        if self.cache is not None:
            return self.cache[torch.from_numpy(rows)].float()
        return torch.from_numpy(self.store.taps[rows].astype(np.float32))

    def taps(self, epoch: int, positions: np.ndarray) -> torch.Tensor:
        """-> float32 [len(positions), blocks, width]"""
        return self.gather(self.rows[positions, epoch % self.rows.shape[1]])


def _fits_in_memory(nbytes: int) -> bool:
    """Whether `nbytes` is at most half the memory available now (True where unknown)."""
    try:  # Linux: MemAvailable counts reclaimable page cache, unlike the free-page count
        with open("/proc/meminfo", encoding="ascii") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        available = kb * 1024
    except (OSError, StopIteration, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return True
    return nbytes <= available // 2


class ImageTaps:
    """Training taps computed on the fly: the reference's loop (backbone in every step).

    `make_views(image, item_index, view)` is called with view = epoch, so it draws the
    same views as a store extracted with the same seed (view slot = epoch).
    An unreadable image stops training with a ValueError naming it (extract a store to skip them).
    """

    def __init__(self, backbone, items: Sequence[Item], make_views, num_workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.backbone, self.items, self.make_views = backbone, list(items), make_views
        self.blocks, self.width = backbone.n_blocks, backbone.width
        self.item_ids = np.arange(len(self.items))
        self.labels = np.array([it.label for it in self.items], dtype=np.int64)
        self.pool = ThreadPoolExecutor(max_workers=num_workers or 2)

    def __len__(self) -> int:
        return len(self.items)

    def taps(self, epoch: int, positions: np.ndarray) -> torch.Tensor:
        from ..data.preprocess import normalize
        from ..data.tap_extract import load_views
        from .features import backbone_mean, backbone_std

        loaded = list(self.pool.map(lambda p: load_views(self.items[p], int(p), self._view_of(epoch), 1, None), positions))
        bad = [self.items[p].path for p, v in zip(positions, loaded, strict=True) if isinstance(v, str)]
        if bad:
            raise ValueError(f"unreadable training images: {bad[:3]}")
        pixels = normalize(torch.from_numpy(np.concatenate(loaded)), backbone_mean(self.backbone), backbone_std(self.backbone))
        device = next(self.backbone.parameters()).device
        return self.backbone(pixels.to(device)).float().cpu()  # [batch, blocks, width]

    def _view_of(self, epoch: int):
        make_views = self.make_views

        def one(image, index, _view):
            return make_views(image, index, epoch)

        return one


# --------------------------------------------------------------------------- metrics


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's `average_precision_score` (see `rine.metrics`); NaN without fake images."""
    ap = metrics.average_precision(labels, scores)
    return float("nan") if ap is None else ap


@torch.no_grad()
def score_taps(head: RINEHead, taps, batch_size: int = 1024, device: str | torch.device = "cpu") -> np.ndarray:
    """Logits of stored taps: taps [N, blocks, width] (array, ShardedArray or tensor) -> float64 [N]."""
    head.eval()
    out = []
    for b0 in range(0, len(taps), batch_size):
        chunk = taps[b0 : b0 + batch_size]
        x = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.asarray(chunk, dtype=np.float32))
        out.append(head(x.float().to(device)).logits.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """float32 sigmoid, as the reference scores images (`torch.sigmoid` of float32 logits).

    AP must be computed on these, not on the logits: float32 rounds every logit above about
    16.6 to a probability of exactly 1.0, and those ties are part of the published AP."""
    return torch.sigmoid(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))).numpy()


def evaluate_store(head: RINEHead, store: FeatureStore | StoreTaps, factor: float = 0.2,
                   contrastive: bool = True, batch_size: int = 1024) -> dict[str, float]:
    """acc (threshold 0.5), ap and loss (per sample) of `head` on a store's view-0 rows.

    Items of stores made with several views are scored as the mean of their view logits
    (ten-crop style)."""
    src = store if isinstance(store, StoreTaps) else StoreTaps(store)
    taps = src.cache if src.cache is not None else src.store.taps
    logits = score_taps(head, taps, batch_size)  # [rows]
    per_item = logits[src.rows].mean(axis=1)  # [items]
    y = src.labels
    loss = 0.0
    with torch.no_grad():
        for b0 in range(0, len(y), batch_size):
            rows = src.rows[b0 : b0 + batch_size, 0]
            out = head(src.gather(rows))
            total, _, _ = rine_loss(out.logits, out.embedding, torch.from_numpy(y[b0 : b0 + batch_size]), factor, contrastive)
            loss += float(total)
    prob = probabilities(per_item)
    return {"acc": float(np.mean((prob > 0.5) == (y == 1))), "ap": average_precision(y, prob),
            "loss": loss / max(1, len(y)), "n": int(len(y))}


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    head: RINEHead  # the best epoch's weights (the last epoch's without validation)
    best_epoch: int  # 1-based
    history: list[dict[str, Any]] = field(default_factory=list)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The batch order of an epoch: a permutation of item positions, [n]."""
    return np.random.default_rng([int(seed), 1, int(epoch)]).permutation(n)


def subset(n: int, seed: int, fraction: float) -> np.ndarray:
    """Positions kept when training on a fraction of the items, sorted, [round-down n*fraction]."""
    if fraction >= 1:
        return np.arange(n)
    return np.sort(np.random.default_rng([int(seed), 2]).permutation(n)[: max(1, int(n * fraction))])


def build_head(config: TrainConfig, width: int, blocks: int) -> RINEHead:
    """A fresh head for taps [*, blocks, width] (`HeadConfig.for_backbone`: all blocks, or the last)."""
    hc = HeadConfig.for_backbone(width, blocks, config.blocks, nproj=config.nproj, proj_dim=config.proj_dim,
                                 dropout=config.dropout, use_tie=config.use_tie)
    return RINEHead(hc)


def train_head(
    train: StoreTaps | ImageTaps,
    config: TrainConfig,
    val: FeatureStore | StoreTaps | None = None,
    log_path: str | Path | None = None,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train a fresh head on `train`; validate on `val` after each epoch and keep the best
    (highest val accuracy, then lowest val loss). Writes one JSON line per epoch to `log_path`."""
    device = torch.device(device)
    log = open(log_path, "w", encoding="utf-8") if log_path else None
    val_src = StoreTaps(val, preload=None) if isinstance(val, FeatureStore) else val
    positions = subset(len(train), config.seed, config.fraction)
    history: list[dict[str, Any]] = []
    best: tuple | None = None
    best_state, best_epoch = None, config.epochs
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        _write(log, {"event": "start", "config": asdict(config), "items": int(len(positions))})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)  # head init, then dropout masks; nothing else draws
            head = build_head(config, train.width, train.blocks).to(device)
            if val_src is not None and (val_src.width != train.width or not head.config.takes(val_src.blocks)):
                raise ValueError(f"validation taps [*, {val_src.blocks}, {val_src.width}] do not fit a head trained "
                                 f"on [*, {train.blocks}, {train.width}]: extract both with the same backbone")
            opt = torch.optim.Adam(head.parameters(), lr=config.lr)
            for epoch in range(config.epochs):
                t0 = time.perf_counter()
                lr = config.lr_at(epoch)
                for group in opt.param_groups:
                    group["lr"] = lr
                head.train()
                order = positions[epoch_order(len(positions), config.seed, epoch)]
                sums = np.zeros(3)
                steps = range(0, len(order), config.batch_size)
                if progress:
                    from tqdm.auto import tqdm

                    steps = tqdm(steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch")
                for b0 in steps:
                    pos = order[b0 : b0 + config.batch_size]
                    taps = train.taps(epoch, pos).to(device)  # [batch, blocks, width]
                    labels = torch.from_numpy(train.labels[pos]).to(device)
                    out = head(taps)
                    loss, bce, sc = rine_loss(out.logits, out.embedding, labels, config.factor, config.contrastive)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sums += [float(loss.detach()), float(bce), float(sc)]
                n_batches = max(1, len(steps))
                record = {"event": "epoch", "epoch": epoch + 1, "lr": lr, "loss": sums[0] / n_batches,
                          "bce": sums[1] / n_batches, "supcon": sums[2] / n_batches}
                if val_src is not None:
                    with torch.random.fork_rng(devices=devices):  # validation leaves dropout's stream alone
                        m = evaluate_store(head.cpu() if device.type != "cpu" else head, val_src,
                                           config.factor, config.contrastive)
                        head.to(device)
                    record.update(val_acc=m["acc"], val_ap=m["ap"], val_loss=m["loss"])
                    key = (m["acc"], -m["loss"])
                    if best is None or key > best:
                        best, best_epoch = key, epoch + 1
                        best_state = copy.deepcopy(head.state_dict())
                record["seconds"] = round(time.perf_counter() - t0, 3)
                history.append(record)
                _write(log, record)
                logger.info("epoch %d: %s", epoch + 1, {k: v for k, v in record.items() if k != "event"})
        if best_state is not None:
            head.load_state_dict(best_state)
        head = head.cpu().eval()
        _write(log, {"event": "end", "best_epoch": best_epoch})
    finally:
        if log:
            log.close()
    return TrainResult(head=head, best_epoch=best_epoch, history=history)


def _write(log, record: dict) -> None:
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()


# --------------------------------------------------------------------------- outputs


def save_run(result: TrainResult, config: TrainConfig, out_dir: str | Path, backbone: str,
             revision: str | None = None, name: str | None = None, meta: dict | None = None,
             plot: bool = True) -> Path:
    """Write the checkpoint (config.json + model.safetensors, loadable by `rine detect
    --model OUT`), the resolved training config and the block-importance plot."""
    from ..model.checkpoints import save_pretrained

    out = Path(out_dir)
    rcfg = RINEConfig(backbone=backbone, head=result.head.config, backbone_revision=revision,
                      preprocess=PreprocessConfig(), name=name,
                      meta={"trained_with": "rine train", "best_epoch": result.best_epoch,
                            "train_config": asdict(config), **(meta or {})})
    save_pretrained(result.head, rcfg, out)
    (out / "train_config.json").write_text(json.dumps({"train": asdict(config), **(meta or {})}, indent=2) + "\n")
    if plot:
        plot_importance(result.head, out / "importance.png")
    return out


def plot_importance(head: RINEHead, path: str | Path) -> Path:
    """Bar chart of the learned importance of each block (softmax(alpha) averaged over channels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imp = head.block_importance().detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(imp) + 2), 3))
    ax.bar(np.arange(1, len(imp) + 1), imp)
    ax.set_xlabel("block")
    ax.set_ylabel("importance")
    ax.set_title("RINE block importance (TIE)" if head.config.use_tie else "uniform block weights (no TIE)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
