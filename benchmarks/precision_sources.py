"""Where bf16's probability error comes from: rounding sites and blocks, emulated exactly.

    python benchmarks/precision_sources.py                 # 48 benchmark images, ~10 min on 2 cores
    python benchmarks/precision_sources.py --by blocks     # bf16 in one group of blocks at a time

The encoder is run in float32 with chosen values rounded to bf16 (`x.bfloat16().float()`),
which is what a bf16 GEMM with float32 accumulation sees. Sites: the weights ("W"), each
GEMM's input ("in_*") and output ("out_*"). Each line gives the error of the official 2-class
head's probability against exact float32 on the benchmark's images and ViT-L/14-shaped random
encoder (benchmarks/throughput.py), and the taps' relative error at the first and last block.
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

SITES = ("W", "in_qkv", "out_qkv", "in_out", "out_out", "in_fc1", "in_fc2", "out_fc2")


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


@torch.no_grad()
def emulated_taps(clip, pixels: torch.Tensor, sites: set[str], blocks: set[int]) -> torch.Tensor:
    """Taps [N, blocks, width] with `sites` rounded to bf16 in `blocks` (fused-swish MLP)."""
    out = []
    for x in pixels.split(16):
        hidden = clip.pre_layrnorm(clip.embeddings(x))
        b, t, d = hidden.shape
        heads = clip.config.num_attention_heads
        taps = []
        for i, layer in enumerate(clip.encoder.layers):
            on = sites if i in blocks else set()

            def r(name, v, on=on):
                return _bf16(v) if name in on else v

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
    p.add_argument("--by", choices=("sites", "blocks"), default="sites")
    p.add_argument("--image-dir", default="/tmp/rine-bench-imgs")
    p.add_argument("--head", default=None, help="default: the official 2-class head from ../shared/fixtures")
    args = p.parse_args()

    from rine.config import PreprocessConfig
    from rine.data.images import load_image
    from rine.data.preprocess import preprocess
    from rine.model.accel import FastTapEncoder

    head_file = args.head or bench.default_trained_head("ViT-L/14")
    if not head_file:
        raise SystemExit("no trained head: pass --head model_2class_trainable.pth")
    head = bench.trained_head(head_file)
    backbone = bench.build_hf_backbone(bench.random_openai_state("ViT-L/14"))
    clip = backbone.clip
    paths = bench.make_images(Path(args.image_dir), args.n)
    pixels = torch.cat([preprocess(load_image(p), PreprocessConfig()) for p in paths])
    everywhere = set(range(clip.config.num_hidden_layers))
    exact = emulated_taps(clip, pixels, set(), everywhere)
    ref = head(exact).logits

    def report(name: str, taps: torch.Tensor) -> None:
        logits = head(taps).logits
        dp = (torch.sigmoid(logits) - torch.sigmoid(ref)).abs()
        dl = logits - ref
        rel = ((taps - exact).norm(dim=-1) / exact.norm(dim=-1)).mean(0)
        print(f"{name:<34} max|dp| {dp.max():.4f}  mean|dp| {dp.mean():.5f}  rms dlogit {dl.pow(2).mean().sqrt():.4f}"
              f"  tap rel err first/last {rel[0]:.1e}/{rel[-1]:.1e}", flush=True)  # fmt: skip

    print(f"# {len(paths)} images, head {Path(head_file).name}, ViT-L/14-shaped random encoder")
    with torch.no_grad():
        report("FastTapEncoder bf16 (the real one)", torch.cat([FastTapEncoder(backbone, "bf16")(x) for x in pixels.split(16)]))
    report("emulated: every site, every block", emulated_taps(clip, pixels, set(SITES), everywhere))
    if args.by == "sites":
        for site in SITES:
            report(f"emulated: all sites but {site}", emulated_taps(clip, pixels, set(SITES) - {site}, everywhere))
        outs = {"out_qkv", "out_out", "out_fc2"}
        report("emulated: fp32 GEMM outputs", emulated_taps(clip, pixels, set(SITES) - outs, everywhere))
    else:
        for g in range(0, len(everywhere), 4):
            group = set(range(g, g + 4))
            report(f"emulated: bf16 in blocks {g}-{g + 3} only", emulated_taps(clip, pixels, set(SITES), group))
        report("emulated: blocks 0-1 in fp32", emulated_taps(clip, pixels, set(SITES), everywhere - {0, 1}))


if __name__ == "__main__":
    main()
