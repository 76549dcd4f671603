"""Running detectors over test sets: one backbone pass per (image, transform), any number of heads.

    det = Detector.from_pretrained("rine-vitl14-4class")
    sets = read_layout("ufd20", "data/test").sets
    result = evaluate(det, sets, conditions=[Condition(), Condition("jpeg", seed=0)])
    write_outputs(result, "runs/ufd20")

Each image is decoded once; every transform (clean, or a robustness perturbation) turns it
into uint8 views [V, S, S, 3]; the frozen backbone turns the views into taps
[V, blocks, width] once; every head scores those taps. A head's probability for an image
is sigmoid(mean of its views' logits) (ten-crop, as the reference). Unreadable images
get an `error` record and are left out of the metrics (counted as `n_errors`).

With `cache_dir`, taps are kept across runs in `rine.features` stores (one per test set
and transform), so a second evaluation of other heads on the same data skips the backbone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import PreprocessConfig, RINEConfig
from ..data.decoding import (
    DECODERS,
    DEFAULT_DECODE_TIMEOUT,
    default_decoder,
    error_text,
    ordered_map,
)
from ..data.images import DEFAULT_MAX_BYTES, load_image
from ..data.jpeg_crop import decode_views
from ..data.layouts import TestSet
from ..data.perturb import QUIRKS, is_perturbed, robustness_image, transform_id
from ..data.preprocess import crop_views
from ..inference.detector import default_batch_size, default_workers
from ..model.head import RINEHead
from .metrics import compute_metrics, mean_metrics

logger = logging.getLogger(__name__)


@dataclass
class EvalHead:
    """A named head to score with; `config` is its RINEConfig when known."""

    name: str
    head: RINEHead
    config: RINEConfig | None = None


@dataclass(frozen=True)
class Condition:
    """An evaluation transform: clean (`kind=None`) or a seeded robustness perturbation."""

    kind: str | None = None
    seed: int = 0
    quirks: str = "none"
    p: float = 0.5

    def __post_init__(self) -> None:
        if self.quirks not in QUIRKS:
            raise ValueError(f"quirks must be one of {QUIRKS}")

    @property
    def id(self) -> str:
        return transform_id(self.kind, self.seed, self.quirks, self.p)


@dataclass
class RunResult:
    """One (head, condition): prediction records per set, then `metrics` {"sets", "mean"}."""

    head: str
    condition: Condition
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    block_importance: list[float] | None = None

    @property
    def name(self) -> str:
        return self.head if self.condition.kind is None else f"{self.head}/{self.condition.id}"


@dataclass
class EvalResult:
    runs: list[RunResult]
    sets: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- scoring
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
    """RGB PIL image -> (uint8 views [V, S, S, 3], whether it was perturbed)."""
    hit = False
    if condition.kind is not None:
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
    if all(c.kind is None for c in conditions):  # clean views only: crop-aware JPEG decoding
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


def _record(path: str, set_name: str, label: int, key: str) -> dict[str, Any]:
    return {
        "path": path,
        "set": set_name,
        "label": label,
        "prob_fake": None,
        "logit": None,
        "error": None,
        "key": key,
    }


def _score_set_live(
    detector, heads, conditions, ts: TestSet, root, batch_size, num_workers, progress, decoder="auto",
    decode_timeout=DEFAULT_DECODE_TIMEOUT,
) -> list[list[list[dict]]]:
    """-> records[condition][head][image] for one set, computing taps on the fly."""
    from tqdm.auto import tqdm

    pre = detector.config.preprocess
    max_pixels = getattr(detector, "max_pixels", None)
    max_bytes = getattr(detector, "max_bytes", DEFAULT_MAX_BYTES)
    n_c, n_h = len(conditions), len(heads)
    records = [[[] for _ in heads] for _ in conditions]
    batch: list[tuple[int, list]] = []  # (item index, [(views, hit)] per condition)
    results: dict[tuple[int, int, int], Any] = {}

    def flush() -> None:
        if not batch:
            return
        counts = [len(v[0][0]) for _, v in batch]
        for ci in range(n_c):
            views = np.concatenate([v[ci][0] for _, v in batch])
            taps = encode_views(detector, views, batch_size * max(1, max(counts)))
            scored = _image_records(heads, taps, counts, detector.device)
            for hi in range(n_h):
                for (idx, v), (logit, prob) in zip(batch, scored[hi], strict=True):
                    results[(ci, hi, idx)] = (logit, prob, v[ci][1])
        batch.clear()

    workers = num_workers or default_workers(detector.device)
    decoder = default_decoder(detector.device) if decoder == "auto" else decoder
    errors: dict[int, str] = {}
    bar = tqdm(
        total=len(ts.items), desc=ts.name, unit="img", disable=not progress, dynamic_ncols=True
    )
    keys = [image_key(p, root) for p, _ in ts.items]
    jobs = ((idx, (path, keys[idx], conditions, pre, max_pixels, max_bytes)) for idx, (path, _) in enumerate(ts.items))
    decoded = ordered_map(
        prepare_conditions, jobs, kind=decoder, workers=workers,
        max_in_flight=max(2 * batch_size, 2 * workers), preload=("rine.evaluation.engine",), timeout=decode_timeout,
    )  # fmt: skip
    try:
        for idx, views, error in decoded:
            if error is None:
                batch.append((idx, views))
            else:  # one bad file must not stop a benchmark
                errors[idx] = error_text(error, ts.items[idx][0])
            bar.update(1)
            if len(batch) >= batch_size:
                flush()
        flush()
    finally:
        decoded.close()
        bar.close()

    for idx, (path, label) in enumerate(ts.items):
        for ci in range(n_c):
            for hi in range(n_h):
                rec = _record(path, ts.name, label, keys[idx])
                if idx in errors:
                    rec["error"] = errors[idx]
                else:
                    logit, prob, hit = results[(ci, hi, idx)]
                    rec.update(prob_fake=prob, logit=logit)
                    if conditions[ci].kind is not None:
                        rec["perturbed"] = hit
                records[ci][hi].append(rec)
    return records


class _StoreEncoder(torch.nn.Module):
    """The detector's encoder (its fast path and precision) with the attributes that
    `rine.features` records: normalised pixels [B, 3, S, S] -> taps [B, blocks, width]."""

    def __init__(self, detector):
        super().__init__()
        bb = detector.model.backbone
        self.encoder = detector.encoder
        self.backbone = bb  # registered so that parameters() finds the device
        self.source, self.revision = bb.source, bb.revision
        self.n_blocks, self.width, self.image_size = bb.n_blocks, bb.width, bb.image_size
        self.mean, self.std = detector.config.preprocess.mean, detector.config.preprocess.std

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values)


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
                        detector.precision, condition.id, items_sha])  # fmt: skip
    digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", ts.name).strip("_") or "set"
    return cache_dir / f"{safe}-{condition.id}-{digest}"


def _score_set_cached(
    detector,
    heads,
    conditions,
    ts: TestSet,
    root,
    batch_size,
    num_workers,
    progress,
    cache_dir: Path,
    cache_dtype: str,
) -> list[list[list[dict]]]:
    """Like `_score_set_live`, with taps read from (or first written to) `rine.features` stores."""
    from ..training.features import Item, extract_features, items_sha1, iter_shards

    pre = detector.config.preprocess
    items = [Item(p, y, ts.name) for p, y in ts.items]
    sha = items_sha1(items)
    keys = [image_key(p, root) for p, _ in ts.items]
    n_views = 10 if pre.crop == "ten" else 1
    records = []
    for cond in conditions:
        views_of = _ConditionViews(cond, keys, pre)

        store = extract_features(
            _StoreEncoder(detector), items, _store_dir(cache_dir, detector, ts, cond, sha), views_of,
            transform_id=f"eval:{pre.crop}:{pre.image_size}:{cond.id}", views=n_views, seed=cond.seed,
            dtype=cache_dtype, batch_size=batch_size, num_workers=num_workers, progress=progress,
            max_pixels=getattr(detector, "max_pixels", None), max_bytes=getattr(detector, "max_bytes", None),
            extra_meta={"precision": str(getattr(detector, "precision", "fp32"))},
        )  # fmt: skip
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
                rec = _record(path, ts.name, label, keys[idx])
                if cnt[idx] == 0:
                    rec["error"] = errors.get(path, "not in the feature store")
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


def evaluate(
    detector,
    sets: Sequence[TestSet],
    *,
    heads: Sequence[EvalHead] | None = None,
    conditions: Sequence[Condition] | None = None,
    root: str | Path | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    threshold: float = 0.5,
    cache_dir: str | Path | None = None,
    cache_dtype: str = "float32",
    decoder: str = "auto",
    decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT,
) -> EvalResult:
    """Score every set under every condition with every head (default: the detector's own).

    The backbone runs once per (image, condition); `root` is the data root images are
    seeded by (see `image_key`). Metrics use `score > threshold` (0.5: the paper's ACC).
    `decoder` ("threads", "processes" or "auto": processes with a GPU) decodes the live path;
    with processes, an image still decoding after `decode_timeout` s is skipped.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    heads = (
        list(heads)
        if heads
        else [EvalHead(detector.config.name or "model", detector.model.head, detector.config)]
    )
    conditions = list(conditions) if conditions else [Condition()]
    batch_size = batch_size or default_batch_size(detector.device)
    backbone = detector.model.backbone
    for h in heads:
        cfg = h.head.config
        if cfg.in_dim != backbone.width or (
            cfg.blocks == "all" and cfg.n_blocks != backbone.n_blocks
        ):
            raise ValueError(
                f"head {h.name!r} expects {cfg.n_blocks} blocks of width {cfg.in_dim}; the backbone "
                f"has {backbone.n_blocks} of width {backbone.width}"
            )
        h.head.to(detector.device).eval()
    runs = [RunResult(h.name, c) for c in conditions for h in heads]
    for ts in sets:
        if cache_dir is not None:
            recs = _score_set_cached(detector, heads, conditions, ts, root, batch_size, num_workers, progress,
                                     Path(cache_dir).expanduser(), cache_dtype)  # fmt: skip
        else:
            recs = _score_set_live(
                detector, heads, conditions, ts, root, batch_size, num_workers, progress, decoder, decode_timeout
            )
        for ci in range(len(conditions)):
            for hi in range(len(heads)):
                runs[ci * len(heads) + hi].records[ts.name] = recs[ci][hi]
    for i, run in enumerate(runs):
        hi = i % len(heads)
        run.metrics = metrics_of(run.records, threshold)
        with torch.no_grad():
            run.block_importance = heads[hi].head.block_importance().float().cpu().tolist()
    return EvalResult(runs, [ts.name for ts in sets])


def metrics_of(records: dict[str, list[dict[str, Any]]], threshold: float = 0.5) -> dict[str, Any]:
    """{"sets": {name: metrics}, "mean": {...}} from prediction records (errors excluded)."""
    per_set = {}
    for name, recs in records.items():
        ok = [r for r in recs if r["error"] is None]
        m = compute_metrics([r["label"] for r in ok], [r["prob_fake"] for r in ok], threshold)
        m["n_errors"] = len(recs) - len(ok)
        # counts on disk, readable or not: what the layout found
        m["n_real_listed"] = sum(1 for r in recs if r["label"] == 0)
        m["n_fake_listed"] = sum(1 for r in recs if r["label"] == 1)
        per_set[name] = m
    return {"sets": per_set, "mean": mean_metrics(per_set), "threshold": threshold}


# ---------------------------------------------------------------------------- outputs
TABLE_METRICS = ("acc", "ap", "auc", "acc_real", "acc_fake", "f1", "ece", "acc_best")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def paper_table_markdown(runs: Sequence[RunResult], sets: Sequence[str]) -> str:
    """The paper's layout: one row per model, one column per test set, cells "ACC / AP" in %."""
    head = ["model", *sets, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        cells = [run.name]
        for s in [*sets, None]:
            m = run.metrics["mean"] if s is None else run.metrics["sets"].get(s, {})
            cells.append(f"{_pct(m.get('acc'))} / {_pct(m.get('ap'))}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nCells: ACC / AP in % (accuracy at 0.5, average precision).\n"


def detail_table_markdown(run: RunResult) -> str:
    """One row per set (and the mean): counts and every metric in %."""
    cols = ["set", "n_real", "n_fake", "n_errors", *TABLE_METRICS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = [*run.metrics["sets"].items(), ("mean", run.metrics["mean"])]
    for name, m in rows:
        vals = [
            name,
            str(m.get("n_real", "")),
            str(m.get("n_fake", "")),
            str(m.get("n_errors", "")),
        ]
        vals += [_pct(m.get(k)) for k in TABLE_METRICS]
        lines.append("| " + " | ".join(vals) + " |")
    notes = [
        f"- {name}: {'; '.join(m['notes'])}"
        for name, m in run.metrics["sets"].items()
        if m.get("notes")
    ]
    return "\n".join(lines) + "\n" + ("\nNotes:\n" + "\n".join(notes) + "\n" if notes else "")


def write_paper_csv(path: Path, runs: Sequence[RunResult], sets: Sequence[str]) -> None:
    """CSV of the paper's layout: model, then `<set> ACC`, `<set> AP` per set and the mean (in %)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", *[f"{s} {k}" for s in [*sets, "mean"] for k in ("ACC", "AP")]])
        for run in runs:
            row = [run.name]
            for s in [*sets, None]:
                m = run.metrics["mean"] if s is None else run.metrics["sets"].get(s, {})
                row += [_round(m.get("acc")), _round(m.get("ap"))]
            w.writerow(row)


def _round(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def write_run(run: RunResult, folder: Path, meta: dict[str, Any], plots: bool = True) -> list[Path]:
    """metrics.json, predictions.jsonl, table.md/csv, metrics.csv and plots of one run."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    metrics = {**run.metrics, "model": run.head, "condition": run.condition.id, "meta": meta}
    (folder / "metrics.json").write_text(
        json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    with open(folder / "predictions.jsonl", "w", encoding="utf-8") as f:
        for recs in run.records.values():
            for r in recs:
                f.write(
                    json.dumps({k: v for k, v in r.items() if k != "key"}, ensure_ascii=False)
                    + "\n"
                )
    sets = list(run.records)
    (folder / "table.md").write_text(
        paper_table_markdown([run], sets) + "\n" + detail_table_markdown(run), encoding="utf-8"
    )
    write_paper_csv(folder / "table.csv", [run], sets)
    with open(folder / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        cols = ["set", "n_real", "n_fake", "n_errors", *TABLE_METRICS]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for name, m in [*run.metrics["sets"].items(), ("mean", run.metrics["mean"])]:
            w.writerow(
                {"set": name, **{k: ("" if m.get(k) is None else m.get(k)) for k in cols[1:]}}
            )
    written += [
        folder / n
        for n in ("metrics.json", "predictions.jsonl", "table.md", "table.csv", "metrics.csv")
    ]
    if plots:
        from .plots import plot_run

        written += plot_run(run, folder)
    return written


def write_outputs(result: EvalResult, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """One run: its files directly in `out_dir`. Several runs (heads x conditions): one
    folder per run (`<head>/<condition>`) plus `summary.md`/`summary.csv`/`summary.json`."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_config.json").write_text(
        json.dumps(result.meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if len(result.runs) == 1:
        return write_run(result.runs[0], out, result.meta, plots)
    written = []
    for run in result.runs:
        written += write_run(run, out / _safe(run.head) / run.condition.id, result.meta, plots)
    (out / "summary.md").write_text(
        paper_table_markdown(result.runs, result.sets), encoding="utf-8"
    )
    write_paper_csv(out / "summary.csv", result.runs, result.sets)
    summary = {
        run.name: {"mean": run.metrics["mean"], "sets": run.metrics["sets"]} for run in result.runs
    }
    (out / "summary.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if plots:
        from .plots import plot_summary

        written += plot_summary(result, out)
    return written + [out / "summary.md", out / "summary.csv", out / "summary.json"]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "model"
