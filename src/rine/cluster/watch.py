"""`rine batch` notices a cluster that shrank below its plan and stops at once.

A lost node under the default plan (the actor holding the head's CPUs, decoding on the lost
node) leaves the retried decoding tasks unschedulable: Ray waits for resources that will not
come back, and the job would sit idle until `--stall-timeout`. The driver polls the alive
nodes every few seconds (`ray.nodes()`, one call to the cluster's control store) and stops
the job, committed shards kept, as soon as the nodes left can no longer hold the plan: its
scoring actors, each on one node, plus one decoding task.

The decision (`holds`, `shortfall`) is plain Python over resource dicts; `watched` runs Ray's
iterator in a thread of its own so that the driver's thread can check between batches, and
while none come, without interrupting a shard commit.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Nodes = Mapping[str, Mapping[str, float]]  # node label -> its total resources {"CPU": 4.0, "GPU": 1.0}
_EPS = 1e-9  # Ray's resources are fractions (0.5 CPU): compare with a tolerance


@dataclass(frozen=True)
class PlanNeed:
    """What a plan asks the cluster for: `actors` actors of `actor_cpus` CPUs and `actor_gpus`
    GPUs (each on one node), and decoding tasks of `decode_cpus` CPUs (one at least)."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float

    @classmethod
    def of(cls, plan) -> PlanNeed:
        """From a `ResourcePlan`."""
        return cls(int(plan.actors), float(plan.actor_cpus), float(plan.actor_gpus), float(plan.decode_cpus))

    def describe(self) -> str:
        gpus = f" {self.actor_gpus:g} GPU" if self.actor_gpus else ""
        return f"{self.actors} scoring actor(s) of {self.actor_cpus:g} CPU{gpus} and a decoding task of {self.decode_cpus:g} CPU"


def _actors_on(need: PlanNeed, cpus: float, gpus: float) -> float:
    """How many of the plan's actors fit on a node of `cpus` and `gpus`."""
    fits = math.inf
    if need.actor_cpus > 0:
        fits = min(fits, math.floor(cpus / need.actor_cpus + _EPS))
    if need.actor_gpus > 0:
        fits = min(fits, math.floor(gpus / need.actor_gpus + _EPS))
    return max(fits, 0)


def holds(need: PlanNeed, nodes: Nodes) -> bool:
    """Whether `nodes` can run the plan at once: every actor on one node, and one decoding task
    on what some node has left. The actors are all alike, so it is enough to try each node as
    the decoding task's: it keeps the decoding CPUs, every other node holds as many actors as
    it can."""
    fit = {name: _actors_on(need, r.get("CPU", 0.0), r.get("GPU", 0.0)) for name, r in nodes.items()}
    total = sum(fit.values())
    for name, r in nodes.items():
        cpus = r.get("CPU", 0.0) - need.decode_cpus
        if cpus < -_EPS:
            continue
        if total - fit[name] + _actors_on(need, max(cpus, 0.0), r.get("GPU", 0.0)) >= need.actors:
            return True
    return False


def _sum(nodes: Nodes, key: str) -> float:
    return sum(r.get(key, 0.0) for r in nodes.values())


def shortfall(need: PlanNeed, before: Nodes, now: Nodes) -> str | None:
    """Why the job must stop (the nodes `now` alive cannot hold the plan that the nodes alive
    `before`, at its start, could), or None. A cluster that never held the plan is not a
    shrink: Ray may still place it (check_fits refuses plans beyond the totals)."""
    if not holds(need, before) or holds(need, now):
        return None
    lost = [name for name in before if name not in now]
    what = f"lost {len(lost)} node(s) ({', '.join(lost)})" if lost else "lost resources"
    return (f"the cluster {what}: the {len(now)} node(s) left ({_sum(now, 'CPU'):g} CPU, {_sum(now, 'GPU'):g} GPU) "
            f"cannot hold {need.describe()}")


def alive_nodes(nodes: Iterable[Mapping]) -> dict[str, dict[str, float]]:
    """`ray.nodes()` -> {"ADDRESS (ID prefix)": {"CPU": .., "GPU": ..}} of the alive nodes."""
    out = {}
    for n in nodes:
        if n.get("Alive"):
            res = n.get("Resources") or {}
            label = f"{n.get('NodeManagerAddress', '?')} ({str(n.get('NodeID', ''))[:8]})"
            out[label] = {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}
    return out


def ray_nodes() -> dict[str, dict[str, float]]:
    """The cluster's alive nodes now (see `alive_nodes`)."""
    import ray

    return alive_nodes(ray.nodes())


class ClusterShrank(Exception):
    """The cluster can no longer hold the job's plan (the message says why)."""


class ClusterWatch:
    """Compares the alive nodes with those at the job's start; `check()` -> the reason to stop, or None."""

    def __init__(self, need: PlanNeed, probe: Callable[[], Nodes] = ray_nodes):
        self.need, self.probe = need, probe
        self.before = dict(probe())
        if not holds(need, self.before):
            logger.warning("no node can hold %s (nodes: %s): Ray may wait for resources until --stall-timeout",
                           need.describe(), dict(self.before))

    def check(self) -> str | None:
        try:
            now = self.probe()
        except Exception:  # noqa: BLE001 - a control store that does not answer: Ray's own errors stop the job
            logger.debug("cannot list the cluster's nodes", exc_info=True)
            return None
        return shortfall(self.need, self.before, now)


def watched(items: Iterable, check: Callable[[], str | None], every: float = 2.0) -> Iterator:
    """`items` (Ray's batch iterator), consumed in a thread of its own; `check()` is called in the
    caller's thread every `every` seconds, between items and while none come, and a reason
    raises ClusterShrank. The caller's work on an item (a shard commit) is never interrupted;
    an exception of the iterator is raised here."""
    handoff: queue.Queue = queue.Queue(maxsize=2)  # Ray's iterator prefetches: two batches keep it busy
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def consume() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return  # the caller stopped: leaving the loop closes Ray's iterator
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
            put(("error", e))

    thread = threading.Thread(target=consume, name="rine-batch-results", daemon=True)
    thread.start()
    due = time.monotonic() + every
    try:
        while True:
            try:
                kind, value = handoff.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                kind = value = None
            if time.monotonic() >= due:
                reason = check()
                if reason:
                    raise ClusterShrank(reason)
                due = time.monotonic() + every
            if kind == "item":
                yield value
            elif kind == "end":
                return
            elif kind == "error":
                raise value
    finally:
        stop.set()
