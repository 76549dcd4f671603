"""`rine batch` stops at once when the cluster shrinks below its plan (rine.cluster.watch): the
decision over resource dicts and the driver's loop that checks while Ray delivers nothing
(no Ray needed), then a real two-node Ray cluster that loses the node of the scoring actor
(slow)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from rine.cluster.watch import (
    ClusterShrank,
    ClusterWatch,
    PlanNeed,
    alive_nodes,
    holds,
    shortfall,
    watched,
)

from support.ray_cluster import images, kill_cluster, records, worker_env


def _cpus(**nodes: float) -> dict[str, dict[str, float]]:
    return {name: {"CPU": float(c), "GPU": 0.0} for name, c in nodes.items()}


# the default CPU plan of a 4-CPU cluster: one actor of cores // 2 threads, decoding tasks of one CPU
DEFAULT = PlanNeed(actors=1, actor_cpus=2.0, actor_gpus=0.0, decode_cpus=1.0)


def test_the_issue_case_a_lost_worker_leaves_the_head_to_the_actor_and_decoding_nowhere():
    before, now = _cpus(head=2, worker=2), _cpus(head=2)
    assert holds(DEFAULT, before) and not holds(DEFAULT, now)
    reason = shortfall(DEFAULT, before, now)
    assert reason is not None and "lost 1 node(s) (worker)" in reason and "2 CPU" in reason
    assert "1 scoring actor(s) of 2 CPU" in reason


def test_each_actor_needs_one_node_not_the_cluster_total():
    # 4 CPUs in all hold a 3-CPU actor plus a decoding CPU, but no single node does (a totals-only check passes it)
    need = PlanNeed(1, 3.0, 0.0, 1.0)
    assert not holds(need, _cpus(a=2, b=2))
    assert holds(need, _cpus(a=3, b=1)) and holds(need, _cpus(a=4))


def test_one_decoding_slot_must_be_left_beside_the_actors():
    need = PlanNeed(2, 2.0, 0.0, 1.0)
    assert not holds(need, _cpus(a=2, b=2))  # both actors fit, nothing left to decode: Ray would wait forever
    assert holds(need, _cpus(a=3, b=2)) and holds(need, _cpus(a=5)) and holds(need, _cpus(a=4, b=1))
    assert not holds(need, _cpus(a=4)) and not holds(need, _cpus(a=3, b=0.5))


def test_fractional_requests_compare_with_a_tolerance():
    need = PlanNeed(1, 1.0, 0.0, 0.5)  # a one-thread actor: decoding asks half a CPU (plan.py)
    assert holds(need, _cpus(a=1.5)) and not holds(need, _cpus(a=1.4))
    assert holds(PlanNeed(3, 0.1, 0.0, 0.7), _cpus(a=1.0))  # 3 x 0.1 + 0.7: exactly 1 CPU, in floating point


def test_gpu_actors_need_a_gpu_each_on_their_node():
    need = PlanNeed(2, 1.0, 1.0, 1.0)
    two = {"a": {"CPU": 8.0, "GPU": 1.0}, "b": {"CPU": 8.0, "GPU": 1.0}}
    assert holds(need, two) and not holds(need, {"a": two["a"]})
    assert not holds(need, {"a": {"CPU": 1.0, "GPU": 2.0}, "c": {"CPU": 8.0}})  # the GPU node has one CPU: one actor
    assert holds(need, {"a": {"CPU": 2.0, "GPU": 2.0}, "c": {"CPU": 8.0}})


def test_only_a_shrink_below_the_plan_stops_the_job():
    # a lost node that the others absorb: Ray restarts the actor and retries the tasks
    assert shortfall(DEFAULT, _cpus(a=4, b=2), _cpus(a=4)) is None
    # a cluster that never held the plan did not shrink: no stop at the start (check_fits judges the plan)
    assert shortfall(PlanNeed(1, 3.0, 0.0, 1.0), _cpus(a=2, b=2), _cpus(a=2)) is None
    # nodes that stay but lose resources
    assert "lost resources" in shortfall(DEFAULT, _cpus(a=4), _cpus(a=2))
    # a node added after the start counts
    assert shortfall(DEFAULT, _cpus(a=2, b=2), _cpus(a=2, c=1)) is None


def test_alive_nodes_reads_ray_nodes():
    nodes = [{"NodeID": "abcdef0123456789", "Alive": True, "NodeManagerAddress": "10.0.0.1",
              "Resources": {"CPU": 4.0, "memory": 1e9, "node:10.0.0.1": 1.0}},
             {"NodeID": "ffff0000ffff0000", "Alive": False, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0}},
             {"NodeID": "1234567890abcdef", "Alive": True, "NodeManagerAddress": "10.0.0.3",
              "Resources": {"CPU": 2.0, "GPU": 1.0}}]
    assert alive_nodes(nodes) == {"10.0.0.1 (abcdef01)": {"CPU": 4.0, "GPU": 0.0},
                                  "10.0.0.3 (12345678)": {"CPU": 2.0, "GPU": 1.0}}


def test_a_probe_that_fails_does_not_stop_the_job():
    answers = iter([_cpus(a=2, b=2)])

    def probe():
        try:
            return next(answers)
        except StopIteration:
            raise ConnectionError("GCS unreachable") from None

    assert ClusterWatch(DEFAULT, probe).check() is None


def _drain(gen, into: list, errors: list) -> threading.Thread:
    def run():
        try:
            for x in gen:
                into.append(x)
        except Exception as e:  # noqa: BLE001 - recorded for the test to look at
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_stalled_iterator_is_left_when_the_check_says_stop():
    """Ray delivers two batches, then nothing (its tasks wait for resources that are gone): the
    check, made while nothing comes, stops the loop. The broken variant (iterating Ray's
    iterator in the driver's own thread) blocks until the stall timeout; here: forever."""
    blocked = threading.Event()

    def ray_batches():
        yield 1
        yield 2
        blocked.wait()  # never set
        yield 3

    lost = {"t": None}

    def check():
        return "the cluster lost 1 node(s)" if lost["t"] is not None else None

    got, errors = [], []
    t = _drain(watched(ray_batches(), check, every=0.05), got, errors)
    time.sleep(0.3)
    assert got == [1, 2] and not errors  # still waiting, checking every 0.05 s
    lost["t"] = time.monotonic()
    t.join(timeout=5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ClusterShrank) and "lost 1 node" in str(errors[0])
    assert time.monotonic() - lost["t"] < 2


def test_batches_pass_in_order_and_errors_of_ray_come_through():
    calls = []

    def check():
        calls.append(1)
        return None

    assert list(watched(iter(range(50)), check, every=0.0)) == list(range(50))
    assert calls  # checked between batches too

    def failing():
        yield "a"
        raise RuntimeError("actor died")

    out = []
    with pytest.raises(RuntimeError, match="actor died"):
        for x in watched(failing(), lambda: None, every=10):
            out.append(x)
    assert out == ["a"]


def test_the_callers_work_on_a_batch_is_not_interrupted():
    """The check runs in the caller's thread between batches: a slow shard commit finishes
    before the stop (the broken variant, an exception raised into the driver's thread, could
    land inside a commit)."""
    started, committed = [], []

    def commit(x):
        started.append(x)
        time.sleep(0.3)
        committed.append(x)

    with pytest.raises(ClusterShrank):
        for x in watched(iter(range(10)), lambda: "lost" if started else None, every=0.05):
            commit(x)
    assert started == committed == [0]


# --------------------------------------------------------------------------- a real two-node cluster

DRIVER = """
import sys
from rine.cluster.batch import run_batch
from rine.cluster.job import BatchConfig
r = run_batch(BatchConfig(inputs=[sys.argv[1]], out=sys.argv[2], model=sys.argv[3], address=sys.argv[4], precision="fp32",
              shard_size=4, batch_size=2, decode_batch=2, actor_cpus=2, progress=False, stall_timeout=600,
              scorer="support.batch_jobs:SlowScorer"))
print(r.error, file=sys.stderr)
sys.exit(r.exit_code)
"""


@pytest.mark.slow
def test_a_lost_node_stops_the_job_at_once_and_a_rerun_finishes(tiny_checkpoint_dir, tmp_path, monkeypatch):
    """Two Ray nodes on this machine: a head of 1 CPU and a worker of 3, so the scoring actor
    (2 CPUs) can only run on the worker. The worker is lost after the first shard: the actor
    cannot be restarted anywhere, Ray would wait until --stall-timeout (600 s here). The job
    must stop within seconds (Ray marks a killed node dead after ~15 s of missed health
    checks) with the reason; a rerun on a new worker finishes with every input exactly once
    and keeps the shards committed before the loss. The driver is a process of its own: one
    stuck in Ray (the broken variant) is killed, not left inside pytest."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster


    temp = tempfile.mkdtemp(prefix="rw-", dir="/tmp")  # short: Ray's socket paths live under it
    # every node's files (and the cluster's address file) under `temp`, not /tmp/ray
    (Path(temp) / "ray").mkdir()
    for k, v in {**worker_env(), "RINE_TEST_CLUSTER": temp, "RINE_TEST_SLOW": "1.0", "RAY_TMPDIR": temp}.items():
        monkeypatch.setenv(k, v)  # the nodes' workers inherit them from this process
    imgs = images(tmp_path / "imgs", 16)
    out = tmp_path / "out"
    cluster = driver = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        worker = cluster.add_node(num_cpus=3)
        cluster.wait_for_nodes()
        cmd = [sys.executable, "-c", DRIVER, str(tmp_path / "imgs"), str(out), str(tiny_checkpoint_dir), cluster.address]
        driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while not list(out.glob("part-*.parquet")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, "the job ended before the node was lost: " + driver.stderr.read()[-2000:]
        lost = time.monotonic()
        cluster.remove_node(worker, allow_graceful=False)  # its processes killed, as a crashed machine's
        try:
            _, err = driver.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            driver.kill()
            pytest.fail("the job still waits for the lost node 90 s after it was lost")
        print(f"stopped {time.monotonic() - lost:.1f} s after the node was lost")
        assert driver.returncode == 2, err[-2000:]
        assert "lost 1 node(s)" in err and "cannot hold 1 scoring actor(s) of 2 CPU" in err, err[-2000:]
        kept = {p.name: p.stat().st_ino for p in out.glob("part-*.parquet")}
        assert 1 <= len(kept) < 4

        monkeypatch.setenv("RINE_TEST_SLOW", "0")  # before the new node: its workers inherit it
        cluster.add_node(num_cpus=3)
        cluster.wait_for_nodes()
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        if cluster is not None:
            cluster.shutdown()
        kill_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
    rows = records(out)
    assert sorted(r["item"] for r in rows) == list(range(16))  # every input exactly once
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in imgs)
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # committed before the loss: kept, not redone
