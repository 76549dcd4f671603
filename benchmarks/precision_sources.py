"""Where bf16's (or int8's) probability error comes from: rounding sites and blocks, emulated exactly.

    python benchmarks/precision_sources.py                 # 48 benchmark images, ~10 min on 2 cores
    python benchmarks/precision_sources.py --by blocks     # bf16 in one group of blocks at a time
    python benchmarks/precision_sources.py --format int8   # the same for int8 (rine.model.quant)
    python benchmarks/precision_sources.py --by none       # only the real encoders (bf16, int8, int8-smooth)
    python benchmarks/precision_sources.py --by plans      # the real int8 encoder under candidate Int8Plans
    python benchmarks/precision_sources.py --by none --outliers 10   # with LayerNorm outlier channels

First the real fast encoders (`FastTapEncoder` bf16, int8 and int8-smooth, where this CPU
runs int8) against exact float32; `--by plans` then runs the real int8 encoder under the
candidate mixes of `PLANS` below (which GEMMs and blocks run in int8, with or without
SmoothQuant smoothing: rine.model.smooth), the way `int8-smooth`'s plan was chosen. Then the encoder is run in float32 with chosen values rounded as the
format rounds them: bf16 (`x.bfloat16().float()`, what a bf16 GEMM with float32
accumulation sees), or int8 (weights to int8 with one scale per output channel,
GEMM inputs to uint8 with one scale and zero point per batch of 16, as `--precision int8`).
Sites: the weights ("W"), each GEMM's input ("in_*") and, in bf16, output ("out_*"; int8
GEMMs write float32). Each line gives the error of the official 2-class head's probability
against exact float32 on the benchmark's images and ViT-L/14-shaped random encoder
(benchmarks/throughput.py), the same for throughput.py's random stress head (logit std 2
on these images), and the taps' relative error at the first and last block.

Random weights have no activation outlier channels; `--outliers F` gives the LayerNorms
four channels F times larger (benchkit.models.random_openai_state), as real CLIP has.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput as bench  # noqa: E402

SITES = {
    "bf16": ("W", "in_qkv", "out_qkv", "in_out", "out_out", "in_fc1", "in_fc2", "out_fc2"),
    "int8": ("W", "in_qkv", "in_out", "in_fc1", "in_fc2"),
}
BATCH = 16  # the Detector's CPU batch: int8's activation scales are per batch


def candidate_plans() -> dict:
    """The int8 mixes `--by plans` measures (Int8Plan: which GEMMs, from which block, smoothing)."""
    from rine.model.smooth import PLANS, Int8Plan

    return {
        "int8 everywhere (--precision int8)": PLANS["int8"],
        "int8 everywhere, smoothed": Int8Plan(smooth=0.5),
        "int8 in blocks 8-23": Int8Plan(kept_share=1 / 3),
        "int8 in blocks 12-23": Int8Plan(kept_share=1 / 2),
        "int8 in blocks 16-23": Int8Plan(kept_share=2 / 3),
        "int8 in blocks 18-23": Int8Plan(kept_share=3 / 4),
        "int8 QKV and fc1 only, smoothed": Int8Plan(gemms=("qkv", "fc1"), smooth=0.5),
        "int8-smooth": PLANS["int8-smooth"],
    }


def _bf16(site: str, x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


def _int8(site: str, x: torch.Tensor) -> torch.Tensor:
    """int8 weights per output channel (symmetric), uint8 inputs per tensor (asymmetric)."""
    if site == "W":
        scale = x.abs().amax(dim=1, keepdim=True) / 127
        return torch.round(x / scale).clamp(-127, 127) * scale
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    zp = round(-lo / scale)
    return (torch.round(x / scale) + zp).clamp(0, 255).sub(zp) * scale


ROUND = {"bf16": _bf16, "int8": _int8}


@torch.no_grad()
def emulated_taps(clip, pixels: torch.Tensor, sites: set[str], blocks: set[int], fmt: str = "bf16") -> torch.Tensor:
    """Taps [N, blocks, width] with `sites` rounded to `fmt` in `blocks` (fused-swish MLP)."""
    rnd = ROUND[fmt]
    out = []
    for x in pixels.split(BATCH):
        hidden = clip.pre_layrnorm(clip.embeddings(x))
        b, t, d = hidden.shape
        heads = clip.config.num_attention_heads
        taps = []
        for i, layer in enumerate(clip.encoder.layers):
            on = sites if i in blocks else set()

            def r(name, v, on=on):
                return rnd(name, v) if name in on else v

            a = layer.self_attn
            y = r("in_qkv", layer.layer_norm1(hidden))
            q, k, v = (r("out_qkv", F.linear(y, r("W", m.weight), m.bias)) for m in (a.q_proj, a.k_proj, a.v_proj))
            q, k, v = (z.view(b, t, heads, -1).transpose(1, 2) for z in (q, k, v))
            o = r("in_out", F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
            hidden = hidden + r("out_out", F.linear(o, r("W", a.out_proj.weight), a.out_proj.bias))
            normed = layer.layer_norm2(hidden)
            taps.append(normed[:, 0])
            if i + 1 == len(clip.encoder.layers):
                break
            z = F.linear(r("in_fc1", normed), r("W", layer.mlp.fc1.weight), layer.mlp.fc1.bias)
            z = r("in_fc2", z * torch.sigmoid(1.702 * z))
            hidden = hidden + r("out_fc2", F.linear(z, r("W", layer.mlp.fc2.weight), layer.mlp.fc2.bias))
        out.append(torch.stack(taps, dim=1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="benchmark images (default 48, as throughput.py)")
    p.add_argument("--by", choices=("sites", "blocks", "plans", "none"), default="sites",
                   help="what the emulated lines vary (none: only the real encoders, a few minutes; "
                        "plans: the real int8 encoder under candidate mixes)")
    p.add_argument("--outliers", type=float, default=0.0,
                   help="LayerNorm outlier channels this many times larger (default: none, plain random weights)")
    p.add_argument("--format", choices=tuple(ROUND), default="bf16", help="the format emulated (default bf16)")
    p.add_argument("--image-dir", default="/tmp/rine-bench-imgs")
    p.add_argument("--head", default=None, help="default: the official 2-class head from tests/fixtures")
    args = p.parse_args()

    from rine.config import PreprocessConfig
    from rine.data.images import load_image
    from rine.data.preprocess import preprocess
    from rine.model.accel import FastTapEncoder
    from rine.model.quant import int8_unavailable

    head_file = args.head or bench.default_trained_head("ViT-L/14")
    if not head_file:
        raise SystemExit("no trained head: pass --head model_2class_trainable.pth")
    head = bench.trained_head(head_file)
    backbone = bench.build_hf_backbone(bench.random_openai_state("ViT-L/14", outliers=args.outliers))
    clip = backbone.clip
    paths = bench.make_images(Path(args.image_dir), args.n)
    pixels = torch.cat([preprocess(load_image(p), PreprocessConfig()) for p in paths])
    everywhere = set(range(clip.config.num_hidden_layers))
    exact = emulated_taps(clip, pixels, set(), everywhere)
    with torch.no_grad():
        ref = head(exact).logits
        raw = bench.random_head("ViT-L/14")(exact).logits
        stress = bench.random_head("ViT-L/14", (float(raw.mean()), float(raw.std())))
        stress_ref = stress(exact).logits

    @torch.no_grad()
    def report(name: str, taps: torch.Tensor) -> None:
        logits = head(taps).logits
        dp = (torch.sigmoid(logits) - torch.sigmoid(ref)).abs()
        ds = (torch.sigmoid(stress(taps).logits) - torch.sigmoid(stress_ref)).abs()
        dl = logits - ref
        rel = ((taps - exact).norm(dim=-1) / exact.norm(dim=-1)).mean(0)
        print(f"{name:<34} max|dp| {dp.max():.4f}  mean|dp| {dp.mean():.5f}  rms dlogit {dl.pow(2).mean().sqrt():.4f}"
              f"  stress max|dp| {ds.max():.4f} mean {ds.mean():.5f}"
              f"  tap rel err first/last {rel[0]:.1e}/{rel[-1]:.1e}", flush=True)

    outl = f", LayerNorm outlier channels x{args.outliers:g}" if args.outliers > 1 else ""
    print(f"# {len(paths)} images, head {Path(head_file).name}, ViT-L/14-shaped random encoder{outl}; "
          f"tolerance of a fast mode: max|dp| <= 0.02, mean|dp| <= 0.002")
    why = int8_unavailable(torch.device("cpu"))

    def real(name: str, precision: str) -> None:
        with torch.no_grad():
            encoder = FastTapEncoder(backbone, precision)
            report(name, torch.cat([encoder(x) for x in pixels.split(BATCH)]))

    for precision in ("bf16", "int8", "int8-smooth"):
        if why and precision != "bf16":
            print(f"FastTapEncoder {precision}: not run here ({why})")
            continue
        real(f"FastTapEncoder {precision} (the real one)", precision)
    if args.by == "plans":
        if why:
            raise SystemExit(f"--by plans needs int8: {why}")
        from rine.model import smooth

        for name, plan in candidate_plans().items():
            smooth.PLANS["candidate"] = plan
            real(name, "candidate")
        return
    fmt, sites = args.format, set(SITES[args.format])

    def emulated(sites: set[str], blocks: set[int]) -> torch.Tensor:
        return emulated_taps(clip, pixels, sites, blocks, fmt)

    if args.by == "none":
        return
    report(f"emulated {fmt}: every site, every block", emulated(sites, everywhere))
    if args.by == "sites":
        for site in SITES[fmt]:
            report(f"emulated {fmt}: all sites but {site}", emulated(sites - {site}, everywhere))
        if fmt == "bf16":
            outs = {"out_qkv", "out_out", "out_fc2"}
            report("emulated bf16: fp32 GEMM outputs", emulated(sites - outs, everywhere))
        else:
            report("emulated int8: weights only", emulated({"W"}, everywhere))
    else:
        for g in range(0, len(everywhere), 4):
            group = set(range(g, g + 4))
            report(f"emulated {fmt} in blocks {g}-{g + 3} only", emulated(sites, group))
        report(f"emulated {fmt}: blocks 0-1 in fp32", emulated(sites, everywhere - {0, 1}))


if __name__ == "__main__":
    main()
