"""Scoring images with a trained detector: the `Detector` API (decode, crop, encode, head, records).

detector.py   Detector and Prediction
"""

from .._moved import lazy_reexport

# rine.inference was this module before the layout: its names resolve there, loaded on first use.
__getattr__, __dir__ = lazy_reexport(__name__, f"{__name__}.detector")
