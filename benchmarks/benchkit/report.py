"""What throughput.py prints: the precision probe, the table of rows, and the lines under it."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .machine import gflop_per_image, int8_flop_share
from .models import build_hf_backbone, random_head, random_openai_state, trained_head
from .rows import BY_MODE, Row, baseline_batch_size


@torch.no_grad()
def precision_probe(arch: str, paths: list[str], head_file: str | None, calib: tuple[float, float], device: str,
                    precisions: tuple[str, ...] = ("auto",)) -> None:
    """max |p - p_fp32| on the same images for the trained head and for the random stress
    head, for each of `precisions` ("auto" is resolved on `device`). A random He-initialised
    head rescaled to logit std 2 amplifies the tap error several times more than a trained
    head does; both are printed."""
    from rine.config import PreprocessConfig
    from rine.data.images import load_image
    from rine.data.preprocess import preprocess
    from rine.model.accel import FastTapEncoder, resolve_precision

    dev = torch.device(device)
    backbone = build_hf_backbone(random_openai_state(arch)).to(dev)
    pixels = torch.cat([preprocess(load_image(p), PreprocessConfig()) for p in paths]).to(dev)
    exact = torch.cat([FastTapEncoder(backbone, "fp32", dev)(x) for x in pixels.split(16)]).float().cpu()
    heads = {"random He head, logit std 2 (stress)": random_head(arch, calib)}
    if head_file:
        heads = {f"trained head {Path(head_file).name}": trained_head(head_file), **heads}
    for precision in precisions:
        fast = resolve_precision(precision, dev)
        encoder = FastTapEncoder(backbone, fast, dev)
        low = torch.cat([encoder(x) for x in pixels.split(16)]).float().cpu()
        del encoder
        for name, head in heads.items():
            a, b = head(exact).logits, head(low).logits
            dp = (torch.sigmoid(a) - torch.sigmoid(b)).abs()
            print(f"{fast} vs fp32 on {len(paths)} images, {name}: max |dp| {dp.max().item():.4f} (mean {dp.mean().item():.4f}), "
                  f"max |dlogit| {(a - b).abs().max().item():.3f}, fp32 logit std {a.std().item():.2f}")


def print_table(arch: str, n: int, results: dict[str, list[dict]], med: dict[str, float], args: argparse.Namespace,
                skipped: list[tuple[Row, str]]) -> None:
    """The table: one line per measured row, medians, ratio to (a), memory, error vs (b)."""
    on_gpu = args.device.startswith("cuda")
    ref_probs = np.array(results["fp32"][0]["probs"])
    spread = float(np.std(ref_probs))
    print(f"## {arch}: {n} images, end to end from files, median of {args.repeat} run(s); "
          f"fp32 probabilities: std {spread:.3f}, range {ref_probs.min():.3f}-{ref_probs.max():.3f}")
    print(f"(a) runs batches of {baseline_batch_size(n, args.threads)} with {args.threads} DataLoader workers; "
          f"(b), (c) batches of {results['auto'][0]['batch_size']} with {results['auto'][0]['workers']} decoding {results['auto'][0]['decoder']}")
    gpu_col = f"{'peak GPU MB':>13}" if on_gpu else ""
    print(f"{'mode':<24}{'images/s':>10}{'x baseline':>12}{'RSS loaded MB':>15}{'peak scoring MB':>17}{gpu_col}"
          f"{'max |dp| vs fp32':>18}{'mean |dp|':>11}  each run's images/s")
    for mode, rs in results.items():
        r = rs[0]
        label = BY_MODE[mode].title(r["precision"])
        dps = np.abs(np.array(r["probs"]) - ref_probs)
        gpu = f"{r['peak_gpu_mb']:>13.0f}" if on_gpu else ""
        print(f"{label:<24}{med[mode]:>10.2f}{med[mode] / med['baseline']:>12.2f}{r['model_rss_mb']:>15.0f}"
              f"{r['peak_rss_mb']:>17.0f}{gpu}{dps.max():>18.2e}{dps.mean():>11.1e}  "
              + ", ".join(f"{x['images_per_s']:.2f}" for x in rs))
    for row, why in skipped:
        print(f"{row.title(row.mode)}: not measured here ({why})")
    for mode in ("fp32+compile", "auto+compile"):
        if mode in results:
            warm = ", ".join(f"{r['warmup_s']:.0f}" for r in results[mode])
            print(f"{mode}: compile + first batch took {warm} s per run (not in images/s)")


def print_memory(n: int, results: dict[str, list[dict]], half: dict) -> None:
    print(f"(a)'s DataLoader worker processes peaked at {results['baseline'][0]['workers_peak_rss_mb']:.0f} MB each (not included above)")
    print(f"peak RSS of (c) while scoring {half['n']} images: {half['peak_rss_mb']:.0f} MB; "
          f"{n} images: {results['auto'][0]['peak_rss_mb']:.0f} MB")


def print_matmul_shares(arch: str, results: dict[str, list[dict]], med: dict[str, float], peaks: dict[str, float]) -> None:
    """The share of the attainable matmul rate of its arithmetic that (c), (f) int8 and (i)
    bf16 reach. A mix (int8-smooth: int8 GEMMs in the last blocks, bf16 elsewhere) is set
    against the time its FLOPs would take at each format's attainable rate, and against the
    attainable int8 rate."""
    gf = gflop_per_image(arch, ours=True)
    for mode, letter in (("auto", "(c)"), ("int8", "(f)"), ("bf16", "(i)")):
        if mode not in results:
            continue
        prec = results[mode][0]["precision"]
        achieved = med[mode] * gf
        head = f"{letter} runs {achieved:.0f} GFLOP/s of encoder matmuls ({gf:.1f} GFLOP/image) ="
        share = int8_flop_share(arch, prec) if prec != "int8" else 1.0
        if 0 < share < 1 and peaks.get("int8") and peaks.get("bf16"):
            mixed = 1 / (share / peaks["int8"] + (1 - share) / peaks["bf16"])
            print(f"{head} {achieved / mixed:.0%} of the attainable rate of its mix ({share:.0%} of the FLOPs in int8 "
                  f"at {peaks['int8']:.0f}, the rest at bf16's {peaks['bf16']:.0f}: {mixed:.0f} GFLOP/s), "
                  f"{achieved / peaks['int8']:.0%} of the attainable int8 rate")
            continue
        peak = peaks.get(prec, 0.0)
        if peak:
            print(f"{head} {achieved / peak:.0%} of the attainable {prec} matmul rate ({peak:.0f} GFLOP/s)")
