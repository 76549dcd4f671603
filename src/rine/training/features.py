"""A sharded, resumable, memory-mapped store of backbone taps.

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
fsynced and renamed, and only then is its line appended to `commits.jsonl` (and fsynced).
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
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import Item
from ..data.decoding import ordered_map
from ..data.images import ImageLoadError, load_image
from ..data.preprocess import normalize

logger = logging.getLogger(__name__)

FORMAT = "rine-features/1"
META_NAME = "meta.json"
ITEMS_NAME = "items.json"
COMMITS_NAME = "commits.jsonl"
DTYPES = ("float16", "float32", "bfloat16")
# Keys that must agree between a store and a run that adds rows to it.
IDENTITY_KEYS = ("format", "backbone", "revision", "transform", "seed", "dtype", "views",
                 "blocks", "width", "image_size", "shard_size", "n_items", "items_sha1", "precision")  # fmt: skip

MakeViews = Callable[[Any, int, int], np.ndarray]


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
    paths, sets: lists of N strings; errors: [(path, reason)] of skipped inputs
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
                f"backbone={m['backbone']!r}, transform={m['transform']!r}, {state})")  # fmt: skip


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


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_identity(root: Path, old: dict, new: dict) -> None:
    diffs = [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]
    if diffs:
        lines = "; ".join(f"{k}: store has {old.get(k)!r}, this run has {new.get(k)!r}" for k in diffs)
        raise StoreError(
            f"{root} was made with different settings and rows cannot be mixed ({lines}). "
            "Use another output folder, or rerun with the store's settings."
        )


def extract_features(
    backbone,
    items: Sequence[Item],
    out_dir: str | Path,
    make_views: MakeViews,
    transform_id: str | None = None,
    views: int = 1,
    seed: int = 0,
    dtype: str = "float16",
    batch_size: int = 32,
    shard_size: int = 1024,
    num_workers: int | None = None,
    progress: bool = False,
    extra_meta: dict[str, Any] | None = None,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> FeatureStore:
    """Run `backbone` over `items` x `views` and write (or complete) the store at `out_dir`.

    make_views(image: RGB PIL, item_index, view_index) -> uint8 [S, S, 3]; it must depend
    only on its arguments (and the seed it was built with) for resumes to be exact. If it
    has `all_views(image, item_index) -> uint8 [views, S, S, 3]`, that is called instead,
    once per image (for view slots that share work, like ten-crop).
    transform_id names `make_views` (default: its `.transform_id`); `seed` is recorded and
    checked, the caller builds `make_views` with it.
    Unreadable images are logged, skipped and listed in the store's `errors`.
    Returns the store opened for reading.
    """
    if views < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError("views, batch_size and shard_size must be at least 1")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    transform_id = transform_id or getattr(make_views, "transform_id", None)
    if not transform_id:
        raise ValueError("give a transform_id naming make_views (stores refuse to mix transforms)")
    items = [Item(str(it.path), int(it.label), str(it.set)) for it in items]
    root = Path(out_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "backbone": str(backbone.source),
        "revision": backbone.revision,
        "transform": transform_id,
        "seed": int(seed),
        "dtype": dtype,
        "views": int(views),
        "blocks": int(backbone.n_blocks),
        "width": int(backbone.width),
        "image_size": int(backbone.image_size),
        "shard_size": int(shard_size),
        "n_items": len(items),
        "items_sha1": items_sha1(items),
        **(extra_meta or {}),
    }
    meta_path = root / META_NAME
    if meta_path.is_file():
        _check_identity(root, json.loads(meta_path.read_text(encoding="utf-8")), meta)
    else:
        payload = {"paths": [i.path for i in items], "labels": [i.label for i in items], "sets": [i.set for i in items]}
        _write_atomic(root / ITEMS_NAME, lambda f: f.write(json.dumps(payload).encode()))
        # meta.json last: a folder with meta.json always has its items.json
        _write_atomic(meta_path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))

    commits_path = root / COMMITS_NAME
    commits, good = _read_commits(commits_path)
    if commits_path.is_file() and commits_path.stat().st_size != good:
        logger.warning("%s: dropping a torn commit line left by an interrupted run", commits_path)
        with open(commits_path, "r+b") as f:
            f.truncate(good)
    done = {c["shard"] for c in commits}
    for stale in root.glob("*.tmp"):
        stale.unlink()

    n_shards = math.ceil(len(items) / shard_size)
    todo = [k for k in range(n_shards) if k not in done]
    if done:
        logger.info("%s: %d of %d shards already committed, resuming", root, len(done), n_shards)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=min(len(done) * shard_size, len(items)), unit="img", desc="extract")
    workers = max(1, num_workers if num_workers is not None else min(8, os.cpu_count() or 1))
    device = next(backbone.parameters()).device
    for k in todo:
        start, stop = k * shard_size, min(len(items), (k + 1) * shard_size)
        _extract_shard(backbone, items, start, stop, make_views, views, dtype, batch_size,
                       workers, device, root, k, commits_path, bar, max_pixels, max_bytes)  # fmt: skip
    if bar is not None:
        bar.close()
    store = FeatureStore.open(root)
    if store.errors:
        logger.warning("%s: %d unreadable inputs skipped (listed in the store's errors)", root, len(store.errors))
    return store


def _load_views(item: Item, index: int, make_views: MakeViews, views: int, max_pixels, max_bytes=None) -> np.ndarray | str:
    """uint8 [views, S, S, 3], or the one-line reason the image is unusable."""
    try:
        kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
        if max_bytes is not None:
            kwargs["max_bytes"] = max_bytes
        image = load_image(item.path, **kwargs)
        all_views = getattr(make_views, "all_views", None)  # every slot from one derivation
        if all_views is not None:
            out = np.asarray(all_views(image, index))
            if len(out) != views:
                raise RuntimeError(f"make_views.all_views gave {len(out)} views, expected {views}")
            return out
        return np.stack([make_views(image, index, v) for v in range(views)])
    except (ImageLoadError, ValueError, OSError) as e:
        return str(e) or type(e).__name__


def _extract_shard(backbone, items, start, stop, make_views, views, dtype, batch_size,
                   workers, device, root, shard, commits_path, bar, max_pixels, max_bytes) -> None:  # fmt: skip
    taps: list[np.ndarray] = []
    row_items: list[int] = []
    row_views: list[int] = []
    errors: list[list] = []
    chunk = max(1, batch_size // views)
    good: list[np.ndarray] = []

    def encode() -> None:
        batch = torch.from_numpy(np.concatenate(good))  # [n * views, S, S, 3]
        pixels = normalize(batch, backbone_mean(backbone), backbone_std(backbone)).to(device)
        for b0 in range(0, len(pixels), batch_size):
            out = backbone(pixels[b0 : b0 + batch_size])  # [b, blocks, width]
            taps.append(out.float().cpu().numpy().astype(dtype))
        good.clear()

    # Threads (make_views may be a closure): the next images decode while a chunk encodes.
    jobs = ((i, (items[i], i, make_views, views, max_pixels, max_bytes)) for i in range(start, stop))
    decoded = ordered_map(_load_views, jobs, kind="threads", workers=workers, max_in_flight=2 * chunk)
    with closing(decoded):
        for i, res, error in decoded:
            if error is not None:
                raise error  # _load_views returns the reasons of unusable images; anything else is a bug
            if isinstance(res, str):
                logger.warning("skipping %s: %s", items[i].path, res)
                errors.append([i, res])
            else:
                good.append(res)
                row_items += [i] * views
                row_views += list(range(views))
                if len(good) >= chunk:
                    encode()
            if bar is not None:
                bar.update(1)
    if good:
        encode()
    row_shape = (backbone.n_blocks, backbone.width)
    array = np.concatenate(taps) if taps else np.empty((0, *row_shape), dtype=dtype)
    name = f"shard-{shard:06d}.npy"
    _write_atomic(root / name, lambda f: np.save(f, array, allow_pickle=False))
    line = {"shard": shard, "file": name, "rows": len(array), "start": start, "stop": stop,
            "items": row_items, "views": row_views, "errors": errors}  # fmt: skip
    with open(commits_path, "ab") as f:
        f.write((json.dumps(line) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    logger.debug("committed shard %d (%d rows)", shard, len(array))


def backbone_mean(backbone) -> tuple[float, float, float]:
    from ..config import CLIP_MEAN

    return getattr(backbone, "mean", CLIP_MEAN)


def backbone_std(backbone) -> tuple[float, float, float]:
    from ..config import CLIP_STD

    return getattr(backbone, "std", CLIP_STD)


def iter_shards(store: FeatureStore) -> Iterable[tuple[int, np.ndarray]]:
    """(first row, taps [rows, blocks, width]) per committed shard, for streaming readers."""
    for off, arr in zip(store.taps.offsets[:-1], store.taps.shards, strict=True):
        yield int(off), arr
