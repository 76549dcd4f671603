"""What runs on the cluster for `rine batch`: decoding tasks and the scoring / tap actors.

Decoding (`decode_block`, a Ray Data task on CPUs) runs each file through rine's own
crash-isolated decoder (`rine.data.decoding.ordered_map` with worker processes): a file
that kills or hangs its decoder becomes an error row for that file, the task itself
finishes, so Ray never retries the block (forever, by default) nor drops it (with retries
capped). Its output rows carry the uint8 views [V, S, S, 3] as bytes.

Scoring (`Scorer`) and tap encoding (`TapEncoder`) are Ray Data actors: the model is loaded
once per actor, and records come from `Detector.predict_views` / the backbone forward of
`rine extract`, so they equal `rine detect`'s and `rine extract`'s for the same files.

No ray import here: these functions are plain Python over pyarrow tables.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ..data.decoding import DecodeOptions
from .manifest import is_uri, source_path

logger = logging.getLogger(__name__)

# the columns that travel from the input list to the output records
PASS_THROUGH = ("item", "path", "label", "set")


def resolve(name: str) -> Callable[..., Any]:
    """`module:attribute` -> the object (the decode function and actor classes are named so
    that a test or an extension can put its own in; workers import them by name)."""
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"{name!r}: expected module:attribute")
    return getattr(importlib.import_module(module), attr)


def read_source(source: str | bytes, max_bytes: int | None) -> str | bytes:
    """A local path as it is (load_image reads it: `rine detect`'s checks and errors); the bytes
    of a URI, read here through pyarrow's file systems with the same checks and errors (bytes
    already read, as `with_provenance_of` passes them, as they are)."""
    if isinstance(source, bytes) or not is_uri(source):
        return source
    import pyarrow.fs

    from ..data.images import ImageLoadError

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(source)
        info = fs.get_file_info(inner)
    except (pa.ArrowInvalid, OSError) as e:
        raise ImageLoadError(f"cannot read file: {str(e).splitlines()[0]}", "unreadable") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ImageLoadError("no such file", "missing")
    if info.type != pyarrow.fs.FileType.File:
        raise ImageLoadError("not a regular file", "unreadable")
    if max_bytes is not None and info.size > max_bytes:
        raise ImageLoadError(f"file too large: {info.size} bytes > limit {max_bytes}", "too_large")
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except OSError as e:
        raise ImageLoadError(f"cannot read file: {str(e).splitlines()[0]}", "unreadable") from None


def score_views_of(source: str, decode_fn: str, preprocess, max_pixels: int | None, max_bytes: int | None) -> np.ndarray:
    """In a decoding worker process: one file -> uint8 views [V, S, S, 3] (by default `rine detect`'s
    `prepare_views`: its limits, crops and errors, whatever its decoder does)."""
    return resolve(decode_fn)(read_source(source, max_bytes), preprocess, max_pixels, max_bytes)


def stability_views_of(source: str, preprocess, conditions: tuple[str, ...], max_pixels: int | None,
                       max_bytes: int | None):
    """In a decoding worker process, with --stability: one file -> `data.reencode.StabilityViews`
    (its views and its re-encoded copies', as `rine detect --stability` cuts them)."""
    from ..data.reencode import resolve_conditions, stability_views

    return stability_views(read_source(source, max_bytes), preprocess, resolve_conditions(conditions), max_pixels,
                           max_bytes)


def tap_views_of(source: str, item: int, transform: str, seed: int, size: int, views: int,
                 max_pixels: int | None, max_bytes: int | None) -> np.ndarray | tuple[str, str]:
    """In a decoding worker process: one file -> uint8 views [views, S, S, 3] as `rine extract`
    cuts them (view v of item i depends only on seed, i, v), or (the reason it is unusable, in
    `rine extract`'s words (a store lists its skipped inputs), its `error_kind`)."""
    from ..data.augment import cut_views, views_for
    from ..data.decoding import error_kind
    from ..data.images import ImageLoadError

    try:
        return cut_views(read_source(source, max_bytes), views_for(transform, seed, size)[0], item, views,
                         max_pixels, max_bytes)
    except (ImageLoadError, ValueError, OSError) as e:
        return str(e) or type(e).__name__, error_kind(e)


def provenance_of(source: str, trust, max_bytes: int | None, data: bytes | None = None) -> str | None:
    """What the file declares about its origin (`rine.provenance`), as the JSON of `rine
    detect`'s `provenance` record; None where the file cannot be read or is over `max_bytes`
    (as `provenance.records.read_files`: the decoder's error record says why). `data`: the
    file's bytes where they were read already."""
    from ..data.images import ImageLoadError
    from ..provenance.reader import read_provenance

    try:
        if data is not None:
            pass
        elif is_uri(source):
            data = read_source(source, max_bytes)
        else:
            if max_bytes is not None and os.stat(source).st_size > max_bytes:
                return None
            with open(source, "rb") as f:
                data = f.read()
    except (OSError, ImageLoadError):
        return None
    if not data:
        return None
    return json.dumps(read_provenance(data, filename=source, trust=trust).to_dict())


def with_provenance_of(fn: Callable[..., Any], args: tuple, trust) -> tuple[Any, str | None]:
    """In a decoding worker process, with provenance: (`fn(*args)`, or the exception it raised,
    returned so that the file's provenance stays beside its error record; the provenance JSON).
    A local file is read twice (the page cache holds it); a URI once, its bytes given to both,
    so that object storage is not fetched twice."""
    from ..data.images import ImageLoadError

    source, max_bytes = args[0], args[-1]
    data = None
    if is_uri(source):
        try:
            data = read_source(source, max_bytes)
        except ImageLoadError as e:  # the decoder would have raised the same
            return e, None
        args = (data, *args[1:])
    provenance = provenance_of(source, trust, max_bytes, data)
    try:
        return fn(*args), provenance
    except Exception as e:  # noqa: BLE001 - the decoder's own error, reported as without provenance
        return e, provenance


@dataclass
class DecodeSpec:
    """What a decoding task needs (pickled to every task)."""

    mode: str  # "score" or "taps"
    preprocess: Any = None  # PreprocessConfig (score)
    decode_fn: str = "rine.data.jpeg_crop:decode_views"  # = rine detect's prepare_views, without torch
    transform: str = "center"  # taps
    seed: int = 0
    size: int = 224
    views: int = 1
    # limits and timeout; decoding processes per task (a task asks Ray for this many CPUs)
    decode: DecodeOptions = field(default_factory=lambda: DecodeOptions(workers=1, decoder="processes"))
    stability: tuple[str, ...] = ()  # score: the re-encodings each image is also scored under
    # score: read each file's provenance too, with these anchors (provenance.types.TrustConfig:
    # the PEM text travels, since workers on a cluster cannot read the driver's file); None: off
    trust: Any = None
    # The fork server imports these once, so that each decoding process forked from it starts
    # warm: rine detect's decoder, and "__main__" (in a Ray worker: Ray's worker script, which
    # each process would otherwise re-import, about a second each). None of them imports torch.
    preload: tuple[str, ...] = field(default=("__main__", "rine.cluster.tasks", "rine.data.jpeg_crop"))


def _empty_views() -> bytes:
    return b""


def decode_block(batch: pa.Table, spec: DecodeSpec) -> pa.Table:
    """A Ray Data task: rows of the input list -> the same rows plus `views` (uint8 bytes of
    [n_views, S, S, 3]), `n_views`, `error` (None, or the file's one-line error) and
    `error_kind` (its stable token, `rine.data.decoding.error_kind`)."""
    from ..data.decoding import error_kind, error_text, ordered_map

    rows = batch.to_pydict()
    n = batch.num_rows
    errors: list[str | None] = list(rows["preset_error"])
    # a preset error is a path that could not even be listed
    kinds: list[str | None] = [None if e is None else "unreadable" for e in errors]
    views: list[bytes] = [_empty_views()] * n
    n_views = [0] * n
    applied: list[str | None] = [None] * n  # --stability: the conditions whose views follow the file's
    skipped: list[str | None] = [None] * n
    if spec.mode == "score" and spec.stability:
        fn = stability_views_of
        jobs = ((i, (source_path(rows["source"][i]), spec.preprocess, spec.stability, spec.decode.max_pixels,
                     spec.decode.max_bytes)) for i in range(n) if errors[i] is None)
    elif spec.mode == "score":
        fn: Callable[..., Any] = score_views_of
        jobs = ((i, (source_path(rows["source"][i]), spec.decode_fn, spec.preprocess, spec.decode.max_pixels, spec.decode.max_bytes))
                for i in range(n) if errors[i] is None)
    else:
        fn = tap_views_of
        jobs = ((i, (source_path(rows["source"][i]), rows["item"][i], spec.transform, spec.seed, spec.size, spec.views,
                     spec.decode.max_pixels, spec.decode.max_bytes)) for i in range(n) if errors[i] is None)
    provenance: list[str | None] = [None] * n
    if spec.mode == "score" and spec.trust is not None:
        inner = fn
        fn = with_provenance_of
        jobs = ((i, (inner, args, spec.trust)) for i, args in jobs)
    kind, workers = spec.decode.decoder, spec.decode.workers or 1
    decoded = ordered_map(fn, jobs, kind=kind, workers=workers, max_in_flight=2 * workers, preload=spec.preload,
                          timeout=spec.decode.timeout)
    try:
        for i, result, error in decoded:
            if spec.trust is not None and error is None:
                result, provenance[i] = result
                if isinstance(result, BaseException):
                    result, error = None, result
            if error is not None:
                errors[i] = error_text(error, rows["path"][i])  # a crash or timeout: DecoderCrashed's text
                kinds[i] = error_kind(error)
            elif isinstance(result, tuple):  # taps: the reason an image is unusable, its kind
                errors[i], kinds[i] = result
            elif spec.stability:
                views[i], n_views[i] = np.ascontiguousarray(result.views).tobytes(), len(result.views)
                applied[i], skipped[i] = ",".join(result.applied), json.dumps(result.skipped)
            else:
                arr = np.ascontiguousarray(result, dtype=np.uint8)
                views[i], n_views[i] = arr.tobytes(), len(arr)
    finally:
        decoded.close()
    out = {c: batch.column(c) for c in PASS_THROUGH}
    out["views"] = pa.array(views, pa.large_binary())
    out["n_views"] = pa.array(n_views, pa.int32())
    out["error"] = pa.array(errors, pa.string())
    out["error_kind"] = pa.array(kinds, pa.string())
    if spec.stability:
        out["applied"], out["skipped"] = pa.array(applied, pa.string()), pa.array(skipped, pa.string())
    if spec.trust is not None:
        out["provenance"] = pa.array(provenance, pa.string())
    return pa.table(out)


def _views_of(batch: pa.Table, size: int) -> tuple[list[int], list[np.ndarray]]:
    """Rows without an error and their uint8 views [V, S, S, 3]."""
    errors = batch.column("error").to_pylist()
    data = batch.column("views").to_pylist()
    counts = batch.column("n_views").to_pylist()
    good = [i for i, e in enumerate(errors) if e is None]
    return good, [np.frombuffer(data[i], np.uint8).reshape(counts[i], size, size, 3) for i in good]


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        # Ray gives an actor one torch thread unless told: use the CPUs the actor asked for.
        torch.set_num_threads(int(threads))


class Scorer:
    """A Ray Data actor: the detector is loaded once; each call scores one batch of decoded
    rows -> item, path, label, set, prob_fake, logit, is_fake, error, error_kind."""

    def __init__(self, model: dict[str, Any], threads: int | None = None):
        from ..inference.loading import ModelOptions, load_detector

        _set_threads(threads)
        # the driver's options (job.describe_model): the loader `rine detect` uses, so the same model
        self.detector = load_detector(ModelOptions(**model, backend="torch"), keep_reference=False,  # scoring only: half the memory
                                      progress=False)
        self.size = self.detector.config.preprocess.image_size
        logger.info("scoring actor %d ready on %s (%s)", os.getpid(), self.detector.device, self.detector.precision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        good, arrays = _views_of(batch, self.size)
        paths = batch.column("path").to_pylist()
        stability = "applied" in batch.column_names
        if stability and arrays:
            from ..data.reencode import StabilityViews

            applied, skipped = batch.column("applied").to_pylist(), batch.column("skipped").to_pylist()
            arrays = [StabilityViews(a, tuple(filter(None, applied[i].split(","))), json.loads(skipped[i]))
                      for i, a in zip(good, arrays, strict=True)]
        preds = self.detector.predict_views([paths[i] for i in good], arrays)
        prob: list[float | None] = [None] * n
        logit: list[float | None] = [None] * n
        fake: list[bool | None] = [None] * n
        for i, p in zip(good, preds, strict=True):
            prob[i], logit[i], fake[i] = p.prob_fake, p.logit, p.is_fake
        out = {c: batch.column(c) for c in PASS_THROUGH}
        out.update(prob_fake=pa.array(prob, pa.float64()), logit=pa.array(logit, pa.float64()),
                   is_fake=pa.array(fake, pa.bool_()), error=batch.column("error"),
                   error_kind=batch.column("error_kind"))
        if stability:
            out.update(_stability_columns(n, good, preds))
        if "provenance" in batch.column_names:
            out.update(_provenance_columns(batch.column("provenance").to_pylist(), good, preds))
        return pa.table(out)


def _stability_columns(n: int, good: list[int], preds: list) -> dict[str, pa.Array]:
    """The --stability columns (`job.stability_columns`) of a scored batch; null for errors."""
    from .job import stability_columns

    cols: dict[str, list] = {c: [None] * n for c in stability_columns()}
    for i, p in zip(good, preds, strict=True):
        st = p.stability
        cols["threshold"][i], cols["verdict"][i] = p.threshold, p.verdict
        cols["stability_spread"][i], cols["stability_flips"][i] = st["spread"], st["flips"]
        cols["stability_reason"][i] = st["reason"]
        for c, prob in st["conditions"].items():
            cols[f"stability_{c}"][i] = prob
    return {c: pa.array(v) for c, v in cols.items()}


def _provenance_columns(provenance: list[str | None], good: list[int], preds: list) -> dict[str, pa.Array]:
    """`provenance` (the JSON of rine detect's record), its flat CSV columns and the combined
    decision (`provenance.types.CSV_FIELDS`; null where rine detect's CSV has an empty cell)."""
    from ..provenance.records import flat_columns
    from ..provenance.types import CSV_FIELDS, Provenance

    records: list[dict] = [{"error": "not scored"}] * len(provenance)
    for i, p in zip(good, preds, strict=True):
        records[i] = p.to_dict()
    cols: dict[str, list] = {c: [] for c in CSV_FIELDS}
    for text, record in zip(provenance, records, strict=True):
        flat = flat_columns(record, Provenance.from_dict(json.loads(text)) if text else None)
        for c in CSV_FIELDS:
            cols[c].append(None if flat[c] == "" else flat[c])
    return {"provenance": pa.array(provenance, pa.string()),
            **{c: pa.array(v, pa.bool_() if c == "provenance_verified" else pa.string()) for c, v in cols.items()}}


class TapEncoder:
    """A Ray Data actor: the backbone is loaded once; each call encodes one batch of decoded
    rows -> item, path, label, set, error, error_kind, n_views, taps (bytes of [views, blocks, width] in
    the store's dtype), with `rine extract`'s forward (normalise, backbone, float, cast)."""

    def __init__(self, backbone: str, revision: str | None, device: str, precision: str, dtype: str,
                 batch_size: int, threads: int | None = None):
        import torch

        from ..inference.detector import resolve_device
        from ..model.backbones import load_backbone

        _set_threads(threads)
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.device = resolve_device(device)
        self.backbone = load_backbone(backbone, revision).to(self.device, dtype=torch_dtype)
        self.size, self.dtype, self.batch_size = int(self.backbone.image_size), dtype, int(batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from ..data.preprocess import normalize
        from ..training.features import backbone_mean, backbone_std

        n = batch.num_rows
        good, arrays = _views_of(batch, self.size)
        taps: list[bytes] = [b""] * n
        if arrays:
            views = torch.from_numpy(np.concatenate(arrays))  # [sum V, S, S, 3]
            out = []
            with torch.no_grad():
                for b0 in range(0, len(views), self.batch_size):
                    pixels = normalize(views[b0 : b0 + self.batch_size], backbone_mean(self.backbone),
                                       backbone_std(self.backbone)).to(self.device)
                    out.append(self.backbone(pixels).float().cpu().numpy().astype(self.dtype))  # [b, blocks, width]
            flat = np.concatenate(out)
            start = 0
            for i, arr in zip(good, arrays, strict=True):
                taps[i] = flat[start : start + len(arr)].tobytes()
                start += len(arr)
        out_cols = {c: batch.column(c) for c in PASS_THROUGH}
        out_cols.update(error=batch.column("error"), error_kind=batch.column("error_kind"), n_views=batch.column("n_views"),
                        taps=pa.array(taps, pa.large_binary()))
        return pa.table(out_cols)
