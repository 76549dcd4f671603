"""`rine batch`'s plan: what the scoring actors and the decoding tasks ask Ray for, how much
decoded data the object store may hold, and the Ray Data dataset of the two operators."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .job import BatchConfig, BatchOptionError
from .tasks import DecodeSpec


@dataclass
class ResourcePlan:
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


def plan_resources(cfg: BatchConfig, cluster_gpus: float, cores: int) -> ResourcePlan:
    """How many actors of what size, and what a decoding task asks for.

    With GPUs: one actor per GPU (num_gpus=1, one CPU to feed it); decoding gets every other
    CPU. On CPU: `actor_cpus` threads per actor. The two must ask for different resources,
    else Ray fuses them into one operator (decoding would run inside the actor)."""
    use_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and cluster_gpus >= 1)
    if use_gpu:
        n = cfg.actors or cfg.num_gpus or max(1, int(cluster_gpus))
        actor_cpus = float(cfg.actor_cpus or 1)
        plan = ResourcePlan(True, n, actor_cpus, 1.0, 1.0, cfg.batch_size or 64, "cuda", threads=cfg.actor_cpus)
    else:
        threads = cfg.actor_cpus or max(1, cores // 2)
        n = cfg.actors or 1
        # equal requests would be fused: a one-thread actor leaves decoding half a CPU per task
        decode = 0.5 if threads == 1 else 1.0
        plan = ResourcePlan(False, n, float(threads), 0.0, decode, cfg.batch_size or 16, "cpu", threads=threads)
    return plan


def check_fits(plan: ResourcePlan, cluster_cpus: float, cluster_gpus: float) -> None:
    """BatchError for a plan the cluster cannot run: Ray would wait for the resources forever."""
    if plan.use_gpu and plan.actors * plan.actor_gpus > cluster_gpus:
        raise BatchOptionError(f"{plan.actors} GPU actor(s) need {plan.actors * plan.actor_gpus:g} GPUs, the cluster "
                               f"has {cluster_gpus:g}: lower {{num_gpus}}/{{actors}}, or use {{device=cpu}}")
    if plan.actors * plan.actor_cpus + plan.decode_cpus > cluster_cpus:
        raise BatchOptionError(f"the scoring actors take {plan.actors * plan.actor_cpus:g} of the cluster's "
                               f"{cluster_cpus:g} CPUs and leave none for decoding: lower {{actors}} or {{actor_cpus}}")


MIN_BUFFER_BYTES = 128 * 2**20


def buffer_bytes(cfg: BatchConfig, spec: DecodeSpec, plan: ResourcePlan, cluster_cpus: float) -> int:
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
        views = spec.preprocess.n_views * (1 + len(spec.stability))  # --stability: the copies too
    else:
        size, views = spec.size, spec.views
    block = cfg.decode_batch * views * size * size * 3  # uint8 views of one decoding task's inputs
    slots = max(1, int((cluster_cpus - plan.actors * plan.actor_cpus) / plan.decode_cpus))
    if plan.decode_tasks:
        slots = min(slots, plan.decode_tasks)
    per_actor = 4 * math.ceil(plan.batch_size / cfg.decode_batch)
    return max(MIN_BUFFER_BYTES, block * (2 * slots + per_actor * plan.actors))


def build_dataset(todo, spec: DecodeSpec, plan: ResourcePlan, actor_cls, actor_kwargs: dict, decode_batch: int):
    """The Ray Data plan: input blocks -> decode_block (tasks) -> actor pool."""
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from .tasks import decode_block

    blocks = [todo.slice(i, decode_batch) for i in range(0, todo.num_rows, decode_batch)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(decode_block, fn_kwargs={"spec": spec}, batch_size=None, batch_format="pyarrow",
                        num_cpus=plan.decode_cpus, compute=TaskPoolStrategy(size=plan.decode_tasks))
    return ds.map_batches(
        actor_cls, fn_constructor_kwargs=actor_kwargs, compute=ActorPoolStrategy(size=plan.actors),
        batch_size=plan.batch_size, batch_format="pyarrow", num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus or None,
    )


def optimized_plan(ds) -> str:
    """The physical plan Ray will run, after operator fusion (the last section of `explain`)."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ds.explain()
    return text.getvalue().rsplit("Physical Plan (Optimized) --------", 1)[-1].strip()


def local_decode_tasks(plan: ResourcePlan, cores: int) -> int:
    """Decoding tasks for a local Ray: the cores the scoring actors leave, and at least two (a
    task's start, its decoding process and its hand-over then overlap another's decoding).
    Ray's logical CPUs are more than the cores (so that decoding is never starved: see
    _connect), and each decoding task holds a worker process, a fork server and a decoder
    (~250 MB): more tasks than that would add memory, not speed."""
    busy = plan.actors * (plan.actor_cpus if not plan.use_gpu else 1)
    return max(2, cores - int(busy))
