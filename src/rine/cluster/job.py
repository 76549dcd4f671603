"""A `rine batch` job's folder: its settings (`BatchConfig`), identity and manifest, the model
it scores with, and the per-shard commits of its records (Parquet parts, or a tap store).

See `rine.cluster.batch` for the pipeline and the exactly-once protocol.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.decoding import DecodeOptions
from ..data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..errors import OptionError, RineError, literal, message_of
from ..fileio import atomic_write
from ..inference.loading import absolute_path
from .manifest import InputList
from .reconcile import Reconciliation, committed_parts, part_name

if TYPE_CHECKING:
    from ..config import RINEConfig
    from ..provenance.types import TrustConfig

FORMAT = "rine-batch/1"
MANIFEST_NAME = "_manifest.json"
# the model options a job records (its identity: all but the device) and its actors load
MODEL_KEYS = ("model", "backbone", "revision", "head", "crop", "device", "precision")


class BatchError(RineError):
    """A job that cannot start or be resumed; `str()` is a user-facing message (exit 2)."""


class BatchOptionError(BatchError, OptionError):
    """A job whose settings do not fit: the message names `BatchConfig`'s fields as
    `OptionError` does (the CLI renders them as its flags)."""


@dataclass
class BatchConfig:
    """Everything `rine batch` is asked to do; saved in `_manifest.json`."""

    inputs: list[str]
    out: str
    # model (as `rine detect`): a pretrained name or checkpoint folder, or --backbone + --head
    model: str | None = None
    backbone: str | None = None
    revision: str | None = None
    head: str | None = None
    crop: str | None = None
    device: str = "auto"
    precision: str = "auto"
    # --stability: each image also scored under the re-encodings of docs/stability.md
    stability: bool = False
    # provenance (as `rine detect`): each record also carries what the file declares about its
    # origin (docs/provenance.md), verified against these PEM trust anchors (None: $RINE_TRUST_ANCHORS)
    provenance: bool = True
    trust_anchors: str | None = None
    # --taps: `rine extract`'s store instead of scores
    taps: bool = False
    transform: str = "center"
    views: int = 1
    seed: int = 0
    dtype: str = "float16"
    # engine
    address: str = "local"  # local: start a Ray of this machine; auto or host:port: a running cluster (not ray://)
    num_gpus: int | None = None  # GPUs to use (one scoring actor each); default: all the cluster has
    actors: int | None = None  # scoring actors; default: one per GPU, else 1
    actor_cpus: int | None = None  # CPUs (torch threads) per CPU scoring actor; default half the cores
    batch_size: int | None = None  # images per scoring batch; default 16 on CPU, 64 on GPU
    decode_batch: int = 32  # inputs per decoding task
    decode_tasks: int | None = None  # decoding tasks at once; default: a local Ray, the cores the actors leave (>= 2); a cluster, no cap
    buffer_mb: float | None = None  # object store the decoded views may hold; default: see buffer_bytes
    shard_size: int | None = None  # inputs per committed output file; default 4096 (taps: 1024, as rine extract)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_bytes: int | None = DEFAULT_MAX_BYTES
    decode_timeout: float | None = 300.0
    temp_dir: str | None = None  # the local Ray's session folder
    stall_timeout: float = 600.0  # Ray Data fails a job that makes no progress this long
    progress: bool = True
    ray_logs: bool = False  # Ray Data's own INFO/WARNING lines on stderr (rine batch -v)
    # extension points, importable by name on every worker (tests put in decoders that crash)
    # rine detect's own decode (`prepare_views` is this function), from a module without torch:
    # each decoding slot's fork server and worker would otherwise hold a torch import (~100 MB)
    decode_fn: str = "rine.data.jpeg_crop:decode_views"
    scorer: str = "rine.cluster.tasks:Scorer"


@dataclass
class BatchResult:
    out: Path
    reconciliation: Reconciliation
    written: int = 0  # records committed by this run
    seconds: float = 0.0
    error: str | None = None  # why the job could not finish (the rest is committed; rerun)
    skipped_shards: int = 0  # finished by an earlier run

    @property
    def exit_code(self) -> int:
        return 2 if self.error else self.reconciliation.exit_code

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def decode_options(cfg: BatchConfig) -> DecodeOptions:
    """How a decoding task decodes: the job's limits and timeout, in one worker process
    (crash-isolated: a file that kills or hangs it costs its own record only)."""
    return DecodeOptions(max_pixels=cfg.max_pixels, max_bytes=cfg.max_bytes, workers=1, decoder="processes",
                         timeout=cfg.decode_timeout)


def describe_model(cfg: BatchConfig) -> tuple[dict[str, Any], RINEConfig]:
    """(the model options an actor loads from, the RINEConfig) -- read on the driver by the
    library's loader (`loading.model_config`), so that the actors' `load_detector` gives
    the same model (without loading the backbone where the checkpoint says what it needs)."""
    from ..inference.loading import ModelOptions, model_config

    options = ModelOptions(model=cfg.model, backbone=cfg.backbone, revision=cfg.revision, head=cfg.head,
                           crop=cfg.crop, device=cfg.device, precision=cfg.precision, backend="torch").absolute()
    spec = {k: getattr(options, k) for k in MODEL_KEYS}
    try:
        config = model_config(options)
    except OptionError:
        raise  # the front end names the parameters (the CLI: its flags)
    except Exception as e:  # noqa: BLE001 - checkpoint, hub and file errors: one message
        raise BatchError(f"cannot load the model: {message_of(e)}") from None
    return spec, config


def identity(cfg: BatchConfig, inputs: InputList, shard_size: int, model: dict,
             trust: TrustConfig | None = None) -> dict[str, Any]:
    """What must not change between the runs of one job (a rerun with other settings would mix
    records). `trust`: the provenance trust anchors (None: provenance off)."""
    keys = ("taps", "max_pixels", "max_bytes") + (("transform", "views", "seed", "dtype") if cfg.taps else ())
    ident = {"format": FORMAT, "inputs_sha1": inputs.sha1(), "n_inputs": len(inputs), "shard_size": shard_size,
             **{k: getattr(cfg, k) for k in keys}}
    ident["model"] = {k: v for k, v in model.items() if k != "device"}
    if cfg.stability:  # only then: the identity of the jobs started before the option is unchanged
        ident["stability"] = True
    if trust is not None:  # only then, as stability: a job started before provenance resumes with --no-provenance
        pem = (trust.anchors_pem or "").encode()
        ident["provenance"] = {"trust_anchors_sha256": hashlib.sha256(pem).hexdigest() if pem else None}
    return ident


def resolve_trust(cfg: BatchConfig) -> TrustConfig | None:
    """The job's trust anchors (its `trust_anchors`, else $RINE_TRUST_ANCHORS, else none);
    None with provenance off."""
    from ..provenance.types import TrustConfig

    if not cfg.provenance or cfg.taps:
        return None
    try:
        return TrustConfig.resolve(cfg.trust_anchors)
    except ValueError as e:
        raise BatchOptionError(f"{e} ({{trust_anchors}} or $RINE_TRUST_ANCHORS)") from None


def open_job(out: Path, identity: dict) -> dict:
    """The job's manifest (a new one, or the earlier run's if it is the same job)."""
    path = out / MANIFEST_NAME
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise BatchOptionError(f"{literal(path)} is not a rine batch manifest; use another {{out}}") from None
        old = manifest.get("identity", {})
        diffs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
        if diffs:
            what = ", ".join("the input list" if k in ("inputs_sha1", "n_inputs") else k for k in diffs)
            raise BatchOptionError(f"{literal(out)} holds a job with other settings ({what} differ); rerun it with its "
                                   "own command to finish it, or give another {out}")
        return manifest
    if out.is_dir() and any(committed_parts(out)):
        raise BatchOptionError(f"{literal(out)} holds part files but no {MANIFEST_NAME}; give another {{out}}")
    return {"format": FORMAT, "identity": identity, "runs": []}


class ShardBuffer:
    """Records streamed back from Ray, held per shard until the shard is whole, then committed."""

    def __init__(self, shard_size: int, n_items: int, done: set[int], commit):
        self.shard_size, self.n_items, self.done, self._commit = shard_size, n_items, set(done), commit
        self.open: dict[int, dict[int, dict]] = {}
        self.written = self.duplicates = 0

    def expected(self, shard: int) -> int:
        return min(self.n_items, (shard + 1) * self.shard_size) - shard * self.shard_size

    def add(self, rows: list[dict]) -> int:
        new = 0
        for row in rows:
            item = int(row["item"])
            shard = item // self.shard_size
            buf = self.open.setdefault(shard, {}) if shard not in self.done else None
            if buf is None or item in buf:
                self.duplicates += 1  # a retried batch delivered it again
                continue
            buf[item] = row
            new += 1
            if len(buf) == self.expected(shard):
                self._commit(shard, [buf[i] for i in sorted(buf)])
                self.written += len(buf)
                self.done.add(shard)
                del self.open[shard]
        return new


def score_schema(inputs: InputList, stability: bool = False, provenance: bool = False):
    """The columns of a scores job's parts; with `provenance`, `provenance` (the JSON of `rine
    detect`'s record), its flat CSV columns and the combined `decision` / `decision_basis`."""
    import pyarrow as pa

    from ..provenance.types import CSV_FIELDS

    fields = [("path", pa.string()), ("prob_fake", pa.float64()), ("logit", pa.float64()), ("is_fake", pa.bool_()),
              ("error", pa.string()), ("error_kind", pa.string())]
    if stability:
        text, count = ("verdict", "stability_reason"), ("stability_flips",)
        fields += [(c, pa.string() if c in text else pa.int64() if c in count else pa.float64())
                   for c in stability_columns()]
    if provenance:
        fields += [("provenance", pa.string()),
                   *((c, pa.bool_() if c == "provenance_verified" else pa.string()) for c in CSV_FIELDS)]
    if inputs.has_label:
        fields.append(("label", pa.int64()))
    if inputs.has_set:
        fields.append(("set", pa.string()))
    return pa.schema([*fields, ("item", pa.int64())])


def stability_columns() -> tuple[str, ...]:
    """The record columns --stability adds (as `rine detect`'s csv): the cut, the verdict, the
    spread, flips and reason, and each re-encoding's probability (null where it was skipped)."""
    from ..data.reencode import DEFAULT_CONDITIONS

    return ("threshold", "verdict", "stability_spread", "stability_flips", "stability_reason",
            *(f"stability_{c}" for c in DEFAULT_CONDITIONS))


def part_committer(out: Path, schema):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def commit(shard: int, rows: list[dict]) -> None:
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
        final = out / part_name(shard)
        atomic_write(final, lambda f: pq.write_table(table, f))  # the rename is the commit

    return commit


def store_committer(writer, views: int, row_shape: tuple[int, int], dtype: str):
    import numpy as np

    def commit(shard: int, rows: list[dict]) -> None:
        taps, row_items, row_views, errors = [], [], [], []
        for r in rows:
            if r["error"] is not None:
                errors.append([r["item"], r["error"], r.get("error_kind") or "error"])
                continue
            arr = np.frombuffer(r["taps"], dtype=dtype).reshape(r["n_views"], *row_shape)
            taps.append(arr)
            row_items += [r["item"]] * len(arr)
            row_views += list(range(len(arr)))
        array = np.concatenate(taps) if taps else np.empty((0, *row_shape), dtype=dtype)
        writer.commit(shard, array, row_items, row_views, errors)

    return commit


def taps_setup(cfg: BatchConfig, inputs: InputList, shard_size: int):
    """(StoreWriter, decode spec fields, actor kwargs, row shape) for --taps."""
    import torch  # noqa: F401  (load_backbone needs it; imported here for a clear order)

    from ..data.datasets import Item
    from ..data.tap_store import StoreError, StoreWriter
    from ..model.backbones import load_backbone

    if not cfg.backbone:
        raise BatchOptionError("{taps} needs {backbone} (the CLIP encoder whose taps are stored)")
    labels = inputs.table.column("label").to_pylist()
    if not inputs.has_label or any(lab is None for lab in labels):
        raise BatchOptionError("{taps} needs a label for every input: give a manifest (.csv/.jsonl/.parquet) with "
                         "`path` and `label` (0 real, 1 fake) columns")
    if cfg.transform != "train" and cfg.views != 1:
        raise BatchOptionError("{views} > 1 only makes sense with {transform=train} (ten always stores its ten crops)")
    source = absolute_path(cfg.backbone)
    try:
        bb = load_backbone(source, cfg.revision)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise BatchError(f"cannot load backbone {cfg.backbone!r}: {e}") from None
    from ..data.augment import views_for

    make_views, views = views_for(cfg.transform, cfg.seed, bb.image_size, cfg.views)
    transform_id = make_views.transform_id
    sets = inputs.table.column("set").to_pylist()
    items = [Item(p, int(lab), s or "") for p, lab, s in zip(inputs.table.column("path").to_pylist(), labels, sets, strict=True)]
    meta = {"backbone": source, "revision": cfg.revision, "blocks": bb.n_blocks, "width": bb.width,
            "image_size": bb.image_size}
    precision = cfg.precision if cfg.precision in ("fp32", "fp16", "bf16") else "fp32"
    try:
        writer = StoreWriter(cfg.out, meta, items, transform_id, views, cfg.seed, cfg.dtype, shard_size,
                             extra_meta={"layout": "manifest", "inputs": list(cfg.inputs), "precision": precision})
    except StoreError as e:
        raise BatchError(str(e)) from None
    actor_kwargs = {"backbone": source, "revision": cfg.revision, "device": cfg.device, "precision": precision,
                    "dtype": cfg.dtype, "batch_size": cfg.batch_size or 32}
    del bb
    return writer, views, int(meta["image_size"]), actor_kwargs, (int(meta["blocks"]), int(meta["width"]))
