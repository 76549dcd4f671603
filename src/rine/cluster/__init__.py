"""Scoring and tap extraction at scale on Ray Data (`rine batch`); needs `pip install 'rine[cluster]'`.

manifest.py   the input list: folders, files, globs and manifests (.csv/.jsonl/.parquet), local or URIs
tasks.py      what runs on the cluster: crash-isolated decoding tasks, scoring and tap-encoding actors
batch.py      the pipeline: plan, Ray Data dataset, shard commits (exactly once), the job manifest
reconcile.py  the output checked against the input list: every input exactly once
watch.py      the driver's watch: a cluster that lost the nodes the plan needs stops the job at once

Ray is imported only inside functions (batch.py, plan.py, watch.py): `import rine.cluster` works without the extra.
"""

RAY_RANGE = ">=2.60,<2.64"  # map_batches(compute=ActorPoolStrategy(...), num_cpus=, num_gpus=) as 2.60 has it
INSTALL_HINT = f"rine batch needs Ray Data: pip install 'rine[cluster]' (ray[data]{RAY_RANGE})"


def ray_available() -> bool:
    """Whether Ray Data (and the pyarrow it brings) can be imported."""
    try:
        import pyarrow  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True
