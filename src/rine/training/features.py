"""Extracting backbone taps into a store (`extract_features`), once per image view.

The backbone is frozen, so its taps of an image view never change: extracting them once
and training the head on the stored taps is the same computation as running the encoder
in every training step. The store's format, resumability and reading are in `store.py`;
its names are re-exported here, where they lived before the split.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.augment import cut_views
from ..data.datasets import Item
from ..data.decoding import ordered_map
from ..data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLoadError
from ..data.parquet import RowError
from ..data.preprocess import normalize
from .store import (  # noqa: F401  (rine.features' names before the split)
    COMMITS_NAME,
    DTYPES,
    FORMAT,
    IDENTITY_KEYS,
    ITEMS_NAME,
    META_NAME,
    FeatureStore,
    MakeViews,
    ShardedArray,
    StoreError,
    _check_identity,
    _fsync_dir,
    _np_dtype,
    _read_commits,
    _read_items,
    _write_atomic,
    items_sha1,
    iter_shards,
)

logger = logging.getLogger(__name__)


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
    sources: Callable[[int, int], Iterator[Any]] | None = None,
) -> FeatureStore:
    """Run `backbone` over `items` x `views` and write (or complete) the store at `out_dir`.

    make_views(image: RGB PIL, item_index, view_index) -> uint8 [S, S, 3]; it must depend
    only on its arguments (and the seed it was built with) for resumes to be exact. If it
    has `all_views(image, item_index) -> uint8 [views, S, S, 3]`, that is called instead,
    once per image (for view slots that share work, like ten-crop).
    transform_id names `make_views` (default: its `.transform_id`); `seed` is recorded and
    checked, the caller builds `make_views` with it.
    Unreadable images are logged, skipped and listed in the store's `errors`.
    `sources(start, stop)`, if given, yields what to decode for items start..stop in order
    (encoded bytes, a path or a Parquet RowError: `ParquetSource.iter_images`) instead of
    each item's path. Returns the store opened for reading.
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
                       workers, device, root, k, commits_path, bar, max_pixels, max_bytes, sources)  # fmt: skip
    if bar is not None:
        bar.close()
    store = FeatureStore.open(root)
    if store.errors:
        logger.warning("%s: %d unreadable inputs skipped (listed in the store's errors)", root, len(store.errors))
    return store


def _load_views(item: Item, index: int, make_views: MakeViews, views: int, max_pixels, max_bytes=None,
                source: Any = None) -> np.ndarray | str:  # fmt: skip
    """uint8 [views, S, S, 3] (`augment.cut_views`), or the one-line reason the image is
    unusable; limits left as None are load_image's defaults."""
    try:
        src = item.path if source is None else source
        if isinstance(src, RowError):
            raise ImageLoadError(src.message, src.kind)
        return cut_views(src, make_views, index, views, DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                         DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)  # fmt: skip
    except (ImageLoadError, ValueError, OSError) as e:
        return str(e) or type(e).__name__


def _extract_shard(backbone, items, start, stop, make_views, views, dtype, batch_size,
                   workers, device, root, shard, commits_path, bar, max_pixels, max_bytes, sources=None) -> None:  # fmt: skip
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
    srcs = sources(start, stop) if sources is not None else (None for _ in range(start, stop))
    jobs = ((i, (items[i], i, make_views, views, max_pixels, max_bytes, src)) for i, src in zip(range(start, stop), srcs, strict=True))
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
