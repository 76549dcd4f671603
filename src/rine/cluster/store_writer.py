"""A feature store written by another engine: `rine batch --taps` commits the shards that
its Ray actors computed, in exactly the layout of `rine extract` (`rine.training.features`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.datasets import Item
from ..training.features import (  # the store's own helpers: same files, same commit protocol
    COMMITS_NAME,
    FORMAT,
    ITEMS_NAME,
    META_NAME,
    _check_identity,
    _read_commits,
    _write_atomic,
    items_sha1,
)

logger = logging.getLogger(__name__)


class StoreWriter:
    """Creates (or reopens) a store folder and commits shards computed elsewhere -- by
    `rine batch --taps` on Ray -- in exactly the layout `extract_features` writes: same
    meta.json keys, items.json, shard files and commit lines, so `FeatureStore`, `rine train
    --features` and `rine grid` cannot tell the two apart.

    `done` holds the shards already committed (a rerun skips them); `commit(k, ...)` writes
    shard k atomically then appends its commit line (the same kill -9 safety).
    """

    def __init__(self, out_dir: str | Path, backbone_meta: dict[str, Any], items: Sequence[Item], transform_id: str,
                 views: int, seed: int, dtype: str, shard_size: int, extra_meta: dict[str, Any] | None = None):  # fmt: skip
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        self.items = [Item(str(it.path), int(it.label), str(it.set)) for it in items]
        self.root = Path(out_dir).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype, self.shard_size = dtype, int(shard_size)
        self.row_shape = (int(backbone_meta["blocks"]), int(backbone_meta["width"]))
        # the keys and their order are extract_features' (backbone_meta: backbone, revision, blocks, width, image_size)
        meta = {"format": FORMAT, "backbone": str(backbone_meta["backbone"]), "revision": backbone_meta["revision"],
                "transform": transform_id, "seed": int(seed), "dtype": dtype, "views": int(views),
                "blocks": self.row_shape[0], "width": self.row_shape[1], "image_size": int(backbone_meta["image_size"]),
                "shard_size": self.shard_size, "n_items": len(self.items), "items_sha1": items_sha1(self.items),
                **(extra_meta or {})}  # fmt: skip
        meta_path = self.root / META_NAME
        if meta_path.is_file():
            _check_identity(self.root, json.loads(meta_path.read_text(encoding="utf-8")), meta)
        else:
            payload = {"paths": [i.path for i in self.items], "labels": [i.label for i in self.items],
                       "sets": [i.set for i in self.items]}  # fmt: skip
            _write_atomic(self.root / ITEMS_NAME, lambda f: f.write(json.dumps(payload).encode()))
            _write_atomic(meta_path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
        self.commits_path = self.root / COMMITS_NAME
        commits, good = _read_commits(self.commits_path)
        if self.commits_path.is_file() and self.commits_path.stat().st_size != good:
            logger.warning("%s: dropping a torn commit line left by an interrupted run", self.commits_path)
            with open(self.commits_path, "r+b") as f:
                f.truncate(good)
        self.done = {c["shard"] for c in commits}
        for stale in self.root.glob("*.tmp"):
            stale.unlink()
        self.n_shards = math.ceil(len(self.items) / self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Items [start, stop) of shard `shard`."""
        return shard * self.shard_size, min(len(self.items), (shard + 1) * self.shard_size)

    def commit(self, shard: int, taps: np.ndarray, row_items: list[int], row_views: list[int], errors: list[list]) -> None:
        """Write shard `shard`: taps [rows, blocks, width] in (item, view) order, with each row's
        item and view, and [item, reason] of its unreadable items."""
        array = np.asarray(taps, dtype=self.dtype).reshape(-1, *self.row_shape)
        start, stop = self.shard_range(shard)
        name = f"shard-{shard:06d}.npy"
        _write_atomic(self.root / name, lambda f: np.save(f, array, allow_pickle=False))
        line = {"shard": shard, "file": name, "rows": len(array), "start": start, "stop": stop,
                "items": [int(i) for i in row_items], "views": [int(v) for v in row_views],
                "errors": [[int(i), str(r)] for i, r in errors]}  # fmt: skip
        with open(self.commits_path, "ab") as f:
            f.write((json.dumps(line) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.done.add(shard)
