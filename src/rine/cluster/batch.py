"""`rine batch` on Ray Data: score (or extract taps of) millions of images, exactly once.

    result = run_batch(BatchConfig(inputs=["photos/"], out="scores/"))

Pipeline (docs/scale.md):

    input list (driver) -> decode + crop (CPU tasks, crash-isolated per file)
        -> score (actor pool, model loaded once per actor; one GPU each with GPUs)
        -> records streamed back to the driver, committed per shard as Parquet

Exactly once, without Ray's (beta) job checkpointing: the input list is cut into shards of
`shard_size` consecutive inputs; shard k's records are written by the driver to
a temporary file, fsynced and renamed to `part-k.parquet` (`rine.fileio`) only once every input of the
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

import logging
import math
import os
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from ..fileio import atomic_write_json
from . import INSTALL_HINT
from .job import (
    MANIFEST_NAME,
    BatchConfig,
    BatchError,
    BatchOptionError,
    BatchResult,
    ShardBuffer,
    decode_options,
    describe_model,
    identity,
    open_job,
    part_committer,
    resolve_trust,
    score_schema,
    store_committer,
    taps_setup,
)
from .manifest import list_inputs
from .plan import buffer_bytes, build_dataset, check_fits, local_decode_tasks, plan_resources
from .reconcile import Reconciliation, committed_parts, reconcile_parts, reconcile_store
from .tasks import DecodeSpec, resolve
from .watch import ClusterShrank, ClusterWatch, PlanNeed, watched

logger = logging.getLogger(__name__)

WATCH_EVERY_S = 2.0  # how often the driver checks that the cluster still holds the plan (watch.py)


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
                     _temp_dir=os.path.abspath(cfg.temp_dir) if cfg.temp_dir else None, logging_level=level)
        else:
            ray.init(address=cfg.address, log_to_driver=False, logging_level=level)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "start a local Ray" if cfg.address in (None, "", "local") else f"connect to the Ray cluster at {cfg.address}"
        raise BatchError(f"cannot {where}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} "
                         "(start one with `ray start --head`, or use --address local)") from None
    return True


def check_address(address: str | None) -> None:
    """BatchError for an address the pipeline cannot run from. Through Ray Client (`ray://`)
    Ray Data 2.60's streaming executor fails at its first block (`'Worker' object has no
    attribute 'core_worker'`: it needs a driver that is a process of the cluster), measured
    against a `ray start --head` with its client server."""
    if address and address.startswith("ray://"):
        raise BatchOptionError("{address}: Ray Data does not run through Ray Client (ray://); run rine batch on a node "
                               "of the cluster with {address=auto}, or submit it as a Ray job: ray job submit "
                               "--address http://HEAD:8265 -- rine batch ... --address auto", address=address)


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

    trust = None  # --taps: no records to carry provenance
    if cfg.taps:
        writer, views, size, actor_kwargs, row_shape = taps_setup(cfg, inputs, shard_size)
        model = {k: actor_kwargs[k] for k in ("backbone", "revision", "precision")}
        config_dict = None
        done = set(writer.done)
        commit = store_committer(writer, views, row_shape, cfg.dtype)
        spec = DecodeSpec("taps", transform=cfg.transform, seed=cfg.seed, size=size, views=views,
                          decode=decode_options(cfg), preload=("__main__", "rine.cluster.tasks", "rine.data.augment"))
        actor_cls = resolve("rine.cluster.tasks:TapEncoder")
    else:
        model, config = describe_model(cfg)
        config_dict = config.to_dict()
        for stale in out.glob("part-*.tmp"):  # a temporary of `fileio.atomic_write`
            stale.unlink()
        done = set(committed_parts(out))
        trust = resolve_trust(cfg)
        commit = part_committer(out, score_schema(inputs, cfg.stability, trust is not None))
        spec = DecodeSpec("score", preprocess=config.preprocess, decode_fn=cfg.decode_fn, decode=decode_options(cfg),
                          trust=trust)
        if trust is not None:
            spec.preload = (*spec.preload, "rine.provenance.reader")
        if cfg.stability:  # each image decoded once in full, re-encoded in the decoding task
            from ..data.reencode import DEFAULT_CONDITIONS

            spec.stability, spec.preload = DEFAULT_CONDITIONS, (*spec.preload, "rine.data.reencode")
        actor_cls = resolve(cfg.scorer)
        actor_kwargs = {"model": model}
    ident = identity(cfg, inputs, shard_size, model, trust)
    manifest = open_job(out, ident)
    manifest.update(config=asdict(cfg), model=model, model_config=config_dict, shard_size=shard_size,
                    n_shards=n_shards, status="running")
    atomic_write_json(out / MANIFEST_NAME, manifest)

    todo_shards = [k for k in range(n_shards) if k not in done]
    result = BatchResult(out, Reconciliation(len(inputs)), skipped_shards=len(done))
    if done:
        logger.info("%s: %d of %d shards finished by an earlier run", out, len(done), n_shards)
    started = time.monotonic()
    if todo_shards:
        result.written, result.error = _execute(cfg, inputs, todo_shards, shard_size, done, commit, spec,
                                                actor_cls, actor_kwargs)
    result.seconds = time.monotonic() - started
    result.reconciliation = reconcile_store(out, inputs) if cfg.taps else reconcile_parts(out, inputs)
    run = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "written": result.written,
           "seconds": round(result.seconds, 3), "images_per_s": round(result.images_per_s, 2), "error": result.error}
    manifest["runs"].append(run)
    manifest["counts"] = result.reconciliation.to_dict()
    manifest["status"] = "complete" if result.reconciliation.complete else "incomplete"
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return result


def _execute(cfg, inputs, todo_shards, shard_size, done, commit, spec, actor_cls, actor_kwargs) -> tuple[int, str | None]:
    """Run the Ray Data pipeline over the unfinished shards; (records committed, error or None)."""
    import pyarrow.compute as pc

    ray = _import_ray()
    from ray.data import DataContext

    cores = os.cpu_count() or 1
    probe = plan_resources(cfg, 0, cores)
    started_here = _connect(cfg, int(probe.actors * probe.actor_cpus) + 2)
    buffer = ShardBuffer(shard_size, len(inputs), done, commit)
    bar = None
    try:
        resources = ray.cluster_resources()
        cluster_cpus, cluster_gpus = float(resources.get("CPU", cores)), float(resources.get("GPU", 0))
        plan = plan_resources(cfg, cluster_gpus, int(cluster_cpus))
        check_fits(plan, cluster_cpus, cluster_gpus)
        plan.decode_tasks = cfg.decode_tasks or (local_decode_tasks(plan, cores) if started_here else None)
        if cfg.taps:
            actor_kwargs = {**actor_kwargs, "device": plan.device if cfg.device == "auto" else cfg.device,
                            "threads": plan.threads}
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
                    todo.num_rows)
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(inputs), initial=len(inputs) - todo.num_rows, unit="img", desc="rine batch",
                       dynamic_ncols=True)
        # a lost node that leaves the plan unschedulable stops the job now, not after --stall-timeout
        watch = ClusterWatch(PlanNeed.of(plan))
        for batch in watched(ds.iter_batches(batch_format="pyarrow", batch_size=None), watch.check, WATCH_EVERY_S):
            new = buffer.add(batch.to_pylist())
            if bar is not None:
                bar.update(new)
        if buffer.open:
            return buffer.written, f"{sum(map(len, buffer.open.values()))} records of unfinished shards never came back"
        return buffer.written, None
    except (KeyboardInterrupt, BatchError):
        raise
    except ClusterShrank as e:
        return buffer.written, str(e)
    except Exception as e:  # noqa: BLE001 - a lost cluster, an actor that cannot load: the job stops here
        logger.debug("the Ray job failed", exc_info=True)
        return buffer.written, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        if bar is not None:
            bar.close()
        if started_here:
            ray.shutdown()


def _int_array(values: list[int]):
    import pyarrow as pa

    return pa.array(values, pa.int64())
