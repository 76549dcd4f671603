"""Scoring one test set: decode each image once, cut its views under every condition, encode, run every head.

Live (`score_set_live`): images are decoded in worker threads or processes
(`rine.data.decoding.ordered_map`), their uint8 views [V, S, S, 3] encoded to taps
[V, blocks, width] by the detector's encoder, and every head scores the taps.
Cached (`score_set_cached`): the taps come from (or are first written to) a tap store
(`rine.data.tap_store`) per set and condition. A head's probability for an image
is sigmoid(mean of its views' logits) (ten-crop, as the reference).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PreprocessConfig
from ..data.decoding import DecodeOptions, decode_batches, error_kind, error_text
from ..data.images import DEFAULT_MAX_BYTES, load_image
from ..data.jpeg_crop import decode_views
from ..data.parquet import RowError
from ..data.perturb import is_perturbed, robustness_image
from ..data.preprocess import crop_views
from ..data.reencode import REENCODINGS, ReencodeError, reencode
from ..data.testsets import TestSet
from ..model.head import RINEHead
from .results import Condition, EvalHead


def image_key(path: str, root: str | Path | None) -> str:
    """The name an image is seeded by: its path relative to the data root when it lies
    under it (so a moved dataset keeps its perturbations), else the path as given."""
    if root is None:
        return path
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # another drive on Windows
        return path
    outside = rel == ".." or rel.startswith(".." + os.sep)  # not a file named "..x" inside
    return path if outside else Path(rel).as_posix()


def make_views(
    image, condition: Condition, key: str, preprocess: PreprocessConfig
) -> tuple[np.ndarray, bool]:
    """RGB PIL image -> (uint8 views [V, S, S, 3], whether it was perturbed).

    A re-encoding the image's format cannot hold (WebP beyond 16383 px a side) leaves the
    image as it is (so it cannot flip)."""
    hit = False
    if condition.reencode is not None:
        try:
            image, hit = reencode(image, REENCODINGS[condition.reencode]), True
        except ReencodeError:
            pass
    elif condition.kind is not None:
        image, hit = robustness_image(
            image, condition.kind, condition.seed, key, condition.quirks, condition.p
        )
    return crop_views(image, preprocess), hit


def prepare_conditions(
    path: str,
    key: str,
    conditions: Sequence[Condition],
    preprocess: PreprocessConfig,
    max_pixels: int | None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> list[tuple[np.ndarray, bool]]:
    """Decode one image once and cut its views under every condition -> [(views [V, S, S, 3]
    uint8, perturbed)] per condition; runs in the decoding workers (threads or processes)."""
    if all(c.is_clean for c in conditions):  # clean views only: crop-aware JPEG decoding
        views = decode_views(path, preprocess, max_pixels=max_pixels, max_bytes=max_bytes)
        return [(views, False) for _ in conditions]
    image = load_image(path, max_pixels=max_pixels, max_bytes=max_bytes)
    return [make_views(image, c, key, preprocess) for c in conditions]


@torch.no_grad()
def encode_views(detector, views: np.ndarray, batch_size: int) -> torch.Tensor:
    """uint8 views [N, S, S, 3] -> taps [N, blocks, width] (float32, CPU), through the
    detector's encoder (its precision and fast path)."""
    return torch.as_tensor(detector.encode_views(views, batch_size=batch_size)).float().cpu()


@torch.no_grad()
def head_logits(
    head: RINEHead, taps: torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """taps [N, blocks, width] -> logits [N] (float32, CPU)."""
    return head.eval()(taps.to(device)).logits.float().cpu()


def _image_records(
    heads: Sequence[EvalHead], taps: torch.Tensor, counts: list[int], device
) -> list[list[tuple[float, float]]]:
    """Per head, per image: (logit, prob) with logit = mean over the image's views."""
    out = []
    for h in heads:
        logits = head_logits(h.head, taps, device)  # [sum(counts)]
        per, start = [], 0
        for n in counts:
            logit = logits[start : start + n].mean()  # ten-crop: mean of logits, then sigmoid
            per.append((float(logit), float(torch.sigmoid(logit))))
            start += n
        out.append(per)
    return out


def _record(path: str, set_name: str, label: int, key: str, ts: TestSet | None = None, idx: int = 0) -> dict[str, Any]:
    rec = {
        "path": path,
        "set": set_name,
        "label": label,
        "prob_fake": None,
        "logit": None,
        "error": None,
        "error_kind": None,
        "key": key,
    }
    if ts is not None and ts.source is not None:
        rec.update(ts.source.extra(idx))  # e.g. the dataset's own key column (row_key)
    return rec


def set_keys(ts: TestSet, root: str | Path | None) -> list[str]:
    """The seed key of each item: root-relative paths, or a Parquet row's `<split>/<file>#<row>`."""
    if ts.source is not None:
        return list(ts.source.seed_keys)
    return [image_key(p, root) for p, _ in ts.items]


def prepare_item(
    source: str | bytes | RowError,
    key: str,
    conditions: Sequence[Condition],
    preprocess: PreprocessConfig,
    max_pixels: int | None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> list[tuple[np.ndarray, bool]]:
    """`prepare_conditions` for an item source: a file path, the encoded bytes of a Parquet
    row, or a Parquet `RowError`, raised as that row's ImageLoadError (in the worker, so
    that it comes back in order like any unreadable image)."""
    if isinstance(source, RowError):
        from ..data.parquet import open_source

        open_source(source)  # raises
    return prepare_conditions(source, key, conditions, preprocess, max_pixels, max_bytes)


def item_sources(ts: TestSet):
    """What the decoding workers open for each item, in order: its path, or the bytes of a
    Parquet row streamed from its file (`ParquetSource.iter_images`)."""
    if ts.source is not None:
        return ts.source.iter_images()
    return (p for p, _ in ts.items)


def score_set_live(
    detector, heads, conditions, ts: TestSet, root, batch_size: int, decode: DecodeOptions, progress: bool
) -> list[list[list[dict]]]:
    """-> records[condition][head][image] for one set, computing taps on the fly (images
    decoded by `decode_batches`, as `Detector.predict_iter` decodes them)."""
    from tqdm.auto import tqdm

    pre = detector.config.preprocess
    n_c, n_h = len(conditions), len(heads)
    records = [[[] for _ in heads] for _ in conditions]
    results: dict[tuple[int, int, int], Any] = {}

    def score(batch: list[tuple[int, list]]) -> None:  # (item index, [(views, hit)] per condition)
        counts = [len(v[0][0]) for _, v in batch]
        for ci in range(n_c):
            views = np.concatenate([v[ci][0] for _, v in batch])
            taps = encode_views(detector, views, batch_size * max(1, max(counts)))
            scored = _image_records(heads, taps, counts, detector.device)
            for hi in range(n_h):
                for (idx, v), (logit, prob) in zip(batch, scored[hi], strict=True):
                    results[(ci, hi, idx)] = (logit, prob, v[ci][1])

    errors: dict[int, tuple[str, str]] = {}  # idx -> (text, kind)
    bar = tqdm(total=len(ts.items), desc=ts.name, unit="img", disable=not progress, dynamic_ncols=True)
    keys = set_keys(ts, root)
    jobs = ((idx, (src, keys[idx], conditions, pre, decode.max_pixels, decode.max_bytes))
            for idx, src in enumerate(item_sources(ts)))
    batches = decode_batches(prepare_item, jobs, decode, batch_size=batch_size, device=detector.device,
                             preload=("rine.evaluation.scoring",))
    try:
        for batch in batches:
            for idx, _, error in batch:
                if error is not None:  # one bad file must not stop a benchmark
                    errors[idx] = error_text(error, ts.items[idx][0]), error_kind(error)
            ok = [(idx, views) for idx, views, error in batch if error is None]
            if ok:
                score(ok)
            bar.update(len(batch))
    finally:
        batches.close()
        bar.close()

    for idx, (path, label) in enumerate(ts.items):
        for ci in range(n_c):
            for hi in range(n_h):
                rec = _record(path, ts.name, label, keys[idx], ts, idx)
                if idx in errors:
                    rec["error"], rec["error_kind"] = errors[idx]
                else:
                    logit, prob, hit = results[(ci, hi, idx)]
                    rec.update(prob_fake=prob, logit=logit)
                    if conditions[ci].kind is not None:
                        rec["perturbed"] = hit
                records[ci][hi].append(rec)
    return records


class _ConditionViews:
    """`make_views` for a feature store: view slot v of an item under one condition.

    Each slot re-derives the same views (perturbations are seeded by the image's key), so
    slots are independent; `all_views` gives the store every slot from one derivation."""

    def __init__(self, condition: Condition, keys: list[str], preprocess: PreprocessConfig):
        self.condition, self.keys, self.preprocess = condition, keys, preprocess

    def all_views(self, image, item_index: int) -> np.ndarray:
        """-> uint8 [V, S, S, 3]"""
        return make_views(image, self.condition, self.keys[item_index], self.preprocess)[0]

    def __call__(self, image, item_index: int, view_index: int) -> np.ndarray:
        return self.all_views(image, item_index)[view_index]


def _store_dir(
    cache_dir: Path, detector, ts: TestSet, condition: Condition, items_sha: str
) -> Path:
    bb = detector.model.backbone
    pre = detector.config.preprocess
    ident = json.dumps([str(bb.source), bb.revision, pre.crop, pre.image_size, list(pre.mean), list(pre.std),
                        detector.precision, condition.id, items_sha])
    digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", ts.name).strip("_") or "set"
    return cache_dir / f"{safe}-{condition.id}-{digest}"


def score_set_cached(
    detector,
    heads,
    conditions,
    ts: TestSet,
    root,
    batch_size,
    decode: DecodeOptions,
    progress,
    cache_dir: Path,
    cache_dtype: str,
) -> list[list[list[dict]]]:
    """Like `score_set_live`, with taps read from (or first written to) tap stores."""
    from ..data.datasets import Item
    from ..data.tap_extract import extract_taps
    from ..data.tap_store import items_sha1, iter_shards

    pre = detector.config.preprocess
    bb = detector.model.backbone
    backbone_meta = {"backbone": str(bb.source), "revision": bb.revision, "blocks": int(bb.n_blocks),
                     "width": int(bb.width), "image_size": int(bb.image_size)}

    def encode(views: np.ndarray) -> np.ndarray:  # uint8 [n, S, S, 3] -> [n, blocks, width]
        return encode_views(detector, views, batch_size).numpy()

    items = [Item(p, y, ts.name) for p, y in ts.items]
    sha = items_sha1(items)
    keys = set_keys(ts, root)
    n_views = pre.n_views
    records = []
    for cond in conditions:
        views_of = _ConditionViews(cond, keys, pre)

        store = extract_taps(
            encode, backbone_meta, items, _store_dir(cache_dir, detector, ts, cond, sha), views_of,
            transform_id=f"eval:{pre.crop}:{pre.image_size}:{cond.id}", views=n_views, seed=cond.seed,
            dtype=cache_dtype, batch_size=batch_size, decode=decode, progress=progress,
            extra_meta={"precision": str(getattr(detector, "precision", "fp32"))},
            sources=None if ts.source is None else ts.source.iter_images,
        )
        errors = dict(store.errors)
        sums = np.zeros((len(heads), len(items)))
        cnt = np.bincount(store.items, minlength=len(items))
        chunk = 4096  # rows per head call: bounded memory however large the set
        for off, arr in iter_shards(store):
            rows = store.items[off : off + len(arr)]
            for c0 in range(0, len(arr), chunk):
                taps = torch.from_numpy(
                    np.array(arr[c0 : c0 + chunk], dtype=np.float32)
                )  # a copy: the map is read-only
                for hi, h in enumerate(heads):
                    logits = head_logits(h.head, taps, detector.device).numpy()  # [rows]
                    np.add.at(sums[hi], rows[c0 : c0 + chunk], logits)
        per_head = []
        for hi in range(len(heads)):
            recs = []
            for idx, (path, label) in enumerate(ts.items):
                rec = _record(path, ts.name, label, keys[idx], ts, idx)
                if cnt[idx] == 0:
                    rec["error"] = errors.get(path, "not in the feature store")
                    # a store written before kinds were kept: "error", the kind of the unknown
                    rec["error_kind"] = store.error_kinds.get(path, "error")
                else:
                    # float32, as the live path and the reference: probabilities round to 1.0
                    # above a logit of ~16.6, and AP counts those ties.
                    logit = torch.tensor(sums[hi, idx] / cnt[idx], dtype=torch.float32)
                    rec.update(logit=float(logit), prob_fake=float(torch.sigmoid(logit)))
                    if cond.kind is not None:
                        rec["perturbed"] = is_perturbed(cond.seed, keys[idx], cond.p)
                recs.append(rec)
            per_head.append(recs)
        records.append(per_head)
    return records
