"""Benchmarks: score labelled test sets, compute metrics, write tables and plots (a new metric goes in metrics.py).

results.py   the types: heads, conditions, runs, records -> metrics
scoring.py   one test set, live or through a tap store
engine.py    evaluate(): conditions x sets x heads, one backbone pass per image
metrics.py   ACC, AP, AUC, ... (tested against scikit-learn)
outputs.py   metrics.json, predictions.jsonl, the paper's tables
plots.py     figures of a run
"""

from .._moved import lazy_reexport

# rine.evaluation was the engine module before the layout: its names resolve there, loaded on first use.
__getattr__, __dir__ = lazy_reexport(__name__, f"{__name__}.engine")
