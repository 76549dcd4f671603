"""Benchmarks: score labelled test sets, compute metrics, write tables and plots (a new metric goes in rine/metrics.py).

results.py   the types: heads, conditions, runs, records -> metrics (`rine.metrics`, shared with training)
scoring.py   one test set, live or through a tap store
engine.py    evaluate(): conditions x sets x heads, one backbone pass per image
outputs.py   metrics.json, predictions.jsonl, the paper's tables
plots.py     figures of a run
"""
