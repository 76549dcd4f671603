"""`rine batch` on Ray Data: score (or extract taps of) millions of images, exactly once.

    result = run_batch(BatchConfig(inputs=["photos/"], out="scores/"))

Pipeline (docs/scale.md):

    input list (driver) -> decode + crop (CPU tasks, crash-isolated per file)
        -> score (actor pool, model loaded once per actor; one GPU each with GPUs)
        -> records streamed back to the driver, committed per shard as Parquet

Exactly once, without Ray's (beta) job checkpointing: the input list is cut into shards of
`shard_size` consecutive inputs; shard k's records are written by the driver to
`part-k.parquet.tmp`, fsynced and renamed to `part-k.parquet` only once every input of the
shard has its record. A file with its final name is a finished shard; anything else is not.
A rerun of the same command (after kill -9, a lost cluster, Ctrl-C) lists the same inputs,
skips the finished shards and redoes the rest; a record that Ray delivers twice (a
retried batch of a restarted actor) is dropped by item. `_manifest.json` records the job's
identity (inputs, model, settings: a rerun with others is refused) and its counts; the
output is reconciled against the input list at the end (`reconcile.py`).

With `taps=True` the same engine writes a feature store (`rine.data.tap_store`), shard
for shard what `rine extract` writes, which `rine train --features` and `rine grid` read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..fileio import fsync_dir as _fsync_dir  # the same durable rename as the tap store's
from . import INSTALL_HINT
from .manifest import InputList, list_inputs
from .reconcile import Reconciliation, committed_parts, part_name, reconcile_parts, reconcile_store
from .tasks import DecodeSpec, resolve

logger = logging.getLogger(__name__)

FORMAT = "rine-batch/1"
MANIFEST_NAME = "_manifest.json"


class BatchError(Exception):
    """A job that cannot start or be resumed; `str()` is a user-facing message (exit 2)."""


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


# --------------------------------------------------------------------------- model


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (workers run elsewhere); names and hub ids as they are."""
    if path and os.path.exists(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    return path


def describe_model(cfg: BatchConfig) -> tuple[dict[str, Any], Any]:
    """(the model options an actor loads from, the RINEConfig) -- read on the driver without
    loading the backbone where the checkpoint says what it needs (folders, named models)."""
    from ..cli.common import error_message
    from ..model.checkpoints import load_head, load_pretrained
    from ..model.pretrained import DEFAULT_MODEL, PRETRAINED, resolve_pretrained

    spec = {"model": _absolute(cfg.model), "backbone": _absolute(cfg.backbone), "revision": cfg.revision,
            "head": _absolute(cfg.head), "crop": cfg.crop, "device": cfg.device, "precision": cfg.precision}  # fmt: skip
    try:
        if cfg.head:
            if cfg.model:
                raise BatchError("give either --model or --backbone/--head, not both")
            if not cfg.backbone:
                raise BatchError("--head needs --backbone (the CLIP encoder the head was trained on)")
            _, config = load_head(spec["head"])
            if config is None:  # an official .pth records no preprocessing: the backbone's size
                from ..config import PreprocessConfig, RINEConfig
                from ..model.backbones import load_backbone

                size = load_backbone(spec["backbone"], cfg.revision).image_size
                config = RINEConfig(backbone=spec["backbone"], preprocess=PreprocessConfig(image_size=size),
                                    name=Path(cfg.head).stem)  # fmt: skip
        else:
            name = spec["model"] or DEFAULT_MODEL
            if Path(name).is_dir():
                folder = Path(name)
            elif name in PRETRAINED:
                folder = resolve_pretrained(name, backbone_given=spec["backbone"])
            else:
                raise BatchError(f"{name!r} is neither a checkpoint folder nor a known model ({', '.join(sorted(PRETRAINED))})")
            _, config = load_pretrained(folder)
    except BatchError:
        raise
    except Exception as e:  # noqa: BLE001 - checkpoint, hub and file errors: one message
        raise BatchError(f"cannot load the model: {error_message(e)}") from None
    crop = cfg.crop or config.preprocess.crop
    return spec, replace(config, preprocess=replace(config.preprocess, crop=crop))


# --------------------------------------------------------------------------- job folder


def _identity(cfg: BatchConfig, inputs: InputList, shard_size: int, model: dict) -> dict[str, Any]:
    """What must not change between the runs of one job (a rerun with other settings would mix records)."""
    keys = ("taps", "max_pixels", "max_bytes") + (("transform", "views", "seed", "dtype") if cfg.taps else ())
    ident = {"format": FORMAT, "inputs_sha1": inputs.sha1(), "n_inputs": len(inputs), "shard_size": shard_size,
             **{k: getattr(cfg, k) for k in keys}}  # fmt: skip
    ident["model"] = {k: v for k, v in model.items() if k != "device"}
    return ident


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_job(out: Path, identity: dict) -> dict:
    """The job's manifest (a new one, or the earlier run's if it is the same job)."""
    path = out / MANIFEST_NAME
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise BatchError(f"{path} is not a rine batch manifest; use another --out") from None
        old = manifest.get("identity", {})
        diffs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
        if diffs:
            what = ", ".join("the input list" if k in ("inputs_sha1", "n_inputs") else k for k in diffs)
            raise BatchError(f"{out} holds a job with other settings ({what} differ); rerun it with its own "
                             "command to finish it, or give another --out")  # fmt: skip
        return manifest
    if out.is_dir() and any(committed_parts(out)):
        raise BatchError(f"{out} holds part files but no {MANIFEST_NAME}; give another --out")
    return {"format": FORMAT, "identity": identity, "runs": []}


# --------------------------------------------------------------------------- writers


class _ShardBuffer:
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


def _score_schema(inputs: InputList):
    import pyarrow as pa

    fields = [("path", pa.string()), ("prob_fake", pa.float64()), ("logit", pa.float64()), ("is_fake", pa.bool_()),
              ("error", pa.string())]  # fmt: skip
    if inputs.has_label:
        fields.append(("label", pa.int64()))
    if inputs.has_set:
        fields.append(("set", pa.string()))
    return pa.schema([*fields, ("item", pa.int64())])


def _part_committer(out: Path, schema):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def commit(shard: int, rows: list[dict]) -> None:
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
        final = out / part_name(shard)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # the rename is the commit
        _fsync_dir(out)

    return commit


def _store_committer(writer, views: int, row_shape: tuple[int, int], dtype: str):
    import numpy as np

    def commit(shard: int, rows: list[dict]) -> None:
        taps, row_items, row_views, errors = [], [], [], []
        for r in rows:
            if r["error"] is not None:
                errors.append([r["item"], r["error"]])
                continue
            arr = np.frombuffer(r["taps"], dtype=dtype).reshape(r["n_views"], *row_shape)
            taps.append(arr)
            row_items += [r["item"]] * len(arr)
            row_views += list(range(len(arr)))
        array = np.concatenate(taps) if taps else np.empty((0, *row_shape), dtype=dtype)
        writer.commit(shard, array, row_items, row_views, errors)

    return commit


# --------------------------------------------------------------------------- Ray


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BatchError(INSTALL_HINT) from None
    return ray


def _connect(cfg: BatchConfig, cpus_wanted: int) -> bool:
    """Connect to (or start) Ray; True if this call started it (and so shuts it down)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    level = logging.INFO if cfg.ray_logs else logging.ERROR  # Ray's start-up lines, shown with -v
    try:
        if cfg.address in (None, "", "local"):
            # Logical CPUs: the scoring actor's threads plus at least two decoding tasks, even on a
            # two-core machine (a pool that holds every CPU starves decoding: the job would hang).
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus_wanted), include_dashboard=False, log_to_driver=False,
                     _temp_dir=os.path.abspath(cfg.temp_dir) if cfg.temp_dir else None, logging_level=level)  # fmt: skip
        else:
            ray.init(address=cfg.address, log_to_driver=False, logging_level=level)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "start a local Ray" if cfg.address in (None, "", "local") else f"connect to the Ray cluster at {cfg.address}"
        raise BatchError(f"cannot {where}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} "
                         "(start one with `ray start --head`, or use --address local)") from None  # fmt: skip
    return True


@dataclass
class _Plan:
    """The resources of the two operators (see `plan_resources`)."""

    use_gpu: bool
    actors: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float
    batch_size: int
    device: str
    threads: int | None = None
    decode_tasks: int | None = None  # a cap on decoding tasks running at once (None: as many as the CPUs allow)
    notes: list[str] = field(default_factory=list)


def plan_resources(cfg: BatchConfig, cluster_gpus: float, cores: int) -> _Plan:
    """How many actors of what size, and what a decoding task asks for.

    With GPUs: one actor per GPU (num_gpus=1, one CPU to feed it); decoding gets every other
    CPU. On CPU: `actor_cpus` threads per actor. The two must ask for different resources,
    else Ray fuses them into one operator (decoding would run inside the actor)."""
    use_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and cluster_gpus >= 1)
    if use_gpu:
        n = cfg.actors or cfg.num_gpus or max(1, int(cluster_gpus))
        actor_cpus = float(cfg.actor_cpus or 1)
        plan = _Plan(True, n, actor_cpus, 1.0, 1.0, cfg.batch_size or 64, "cuda", threads=cfg.actor_cpus)
    else:
        threads = cfg.actor_cpus or max(1, cores // 2)
        n = cfg.actors or 1
        # equal requests would be fused: a one-thread actor leaves decoding half a CPU per task
        decode = 0.5 if threads == 1 else 1.0
        plan = _Plan(False, n, float(threads), 0.0, decode, cfg.batch_size or 16, "cpu", threads=threads)
    return plan


def check_fits(plan: _Plan, cluster_cpus: float, cluster_gpus: float) -> None:
    """BatchError for a plan the cluster cannot run: Ray would wait for the resources forever."""
    if plan.use_gpu and plan.actors * plan.actor_gpus > cluster_gpus:
        raise BatchError(f"{plan.actors} GPU actor(s) need {plan.actors * plan.actor_gpus:g} GPUs, the cluster has "
                         f"{cluster_gpus:g}: lower --num-gpus/--actors, or use --device cpu")  # fmt: skip
    if plan.actors * plan.actor_cpus + plan.decode_cpus > cluster_cpus:
        raise BatchError(f"the scoring actors take {plan.actors * plan.actor_cpus:g} of the cluster's {cluster_cpus:g} "
                         "CPUs and leave none for decoding: lower --actors or --actor-cpus")  # fmt: skip


MIN_BUFFER_BYTES = 128 * 2**20


def buffer_bytes(cfg: BatchConfig, spec: DecodeSpec, plan: _Plan, cluster_cpus: float) -> int:
    """The object store memory this job's blocks may hold at once (Ray Data backpressures
    decoding beyond it).

    Without a bound, decoding (fast) runs ahead of scoring (slow) and the decoded views of the
    whole input list pile up in the object store: peak memory grows with the list (Ray's own
    limit is a fraction of the object store, gigabytes). Enough for every decoding slot to hold
    two finished blocks and every actor four batches queued keeps the actors fed; at least
    MIN_BUFFER_BYTES."""
    if cfg.buffer_mb is not None:
        return int(cfg.buffer_mb * 2**20)
    if spec.mode == "score":
        size = spec.preprocess.image_size
        views = 10 if spec.preprocess.crop == "ten" else 1
    else:
        size, views = spec.size, spec.views
    block = cfg.decode_batch * views * size * size * 3  # uint8 views of one decoding task's inputs
    slots = max(1, int((cluster_cpus - plan.actors * plan.actor_cpus) / plan.decode_cpus))
    if plan.decode_tasks:
        slots = min(slots, plan.decode_tasks)
    per_actor = 4 * math.ceil(plan.batch_size / cfg.decode_batch)
    return max(MIN_BUFFER_BYTES, block * (2 * slots + per_actor * plan.actors))


def build_dataset(todo, spec: DecodeSpec, plan: _Plan, actor_cls, actor_kwargs: dict, decode_batch: int):
    """The Ray Data plan: input blocks -> decode_block (tasks) -> actor pool."""
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from .tasks import decode_block

    blocks = [todo.slice(i, decode_batch) for i in range(0, todo.num_rows, decode_batch)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_block, fn_kwargs={"spec": spec}, batch_size=None, batch_format="pyarrow",
                        num_cpus=plan.decode_cpus, compute=TaskPoolStrategy(size=plan.decode_tasks))  # fmt: skip
    return ds.map_batches(
        actor_cls, fn_constructor_kwargs=actor_kwargs, compute=ActorPoolStrategy(size=plan.actors),
        batch_size=plan.batch_size, batch_format="pyarrow", num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus or None,
    )  # fmt: skip


def optimized_plan(ds) -> str:
    """The physical plan Ray will run, after operator fusion (the last section of `explain`)."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ds.explain()
    return text.getvalue().rsplit("Physical Plan (Optimized) --------", 1)[-1].strip()


# --------------------------------------------------------------------------- the job


def _taps_setup(cfg: BatchConfig, inputs: InputList, shard_size: int):
    """(StoreWriter, decode spec fields, actor kwargs, row shape) for --taps."""
    import torch  # noqa: F401  (load_backbone needs it; imported here for a clear order)

    from ..data.datasets import Item
    from ..data.tap_store import StoreError, StoreWriter
    from ..model.backbones import load_backbone

    if not cfg.backbone:
        raise BatchError("--taps needs --backbone (the CLIP encoder whose taps are stored)")
    labels = inputs.table.column("label").to_pylist()
    if not inputs.has_label or any(lab is None for lab in labels):
        raise BatchError("--taps needs a label for every input: give a manifest (.csv/.jsonl/.parquet) with "
                         "`path` and `label` (0 real, 1 fake) columns")  # fmt: skip
    if cfg.transform != "train" and cfg.views != 1:
        raise BatchError("--views > 1 only makes sense with --transform train (ten always stores its ten crops)")
    source = _absolute(cfg.backbone)
    try:
        bb = load_backbone(source, cfg.revision)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise BatchError(f"cannot load backbone {cfg.backbone!r}: {e}") from None
    from .tasks import make_views_for

    views = 10 if cfg.transform == "ten" else cfg.views
    transform_id = make_views_for(cfg.transform, cfg.seed, bb.image_size).transform_id
    sets = inputs.table.column("set").to_pylist()
    items = [Item(p, int(lab), s or "") for p, lab, s in zip(inputs.table.column("path").to_pylist(), labels, sets, strict=True)]
    meta = {"backbone": source, "revision": cfg.revision, "blocks": bb.n_blocks, "width": bb.width,
            "image_size": bb.image_size}  # fmt: skip
    precision = cfg.precision if cfg.precision in ("fp32", "fp16", "bf16") else "fp32"
    try:
        writer = StoreWriter(cfg.out, meta, items, transform_id, views, cfg.seed, cfg.dtype, shard_size,
                             extra_meta={"layout": "manifest", "inputs": list(cfg.inputs), "precision": precision})  # fmt: skip
    except StoreError as e:
        raise BatchError(str(e)) from None
    actor_kwargs = {"backbone": source, "revision": cfg.revision, "device": cfg.device, "precision": precision,
                    "dtype": cfg.dtype, "batch_size": cfg.batch_size or 32}  # fmt: skip
    del bb
    return writer, views, int(meta["image_size"]), actor_kwargs, (int(meta["blocks"]), int(meta["width"]))


def check_address(address: str | None) -> None:
    """BatchError for an address the pipeline cannot run from. Through Ray Client (`ray://`)
    Ray Data 2.60's streaming executor fails at its first block (`'Worker' object has no
    attribute 'core_worker'`: it needs a driver that is a process of the cluster), measured
    against a `ray start --head` with its client server."""
    if address and address.startswith("ray://"):
        raise BatchError(f"--address {address}: Ray Data does not run through Ray Client (ray://); run rine batch on "
                         "a node of the cluster with --address auto, or submit it as a Ray job: ray job submit "
                         "--address http://HEAD:8265 -- rine batch ... --address auto")  # fmt: skip


def run_batch(cfg: BatchConfig) -> BatchResult:
    """Run (or finish) the job `cfg` describes; see the module docstring."""
    _import_ray()  # before any work: without the extra, say how to install it
    check_address(cfg.address)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    from .manifest import ManifestError

    try:
        inputs = list_inputs(cfg.inputs)
    except ManifestError as e:
        raise BatchError(str(e)) from None
    if not len(inputs):
        raise BatchError("no input images found")
    shard_size = cfg.shard_size or (1024 if cfg.taps else 4096)
    n_shards = math.ceil(len(inputs) / shard_size)

    if cfg.taps:
        writer, views, size, actor_kwargs, row_shape = _taps_setup(cfg, inputs, shard_size)
        model = {k: actor_kwargs[k] for k in ("backbone", "revision", "precision")}
        config_dict = None
        done = set(writer.done)
        commit = _store_committer(writer, views, row_shape, cfg.dtype)
        spec = DecodeSpec("taps", transform=cfg.transform, seed=cfg.seed, size=size, views=views,
                          max_pixels=cfg.max_pixels, max_bytes=cfg.max_bytes, timeout=cfg.decode_timeout,
                          preload=("__main__", "rine.cluster.tasks", "rine.data.augment"))  # fmt: skip
        actor_cls = resolve("rine.cluster.tasks:TapEncoder")
    else:
        model, config = describe_model(cfg)
        config_dict = config.to_dict()
        for stale in out.glob("part-*.parquet.tmp"):
            stale.unlink()
        done = set(committed_parts(out))
        commit = _part_committer(out, _score_schema(inputs))
        spec = DecodeSpec("score", preprocess=config.preprocess, decode_fn=cfg.decode_fn, max_pixels=cfg.max_pixels,
                          max_bytes=cfg.max_bytes, timeout=cfg.decode_timeout)  # fmt: skip
        actor_cls = resolve(cfg.scorer)
        actor_kwargs = {"model": model}
    identity = _identity(cfg, inputs, shard_size, model)
    manifest = _open_job(out, identity)
    manifest.update(config=asdict(cfg), model=model, model_config=config_dict, shard_size=shard_size,
                    n_shards=n_shards, status="running")  # fmt: skip
    _write_json_atomic(out / MANIFEST_NAME, manifest)

    todo_shards = [k for k in range(n_shards) if k not in done]
    result = BatchResult(out, Reconciliation(len(inputs)), skipped_shards=len(done))
    if done:
        logger.info("%s: %d of %d shards finished by an earlier run", out, len(done), n_shards)
    started = time.monotonic()
    if todo_shards:
        result.written, result.error = _execute(cfg, inputs, todo_shards, shard_size, done, commit, spec,
                                                actor_cls, actor_kwargs)  # fmt: skip
    result.seconds = time.monotonic() - started
    result.reconciliation = reconcile_store(out, inputs) if cfg.taps else reconcile_parts(out, inputs)
    run = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "written": result.written,
           "seconds": round(result.seconds, 3), "images_per_s": round(result.images_per_s, 2), "error": result.error}  # fmt: skip
    manifest["runs"].append(run)
    manifest["counts"] = result.reconciliation.to_dict()
    manifest["status"] = "complete" if result.reconciliation.complete else "incomplete"
    _write_json_atomic(out / MANIFEST_NAME, manifest)
    return result


def _execute(cfg, inputs, todo_shards, shard_size, done, commit, spec, actor_cls, actor_kwargs) -> tuple[int, str | None]:
    """Run the Ray Data pipeline over the unfinished shards; (records committed, error or None)."""
    import pyarrow.compute as pc

    ray = _import_ray()
    from ray.data import DataContext

    cores = os.cpu_count() or 1
    probe = plan_resources(cfg, 0, cores)
    started_here = _connect(cfg, int(probe.actors * probe.actor_cpus) + 2)
    buffer = _ShardBuffer(shard_size, len(inputs), done, commit)
    bar = None
    try:
        resources = ray.cluster_resources()
        cluster_cpus, cluster_gpus = float(resources.get("CPU", cores)), float(resources.get("GPU", 0))
        plan = plan_resources(cfg, cluster_gpus, int(cluster_cpus))
        check_fits(plan, cluster_cpus, cluster_gpus)
        plan.decode_tasks = cfg.decode_tasks or (_local_decode_tasks(plan, cores) if started_here else None)
        if cfg.taps:
            actor_kwargs = {**actor_kwargs, "device": plan.device if cfg.device == "auto" else cfg.device,
                            "threads": plan.threads}  # fmt: skip
        else:
            model = {**actor_kwargs["model"], "device": plan.device if cfg.device == "auto" else cfg.device}
            actor_kwargs = {"model": model, "threads": plan.threads}
        # DataContext settings are read when a Dataset is created: set them first.
        ctx = DataContext.get_current()
        ctx.execution_no_progress_timeout_s = cfg.stall_timeout
        ctx.enable_progress_bars = False  # ours counts images; Ray's count blocks per operator
        from ray.data import ExecutionResources

        budget = buffer_bytes(cfg, spec, plan, cluster_cpus)
        ctx.execution_options.resource_limits = ExecutionResources.for_limits(object_store_memory=budget)
        shard_of = pc.divide(inputs.table.column("item"), shard_size)
        todo = inputs.table.filter(pc.is_in(shard_of, _int_array(todo_shards)))
        ds = build_dataset(todo, spec, plan, actor_cls, actor_kwargs, cfg.decode_batch)
        if not cfg.ray_logs:
            # after Ray Data has configured its loggers (it sets their levels when first used):
            # its execution plan and "progress bars disabled" lines say nothing to a user of ours
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        logger.info("plan: %s actor(s) x %g CPU %g GPU, decoding tasks %g CPU (at most %s at once), buffer %d MB; "
                    "%d inputs to do", plan.actors, plan.actor_cpus, plan.actor_gpus, plan.decode_cpus,
                    plan.decode_tasks or "any number", budget // 2**20,
                    todo.num_rows)  # fmt: skip
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(inputs), initial=len(inputs) - todo.num_rows, unit="img", desc="rine batch",
                       dynamic_ncols=True)  # fmt: skip
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            new = buffer.add(batch.to_pylist())
            if bar is not None:
                bar.update(new)
        if buffer.open:
            return buffer.written, f"{sum(map(len, buffer.open.values()))} records of unfinished shards never came back"
        return buffer.written, None
    except (KeyboardInterrupt, BatchError):
        raise
    except Exception as e:  # noqa: BLE001 - a lost cluster, an actor that cannot load: the job stops here
        logger.debug("the Ray job failed", exc_info=True)
        return buffer.written, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        if bar is not None:
            bar.close()
        if started_here:
            ray.shutdown()


def _local_decode_tasks(plan: _Plan, cores: int) -> int:
    """Decoding tasks for a local Ray: the cores the scoring actors leave, and at least two (a
    task's start, its decoding process and its hand-over then overlap another's decoding).
    Ray's logical CPUs are more than the cores (so that decoding is never starved: see
    _connect), and each decoding task holds a worker process, a fork server and a decoder
    (~250 MB): more tasks than that would add memory, not speed."""
    busy = plan.actors * (plan.actor_cpus if not plan.use_gpu else 1)
    return max(2, cores - int(busy))


def _int_array(values: list[int]):
    import pyarrow as pa

    return pa.array(values, pa.int64())
