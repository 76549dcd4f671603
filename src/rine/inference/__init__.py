"""Scoring images with a trained detector: the `Detector` API (decode, crop, encode, head, records).

detector.py   Detector and Prediction
"""

from .detector import *  # noqa: F403  (rine.inference was this module before the layout)
from .detector import Detector, Prediction  # noqa: F401
