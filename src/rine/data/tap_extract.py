"""Filling a tap store in this process: decode each item's views in worker threads, encode
them in batches, commit shard by shard (`StoreWriter`), resumable.

The encoder is a function (uint8 views [n, S, S, 3] -> taps [n, blocks, width]), so this
loop serves every engine that encodes here -- a backbone for `rine extract`
(`rine.training.features.extract_features`), a `Detector` for eval's cached scoring -- and
needs no torch itself. `rine batch --taps` encodes on Ray and commits through the same
`StoreWriter`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from .augment import cut_views
from .datasets import Item
from .decoding import DecodeOptions, error_kind, ordered_map
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageLoadError
from .parquet import RowError
from .tap_store import FeatureStore, StoreWriter

logger = logging.getLogger(__name__)

# make_views(image: RGB PIL, item_index, view_index) -> uint8 [S, S, 3]
MakeViews = Callable[[Any, int, int], np.ndarray]
# uint8 views [n, S, S, 3] -> taps [n, blocks, width] (any float array; stored in the store's dtype)
Encode = Callable[[np.ndarray], Any]


def extract_taps(
    encode: Encode,
    backbone_meta: dict[str, Any],
    items: Sequence[Item],
    out_dir: str | Path,
    make_views: MakeViews,
    transform_id: str | None = None,
    views: int = 1,
    seed: int = 0,
    dtype: str = "float16",
    batch_size: int = 32,
    shard_size: int = 1024,
    decode: DecodeOptions | None = None,
    progress: bool = False,
    extra_meta: dict[str, Any] | None = None,
    sources: Callable[[int, int], Iterator[Any]] | None = None,
) -> FeatureStore:
    """Run `encode` over `items` x `views` and write (or complete) the store at `out_dir`.

    backbone_meta: backbone, revision, blocks, width, image_size of the encoder (meta.json).
    make_views(image: RGB PIL, item_index, view_index) -> uint8 [S, S, 3]; it must depend
    only on its arguments (and the seed it was built with) for resumes to be exact. If it
    has `all_views(image, item_index) -> uint8 [views, S, S, 3]`, that is called instead,
    once per image (for view slots that share work, like ten-crop).
    transform_id names `make_views` (default: its `.transform_id`); `seed` is recorded and
    checked, the caller builds `make_views` with it. `encode` is called with at most
    `batch_size` views at a time.
    `decode` gives the image limits (None: load_image's defaults) and the decoding workers
    (None: one per core, at most 8); images decode in threads whatever its `decoder` says
    (make_views may be a closure), so its per-image timeout does not apply.
    Unreadable images are logged, skipped and listed in the store's `errors`.
    `sources(start, stop)`, if given, yields what to decode for items start..stop in order
    (encoded bytes, a path or a Parquet RowError: `ParquetSource.iter_images`) instead of
    each item's path. Returns the store opened for reading.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    transform_id = transform_id or getattr(make_views, "transform_id", None)
    if not transform_id:
        raise ValueError("give a transform_id naming make_views (stores refuse to mix transforms)")
    writer = StoreWriter(out_dir, backbone_meta, items, transform_id, views, seed, dtype, shard_size, extra_meta)
    todo = writer.todo()
    if writer.done:
        logger.info("%s: %d of %d shards already committed, resuming", writer.root, len(writer.done), writer.n_shards)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        n = len(writer.items)
        bar = tqdm(total=n, initial=min(len(writer.done) * writer.shard_size, n), unit="img", desc="extract")
    decode = decode or DecodeOptions()
    workers = max(1, decode.workers if decode.workers is not None else min(8, os.cpu_count() or 1))
    for k in todo:
        _extract_shard(writer, k, encode, make_views, views, batch_size, workers, bar, decode.max_pixels,
                       decode.max_bytes, sources)
    if bar is not None:
        bar.close()
    store = writer.open()
    if store.errors:
        logger.warning("%s: %d unreadable inputs skipped (listed in the store's errors)", writer.root, len(store.errors))
    return store


def load_views(item: Item, index: int, make_views: MakeViews, views: int, max_pixels: int | None,
               max_bytes: int | None = None, source: Any = None) -> np.ndarray | tuple[str, str]:
    """uint8 [views, S, S, 3] (`augment.cut_views`), or (the one-line reason the image is
    unusable, its `error_kind`); limits left as None are load_image's defaults."""
    try:
        src = item.path if source is None else source
        if isinstance(src, RowError):
            raise ImageLoadError(src.message, src.kind)
        return cut_views(src, make_views, index, views, DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                         DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    except (ImageLoadError, ValueError, OSError) as e:
        return str(e) or type(e).__name__, error_kind(e)


def _extract_shard(writer: StoreWriter, shard: int, encode: Encode, make_views: MakeViews, views: int,
                   batch_size: int, workers: int, bar, max_pixels, max_bytes, sources) -> None:
    items = writer.items
    start, stop = writer.shard_range(shard)
    taps: list[np.ndarray] = []
    row_items: list[int] = []
    row_views: list[int] = []
    errors: list[list] = []
    chunk = max(1, batch_size // views)
    good: list[np.ndarray] = []

    def encode_good() -> None:
        batch = np.concatenate(good)  # [n * views, S, S, 3]
        for b0 in range(0, len(batch), batch_size):
            out = encode(batch[b0 : b0 + batch_size])  # [b, blocks, width]
            taps.append(np.asarray(out, dtype=np.float32).astype(writer.dtype))
        good.clear()

    # Threads (make_views may be a closure): the next images decode while a chunk encodes.
    srcs = sources(start, stop) if sources is not None else (None for _ in range(start, stop))
    jobs = ((i, (items[i], i, make_views, views, max_pixels, max_bytes, src))
            for i, src in zip(range(start, stop), srcs, strict=True))
    decoded = ordered_map(load_views, jobs, kind="threads", workers=workers, max_in_flight=2 * chunk)
    with closing(decoded):
        for i, res, error in decoded:
            if error is not None:
                raise error  # load_views returns the reasons of unusable images; anything else is a bug
            if isinstance(res, tuple):  # (reason, kind)
                logger.warning("skipping %s: %s", items[i].path, res[0])
                errors.append([i, *res])
            else:
                good.append(res)
                row_items += [i] * views
                row_views += list(range(views))
                if len(good) >= chunk:
                    encode_good()
            if bar is not None:
                bar.update(1)
    if good:
        encode_good()
    array = np.concatenate(taps) if taps else np.empty((0, *writer.row_shape), dtype=writer.dtype)
    writer.commit(shard, array, row_items, row_views, errors)
    logger.debug("committed shard %d (%d rows)", shard, len(array))
