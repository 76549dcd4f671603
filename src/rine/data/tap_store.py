"""The tap store on disk: sharded, resumable, memory-mapped backbone taps (format `rine-features/1`).

One format, one writer (`StoreWriter`), whichever engine computes the taps: `rine extract`
(`rine.training.features`), eval's cached scoring (`rine.evaluation.scoring`) and `rine batch
--taps` (Ray actors) all commit shards through it, so readers cannot tell them apart. NumPy
only: it sits in the data layer, below training and evaluation, and decoding workers import
this package.

The backbone is frozen, so its taps of an image view never change: extracting them once
and training the head on the stored taps is the same computation as running the encoder
in every training step. A store holds, per image and per view, the taps
[blocks, width] plus the label, path, set and view of the row.

Layout of a store folder:

    meta.json          backbone, revision, transform, seed, dtype, views, blocks, width, ...
    items.json         the input list: paths, labels, sets (row `item` indexes it)
    shard-000000.npy   taps of the shard's rows [rows, blocks, width] (np.save format)
    commits.jsonl      one line per finished shard: the source of truth

Resumability (also against kill -9): a shard's array is written to a temporary name,
fsynced and renamed (`rine.fileio`), and only then is its line appended to `commits.jsonl`
(and fsynced).
A shard without a complete commit line does not exist: a rerun rewrites it. A torn last
line is cut off. Rows come in a fixed order (shard, item, view), and a view depends only
on (seed, item, view), so a resumed store has exactly the rows of an uninterrupted one.

Reading:

    store = FeatureStore.open("feats/")
    store.taps[rows]       # -> np.ndarray [len(rows), blocks, width], from memory-mapped shards
    store.labels, store.paths, store.sets, store.views, store.items, store.meta
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import append_durably, atomic_write
from .datasets import Item

logger = logging.getLogger(__name__)

FORMAT = "rine-features/1"
META_NAME = "meta.json"
ITEMS_NAME = "items.json"
COMMITS_NAME = "commits.jsonl"
DTYPES = ("float16", "float32", "bfloat16")
# Keys that must agree between a store and a run that adds rows to it.
IDENTITY_KEYS = ("format", "backbone", "revision", "transform", "seed", "dtype", "views",
                 "blocks", "width", "image_size", "shard_size", "n_items", "items_sha1", "precision")

class StoreError(ValueError):
    """A store that cannot be read or extended; `str()` is a user-facing message."""


def items_sha1(items: Sequence[Item]) -> str:
    h = hashlib.sha1()
    for it in items:
        h.update(f"{it.path}\t{int(it.label)}\t{it.set}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


class ShardedArray:
    """Rows of several memory-mapped shards seen as one [N, blocks, width] array.

    Indexing with an int, a slice or an integer array returns a new np.ndarray (only the
    requested rows are read from disk).
    """

    def __init__(self, shards: list[np.ndarray], row_shape: tuple[int, ...], dtype: np.dtype):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.shape = (int(self.offsets[-1]), *row_shape)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, index) -> np.ndarray:
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"row {index} out of range for {n} rows")
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return np.asarray(self.shards[s][i - self.offsets[s]])
        rows = np.arange(n)[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        if rows.ndim != 1:
            raise IndexError("index with an int, a slice or a 1-D integer array")
        rows = np.where(rows < 0, rows + n, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        out = np.empty((rows.size, *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            local = rows[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            out[sel[order]] = self.shards[s][local[order]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class FeatureStore:
    """A read-only view of a store folder (see the module docstring).

    meta:   dict (backbone, revision, transform, seed, dtype, views, blocks, width, ...)
    taps:   ShardedArray [N, blocks, width] (dtype of the store)
    labels: int64 [N]; views: int64 [N]; items: int64 [N] (index into the input list)
    paths, sets: lists of N strings; errors: [(path, reason)] of skipped inputs;
    error_kinds: {path: kind} of the skipped inputs whose kind was recorded
    complete: every shard of the input list is committed
    """

    def __init__(self, root: Path, meta: dict, item_list: list[Item], commits: list[dict]):
        self.root = root
        self.meta = meta
        self.item_list = item_list
        self.commits = sorted(commits, key=lambda c: c["shard"])
        n_shards = math.ceil(meta["n_items"] / meta["shard_size"]) if meta["n_items"] else 0
        self.complete = len(self.commits) == n_shards
        dtype = _np_dtype(meta["dtype"])
        row_shape = (meta["blocks"], meta["width"])
        shards = []
        for c in self.commits:
            path = root / c["file"]
            arr = np.load(path, mmap_mode="r") if c["rows"] else np.empty((0, *row_shape), dtype)
            if arr.shape != (c["rows"], *row_shape):
                raise StoreError(f"{path}: shape {arr.shape} does not match its commit ({c['rows']} rows)")
            shards.append(arr)
        self.taps = ShardedArray(shards, row_shape, dtype)
        self.items = np.array([i for c in self.commits for i in c["items"]], dtype=np.int64)
        self.views = np.array([v for c in self.commits for v in c["views"]], dtype=np.int64)
        self.labels = np.array([item_list[i].label for i in self.items], dtype=np.int64)
        self.paths = [item_list[i].path for i in self.items]
        self.sets = [item_list[i].set for i in self.items]
        self.errors = [(item_list[i].path, reason) for c in self.commits for i, reason in c["errors"]]
        # path -> error_kind of a skipped input (stores written before kinds were kept have none)
        self.error_kinds = {item_list[i].path: kind for c in self.commits for i, kind in c.get("error_kinds", ())}

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        root = Path(path).expanduser()
        meta_path = root / META_NAME
        if not meta_path.is_file():
            raise StoreError(f"{root} is not a feature store (no {META_NAME}); create one with `rine extract`")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise StoreError(f"{root}: unsupported store format {meta.get('format')!r} (expected {FORMAT})")
        items = _read_items(root)
        commits, _ = _read_commits(root / COMMITS_NAME)
        return cls(root, meta, items, commits)

    def __len__(self) -> int:
        return len(self.taps)

    @property
    def n_views(self) -> int:
        return int(self.meta["views"])

    def rows_of_view(self, view: int) -> np.ndarray:
        """Row indices of one view slot, in item order -> int64 [rows]."""
        return np.nonzero(self.views == view)[0]

    def __repr__(self) -> str:
        m = self.meta
        state = "complete" if self.complete else "INCOMPLETE"
        return (f"FeatureStore({str(self.root)!r}, rows={len(self)}, items={m['n_items']}, views={m['views']}, "
                f"backbone={m['backbone']!r}, transform={m['transform']!r}, {state})")


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        raise StoreError("bfloat16 stores are not supported by numpy memory maps; use float16 or float32")
    return np.dtype(name)


def _read_items(root: Path) -> list[Item]:
    data = json.loads((root / ITEMS_NAME).read_text(encoding="utf-8"))
    return [Item(p, int(lab), s) for p, lab, s in zip(data["paths"], data["labels"], data["sets"], strict=True)]


def _read_commits(path: Path) -> tuple[list[dict], int]:
    """Complete commit lines, and the byte length they span (a torn tail is ignored)."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    commits, good = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # torn write of the last line: that shard is not committed
        try:
            commits.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    seen: dict[int, dict] = {}
    for c in commits:
        seen[c["shard"]] = c  # a shard committed twice keeps its latest line
    return list(seen.values()), good


# --------------------------------------------------------------------------- writing


def _check_identity(root: Path, old: dict, new: dict) -> None:
    diffs = [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]
    if diffs:
        lines = "; ".join(f"{k}: store has {old.get(k)!r}, this run has {new.get(k)!r}" for k in diffs)
        raise StoreError(
            f"{root} was made with different settings and rows cannot be mixed ({lines}). "
            "Use another output folder, or rerun with the store's settings."
        )


class StoreWriter:
    """Creates (or reopens) a store folder and commits shards, whoever computed their taps.

    backbone_meta: backbone (its source), revision, blocks, width, image_size of the encoder
    that made the taps; with the other arguments it forms meta.json, and reopening a store
    made with different settings raises StoreError (rows of two settings never mix). On
    (re)opening, a torn last commit line left by a killed run is cut off and stale `*.tmp`
    files are removed. `done` holds the shards already committed (a rerun skips them);
    `commit(k, ...)` writes shard k atomically, then appends its commit line (fsynced).
    """

    def __init__(self, out_dir: str | Path, backbone_meta: dict[str, Any], items: Sequence[Item], transform_id: str,
                 views: int, seed: int, dtype: str, shard_size: int, extra_meta: dict[str, Any] | None = None):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        if views < 1 or shard_size < 1:
            raise ValueError("views and shard_size must be at least 1")
        self.items = [Item(str(it.path), int(it.label), str(it.set)) for it in items]
        self.root = Path(out_dir).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.dtype, self.shard_size = dtype, int(shard_size)
        self.row_shape = (int(backbone_meta["blocks"]), int(backbone_meta["width"]))
        self.meta = {"format": FORMAT, "backbone": str(backbone_meta["backbone"]), "revision": backbone_meta["revision"],
                     "transform": transform_id, "seed": int(seed), "dtype": dtype, "views": int(views),
                     "blocks": self.row_shape[0], "width": self.row_shape[1],
                     "image_size": int(backbone_meta["image_size"]), "shard_size": self.shard_size,
                     "n_items": len(self.items), "items_sha1": items_sha1(self.items), **(extra_meta or {})}
        meta_path = self.root / META_NAME
        if meta_path.is_file():
            _check_identity(self.root, json.loads(meta_path.read_text(encoding="utf-8")), self.meta)
        else:
            payload = {"paths": [i.path for i in self.items], "labels": [i.label for i in self.items],
                       "sets": [i.set for i in self.items]}
            atomic_write(self.root / ITEMS_NAME, json.dumps(payload))
            # meta.json last: a folder with meta.json always has its items.json
            atomic_write(meta_path, json.dumps(self.meta, indent=2) + "\n")
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

    def todo(self) -> list[int]:
        """The shards not committed yet, in order."""
        return [k for k in range(self.n_shards) if k not in self.done]

    def commit(self, shard: int, taps: np.ndarray, row_items: Sequence[int], row_views: Sequence[int],
               errors: Sequence[Sequence]) -> None:
        """Write shard `shard`: taps [rows, blocks, width] in (item, view) order, with each row's
        item and view, and [item, reason] or [item, reason, kind] of its unreadable items (the
        kinds, `rine.data.decoding.error_kind`, go in their own field: readers of the
        format's `errors` pairs are unchanged)."""
        array = np.asarray(taps, dtype=self.dtype).reshape(-1, *self.row_shape)
        start, stop = self.shard_range(shard)
        name = f"shard-{shard:06d}.npy"
        atomic_write(self.root / name, lambda f: np.save(f, array, allow_pickle=False))
        line = {"shard": shard, "file": name, "rows": len(array), "start": start, "stop": stop,
                "items": [int(i) for i in row_items], "views": [int(v) for v in row_views],
                "errors": [[int(e[0]), str(e[1])] for e in errors]}
        kinds = [[int(e[0]), str(e[2])] for e in errors if len(e) > 2]
        if kinds:
            line["error_kinds"] = kinds
        append_durably(self.commits_path, (json.dumps(line) + "\n").encode())
        self.done.add(shard)

    def open(self) -> FeatureStore:
        """The store as written so far, opened for reading."""
        return FeatureStore.open(self.root)


def iter_shards(store: FeatureStore) -> Iterable[tuple[int, np.ndarray]]:
    """(first row, taps [rows, blocks, width]) per committed shard, for streaming readers."""
    for off, arr in zip(store.taps.offsets[:-1], store.taps.shards, strict=True):
        yield int(off), arr
