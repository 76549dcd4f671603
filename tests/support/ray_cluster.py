"""Helpers of the `rine batch` tests that run Ray clusters of their own (test_batch.py,
test_batch_watch.py): the workers' environment, ending a cluster's processes by pid, the
committed records, and input images."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import REPO, write_image

TESTS = REPO / "tests"
SRC = REPO / "src"


def pids_under(marker: str) -> list[int]:
    """Processes of a cluster of our own: their command line or environment names `marker`
    (its session folder, also in RINE_TEST_CLUSTER, which every Ray process inherits: workers
    rename themselves `ray::...`, so their command line alone would not tell)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            seen = Path(f"/proc/{entry}/cmdline").read_bytes() + Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in seen:
            pids.append(int(entry))
    return pids


def kill_cluster(temp_dir: str) -> None:
    """End the processes of a local Ray started with `temp_dir` (by pid: only ours)."""
    for pid in pids_under(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def worker_env() -> dict[str, str]:
    # Ray workers inherit the driver's environment: they import this worktree's rine and the
    # fault helpers of support/batch_jobs.py from here.
    return {"PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])}


def records(out: Path) -> list[dict]:
    """The records of a job's committed shards, in shard order."""
    import pyarrow.parquet as pq

    parts = sorted(out.glob("part-*.parquet"))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` images: sizes around 224 (smaller ones are zero-padded, larger cropped) and every mode the loader converts."""
    modes = ["RGB", "L", "RGBA"]
    return [write_image(folder / f"img{i:02d}.png", size=(200 + 17 * i, 230 + 5 * (i % 3)), mode=modes[i % 3],
                        seed=seed + i) for i in range(n)]
