"""Benchmarks: score labelled test sets, compute metrics, write tables and plots.

engine.py    evaluate(): conditions x sets x heads, one backbone pass
metrics.py   ACC, AP, AUC, ... (tested against scikit-learn)
plots.py     figures of a run
"""

from .engine import *  # noqa: F403  (rine.evaluation was the engine module before the layout)
