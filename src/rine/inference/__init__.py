"""Scoring images with a trained detector: the `Detector` API (decode, crop, encode, head, records).

detector.py   Detector and Prediction
"""
