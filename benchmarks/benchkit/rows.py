"""The rows of throughput.py's table: one mode each, measured in its own subprocess.

A row is a `Row` in `ROWS`: the mode name passed to the child (`--mode`), its letter and
label, the function that loads and scores in the child (`score_baseline` or
`score_detector`, or a new one for a new engine), and when it is measured. Adding a row
(another precision, another engine) is one entry here, plus a scoring function if it is
not a `Detector` mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .machine import (
    children_peak_rss_mb,
    current_rss_mb,
    peak_rss_mb,
    release_free_memory,
    reset_peaks,
)
from .models import build_hf_backbone, random_head, random_openai_state, trained_head


@dataclass
class Scored:
    """What a row's scoring function reports (the child adds time-independent figures)."""

    precision: str  # the arithmetic actually used
    probs: np.ndarray  # [n] probability of "fake", in input order
    seconds: float  # scoring the n images, after loading and warm-up
    model_mb: float  # resident memory once loaded and warmed up
    batch: int
    workers: int
    decoder: str
    warmup_s: float | None = None  # compile + first batch, where that is worth showing
    extra: dict | None = None  # a row's own figures, passed through to the parent's JSON


def baseline_batch_size(n: int, workers: int) -> int:
    """128 as the reference, capped so that each DataLoader worker gets at least two batches."""
    return max(1, min(128, n // (2 * max(1, workers))))


def score_baseline(args: argparse.Namespace, paths: list[str], state: dict, head) -> Scored:
    """(a): benchmarks/reference_baseline.py, the reference's evaluation loop."""
    from reference_baseline import build_openai_model, score_like_reference

    model = build_openai_model(state)
    state.clear()
    # The reference evaluates with batch 128; on a benchmark of <= 128 images that would be
    # a single batch, decoded by ONE DataLoader worker with no overlap. Smaller batches give
    # every worker a share and let decoding overlap compute, as on a real-size dataset.
    bs = baseline_batch_size(len(paths), args.threads)
    run = dict(batch_size=bs, workers=args.threads, device=args.device)
    score_like_reference(model, head, paths[:2], **run)  # warm-up
    release_free_memory()
    model_mb = current_rss_mb()
    reset_peaks(args.device)
    t0 = time.perf_counter()
    probs = score_like_reference(model, head, paths, **run)
    elapsed = time.perf_counter() - t0
    precision = "fp16" if args.device.startswith("cuda") else "fp32"
    return Scored(precision, np.asarray(probs), elapsed, model_mb, bs, args.threads, "processes")


def score_detector(args: argparse.Namespace, paths: list[str], state: dict, head) -> Scored:
    """Our pipeline: `Detector` in the mode's precision ("fp32", "auto", "int8", "fp32+compile", ...);
    "+stability": `--stability` (each image and its 4 re-encoded copies batched together)."""
    from rine.config import PreprocessConfig, RINEConfig
    from rine.data.decoding import DecodeOptions, default_decoder, default_workers
    from rine.inference.detector import Detector, default_batch_size
    from rine.model.rine_model import RINEModel

    backbone = build_hf_backbone(state)
    state.clear()
    config = RINEConfig(backbone=args.arch, head=head.config, preprocess=PreprocessConfig(crop="center"))
    precision_name, _, extra = args.mode.partition("+")
    det = Detector(RINEModel(backbone, head), config, device=args.device, precision=precision_name,
                   keep_reference=False, compile=extra == "compile")  # as rine detect loads it
    stability = extra == "stability"
    batch = args.batch_size or default_batch_size(det.device)
    workers = args.workers or default_workers(det.device)
    decoder = default_decoder(det.device) if args.decoder == "auto" else args.decoder
    t_warm = time.perf_counter()
    det.predict(paths[: min(len(paths), batch)], batch_size=batch, stability=stability)  # warm-up at the real batch shape
    warmup_s = time.perf_counter() - t_warm
    release_free_memory()
    model_mb = current_rss_mb()
    reset_peaks(args.device)
    t0 = time.perf_counter()
    scored = det.predict_iter(paths, batch_size=batch, decode=DecodeOptions(workers=workers, decoder=args.decoder),
                              stability=stability)
    if extra == "provenance":  # as rine detect does: read ahead in a thread, one record per prediction
        from rine.provenance.records import read_files, with_provenance

        provenances = read_files(paths)
        preds = [p for p in scored if with_provenance(p.to_dict(), next(provenances)) is not None]
    else:
        preds = list(scored)
    elapsed = time.perf_counter() - t0
    probs = np.array([p.prob_fake for p in preds], dtype=np.float64)
    more = reencode_seconds(paths, config.preprocess) if stability else None
    return Scored(det.precision, probs, elapsed, model_mb, batch, workers, decoder, warmup_s, more)


def reencode_seconds(paths: list[str], preprocess, k: int = 8) -> dict:
    """The re-encoding's own work, timed apart after the run on one thread: per image, the
    stability decode (full decode, 4 re-encodings, crops) minus the usual one (crop-aware),
    over the first `k` images."""
    from rine.data.jpeg_crop import decode_views
    from rine.data.reencode import resolve_conditions, stability_views

    conditions, sample = resolve_conditions(), paths[:k]
    t0 = time.perf_counter()
    for path in sample:
        decode_views(path, preprocess)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    for path in sample:
        stability_views(path, preprocess, conditions)
    full = time.perf_counter() - t0
    return {"reencode_s_per_image": (full - plain) / len(sample), "conditions": len(conditions)}


def int8_unavailable(args: argparse.Namespace) -> str | None:
    from rine.model.quant import int8_unavailable as why

    return why(torch.device(args.device))


def bf16_apart_unavailable(args: argparse.Namespace) -> str | None:
    """Row (i), bf16, is measured where auto is not bf16 but bf16 runs natively (auto is
    int8-smooth on CPUs with VNNI/AMX-INT8): the mode auto ran before it."""
    from rine.model.accel import cpu_has_native_bf16, resolve_precision

    device = torch.device(args.device)
    if device.type != "cpu" or not cpu_has_native_bf16():
        return "bf16 is not native here"
    auto = resolve_precision("auto", device)
    return "auto is bf16 here: row (c)" if auto == "bf16" else None


@dataclass(frozen=True)
class Row:
    mode: str  # the child's --mode
    letter: str  # "(a)" ...
    label: Callable[[str], str]  # precision actually used -> the rest of the row's label
    score: Callable[[argparse.Namespace, list[str], dict, object], Scored]
    wanted: Callable[[argparse.Namespace], bool] = lambda args: True  # measured in this run?
    unavailable: Callable[[argparse.Namespace], str | None] = lambda args: None  # why it cannot run here

    def title(self, precision: str) -> str:
        return f"{self.letter} {self.label(precision)}"


ROWS = (
    Row("baseline", "(a)", lambda p: f"reference-like {p}", score_baseline),
    Row("fp32", "(b)", lambda p: "ours fp32", score_detector),
    Row("auto", "(c)", lambda p: f"ours auto={p}", score_detector),
    Row("fp32+compile", "(d)", lambda p: "ours fp32 compiled", score_detector, wanted=lambda a: a.compile),
    Row("auto+compile", "(e)", lambda p: f"ours {p} compiled", score_detector, wanted=lambda a: a.compile),
    # the cost of the provenance records (rine.provenance), to compare with (c): at most 5 %
    Row("auto+provenance", "(p)", lambda p: f"ours auto={p} + provenance", score_detector,
        wanted=lambda a: not getattr(a, "no_provenance", False)),
    Row("int8", "(f)", lambda p: "ours int8", score_detector, wanted=lambda a: not a.no_int8, unavailable=int8_unavailable),
    Row("bf16", "(i)", lambda p: "ours bf16", score_detector, unavailable=bf16_apart_unavailable),
    Row("auto+stability", "(s)", lambda p: f"ours {p} --stability", score_detector,
        wanted=lambda a: getattr(a, "stability", False)),
)
BY_MODE = {row.mode: row for row in ROWS}


def rows_for(args: argparse.Namespace) -> tuple[list[Row], list[tuple[Row, str]]]:
    """(the rows this run measures, [(row, why not)] for wanted rows this machine cannot run)."""
    run, skipped = [], []
    for row in ROWS:
        if not row.wanted(args):
            continue
        why = row.unavailable(args)
        (skipped.append((row, why)) if why else run.append(row))
    return run, skipped


def run_mode(args: argparse.Namespace) -> dict:
    """Child process: load one mode, score the image list, report figures as JSON."""
    if args.mode.startswith("ort-"):  # ONNX Runtime modes: benchmarks/onnx_rows.py
        import onnx_rows

        return onnx_rows.run_mode(args, json.loads(Path(args.paths_file).read_text())[: args.n])
    torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    paths = json.loads(Path(args.paths_file).read_text())[: args.n]
    state = random_openai_state(args.arch)
    head = trained_head(args.head_file) if args.head_file else random_head(args.arch, tuple(args.calib) if args.calib else None)
    s = BY_MODE[args.mode].score(args, paths, state, head)
    return {
        "mode": args.mode,
        "precision": s.precision,
        "n": len(paths),
        "seconds": s.seconds,
        "images_per_s": len(paths) / s.seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        "batch_size": s.batch,
        "workers": s.workers,
        "decoder": s.decoder,
        "model_rss_mb": s.model_mb,
        "workers_peak_rss_mb": children_peak_rss_mb(),
        "probs": [float(p) for p in s.probs],
        "warmup_s": s.warmup_s,
        **(s.extra or {}),
    }


def spawn(args: argparse.Namespace, script: str, arch: str, mode: str, n: int, paths_file: Path,
          calib: tuple[float, float], head_file: str | None) -> dict:
    """Run `script --child` for one mode; its last stdout line is `run_mode`'s JSON."""
    cmd = [
        sys.executable, script, "--child", "--arch", arch, "--mode", mode, "--n", str(n),
        "--paths-file", str(paths_file), "--threads", str(args.threads), "--device", args.device,
        "--calib", repr(calib[0]), repr(calib[1]), "--decoder", args.decoder,
    ] + (["--workers", str(args.workers)] if args.workers else []) + (
        ["--batch-size", str(args.batch_size)] if args.batch_size else [])
    if head_file:
        cmd += ["--head-file", head_file]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{arch} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
