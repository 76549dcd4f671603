"""Running detectors over test sets: one backbone pass per (image, transform), any number of heads.

    det = Detector.from_pretrained("rine-vitl14-4class")
    sets = read_layout("ufd20", "data/test").sets
    result = evaluate(det, sets, conditions=[Condition(), Condition("jpeg", seed=0)])
    evaluation.outputs.write_outputs(result, "runs/ufd20")

Each image is decoded once; every transform (clean, or a robustness perturbation) turns it
into uint8 views [V, S, S, 3]; the frozen backbone turns the views into taps
[V, blocks, width] once; every head scores those taps. A head's probability for an image
is sigmoid(mean of its views' logits) (ten-crop, as the reference). Unreadable images
get an `error` record and are left out of the metrics (counted as `n_errors`).

With `cache_dir`, taps are kept across runs in tap stores (`rine.data.tap_store`) (one per test set
and transform), so a second evaluation of other heads on the same data skips the backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..data.decoding import DecodeOptions
from ..data.images import DEFAULT_MAX_BYTES
from ..data.testsets import TestSet
from ..inference.detector import default_batch_size
from ..model.calibration import DecisionRule
from .calibration import apply_rule
from .results import Condition, EvalHead, EvalResult, RunResult, metrics_of
from .scoring import score_set_cached, score_set_live

logger = logging.getLogger(__name__)


def head_rule(head: EvalHead, threshold: float | None = None) -> DecisionRule:
    """The decision rule of an evaluated head: its config's (calibrated or not), `threshold`
    (a probability) replacing the cut; a head without a config cuts at 0.5."""
    if head.config is None:
        return DecisionRule(threshold=0.5 if threshold is None else threshold, overridden=threshold is not None)
    return DecisionRule.of(head.config, threshold)


def evaluate(
    detector,
    sets: Sequence[TestSet],
    *,
    heads: Sequence[EvalHead] | None = None,
    conditions: Sequence[Condition] | None = None,
    root: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    threshold: float | None = None,
    cache_dir: str | Path | None = None,
    cache_dtype: str = "float32",
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
    decode: DecodeOptions | None = None,
) -> EvalResult:
    """Score every set under every condition with every head (default: the detector's own).

    The backbone runs once per (image, condition); `root` is the data root images are
    seeded by (see `image_key`). Metrics use `score > threshold`; None: each head's own cut
    (0.5, the paper's ACC, for an uncalibrated head). A calibrated head (config.calibration)
    gets calibrated probabilities in its records (rine.model.calibration), a float `threshold`
    replacing its cut. `bootstrap` N adds seeded 95 % intervals of ACC, AP and AUC per set.
    `decode` (`DecodeOptions`: image limits, decoding workers, decoder, per-image timeout)
    says how images are decoded; limits it leaves None are the detector's, workers and
    decoder the device's defaults.
    """
    decode = decode or DecodeOptions()
    # limits the options leave open are the detector's own
    decode = replace(decode, max_pixels=getattr(detector, "max_pixels", None) if decode.max_pixels is None
                     else decode.max_pixels, max_bytes=getattr(detector, "max_bytes", DEFAULT_MAX_BYTES)
                     if decode.max_bytes is None else decode.max_bytes)
    heads = (
        list(heads)
        if heads
        else [EvalHead(detector.config.name or "model", detector.head, detector.config)]
    )
    conditions = list(conditions) if conditions else [Condition()]
    batch_size = batch_size or default_batch_size(detector.device)
    # The encoder's shape, whichever backend runs it (torch or an ONNX export's taps output).
    backbone = detector.backend
    if cache_dir is not None and detector.model is None:
        raise ValueError(f"a features cache needs the torch backend (this detector runs on {backbone.name})")
    for h in heads:
        if h.head is None:
            raise ValueError(f"model {h.name!r} has no head weights to score taps with")
        cfg = h.head.config
        if cfg.in_dim != backbone.width or not cfg.takes(backbone.n_blocks):
            raise ValueError(
                f"head {h.name!r} expects {cfg.n_blocks} blocks of width {cfg.in_dim}; the backbone "
                f"has {backbone.n_blocks} of width {backbone.width}"
            )
        h.head.to(detector.device).eval()
    runs = [RunResult(h.name, c) for c in conditions for h in heads]
    for ts in sets:
        if cache_dir is not None:
            recs = score_set_cached(detector, heads, conditions, ts, root, batch_size, decode, progress,
                                     Path(cache_dir).expanduser(), cache_dtype)
        else:
            recs = score_set_live(detector, heads, conditions, ts, root, batch_size, decode, progress)
        for ci in range(len(conditions)):
            for hi in range(len(heads)):
                runs[ci * len(heads) + hi].records[ts.name] = recs[ci][hi]
    for i, run in enumerate(runs):
        hi = i % len(heads)
        rule = head_rule(heads[hi], threshold)
        calibrated = apply_rule(run.records, rule)
        run.metrics = metrics_of(run.records, rule.threshold, bootstrap, bootstrap_seed, calibrated, rule)
        with torch.no_grad():
            run.block_importance = heads[hi].head.block_importance().float().cpu().tolist()
    return EvalResult(runs, [ts.name for ts in sets])
