"""Scoring and tap extraction at scale on Ray Data (`rine batch`); needs `pip install 'rine[cluster]'`.

manifest.py   the input list: folders, files, globs and manifests (.csv/.jsonl/.parquet), local or URIs
tasks.py      what runs on the cluster: crash-isolated decoding tasks, scoring and tap-encoding actors
batch.py      the pipeline: plan, Ray Data dataset, shard commits (exactly once), the job manifest
reconcile.py  the output checked against the input list: every input exactly once

Only batch.py imports ray, and only inside functions: `import rine.cluster` works without the extra.
"""
