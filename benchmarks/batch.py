"""`rine detect` against `rine batch` (a local Ray) on the same images, in one run.

    python benchmarks/batch.py                          # ViT-B/32, 200 images, CPU (~15 min on 2 cores)
    python benchmarks/batch.py --quick                  # smoke run: a tiny model, 24 images
    python benchmarks/batch.py --device cuda --arch ViT-L/14 --images 2000   # a GPU host

Random-weight encoders of the real shapes (no download) and throughput.py's photo-like
JPEG/PNG mix (256-2048 px). Each command runs as a subprocess, end to end from the files
(model loading and, for rine batch, starting the local Ray included). Peak memory is the
largest sum of proportional set size (PSS: a shared page counts once in all) over the
command's whole process tree, sampled every 0.2 s (Ray's raylet, object store and workers
included). Then `rine batch` again on an input list 10x as long (the same files listed ten
times: distinct inputs to the job) to show that memory does not grow with the number of
inputs (the target: at most 1.2x the 1x run). Ray's memory grows with the number of tasks
running at once (a worker process per decoding slot), up to the CPU count: the 1x run must
have more decoding tasks than CPUs for the comparison to be about the list (200 images at
32 per task do, as do 48 images with --decode-batch 8; --quick uses 4 per task).

With `--device cuda`: one GPU actor, decoding spread over every host CPU, against
`rine detect --device cuda` (decoding in worker processes), same precision.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import SHAPES, build_hf_backbone, make_images, random_head, random_openai_state  # noqa: E402

SHAPES = {**SHAPES, "tiny": (64, 3, 32, 224, 32)}


def build_checkpoint(folder: Path, arch: str) -> Path:
    """A checkpoint folder (config.json + model.safetensors) on a random backbone of `arch`'s shape."""
    import throughput

    from rine.config import HeadConfig, RINEConfig
    from rine.model.checkpoints import save_pretrained

    if (folder / "config.json").is_file():
        return folder
    throughput.SHAPES.setdefault("tiny", SHAPES["tiny"])
    backbone = build_hf_backbone(random_openai_state(arch))
    backbone.clip.save_pretrained(folder / "backbone")
    head = random_head(arch)
    width, layers = SHAPES[arch][:2]
    config = RINEConfig(backbone=str((folder / "backbone").resolve()), head=HeadConfig(in_dim=width, n_blocks=layers,
                        nproj=4, proj_dim=128), name=f"bench-{arch}")
    save_pretrained(head, config, folder)
    return folder


def _tree(root: int, marker: str | None) -> list[int]:
    """`root` and its descendants, plus processes naming `marker` (a Ray session folder)."""
    parents: dict[int, int] = {}
    named = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            if marker and marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                named.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = {root}, [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in found]
        found.update(kids)
        todo += kids
    return sorted(found | set(named))


def _pss_mb(pids: list[int]) -> float:
    """Proportional set size summed over `pids`: a page shared by k processes counts 1/k in
    each (RSS would count the torch libraries of every Ray worker again)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


def run_measured(cmd: list[str], marker: str | None = None) -> dict:
    """Run `cmd`; its wall time and the peak RSS of its process tree."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _pss_mb(_tree(proc.pid, marker)))
        time.sleep(0.2)
    err = proc.stderr.read().decode(errors="replace")
    wall = time.monotonic() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": wall, "peak_mb": peak, "stderr_tail": err.strip().splitlines()[-2:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(SHAPES), default="ViT-B/32")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny model, 24 images")
    ap.add_argument("--work", default=None, help="folder for images and models (default: a temp folder)")
    ap.add_argument("--skip-10x", action="store_true", help="no 10x-longer list run")
    ap.add_argument("--decode-batch", type=int, default=None,
                    help="images per decoding task (rine batch's default 32; --quick: 4); the 1x run needs more tasks "
                    "than decoding slots for the 10x comparison to be about the list")
    args = ap.parse_args()
    if args.quick:
        args.arch, args.images = "tiny", 24
    decode_batch = args.decode_batch or (4 if args.quick else None)
    extra = ["--decode-batch", str(decode_batch)] if decode_batch else []
    work = Path(args.work or tempfile.mkdtemp(prefix="rine-batch-bench-"))
    images = make_images(work / "images", args.images)
    ckpt = build_checkpoint(work / f"ckpt-{args.arch.replace('/', '-')}", args.arch)
    rine = [sys.executable, "-m", "rine"]
    model = ["--model", str(ckpt), "--precision", args.precision, "--device", args.device]
    results = {}

    detect_out = work / "detect.jsonl"
    results["rine detect"] = run_measured([*rine, "detect", str(work / "images"), "-o", str(detect_out), "--no-progress", *model])

    def batch(name: str, inputs: list[str], n: int) -> None:
        out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
        temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
        try:
            r = run_measured([*rine, "batch", *inputs, "--out", str(out), "--temp-dir", temp, "--no-progress", *model,
                              *extra], temp)
        finally:
            shutil.rmtree(temp, ignore_errors=True)  # the local Ray's session folder
        r["n"] = n
        results[name] = r

    batch("rine batch", [str(work / "images")], len(images))
    if not args.skip_10x:
        manifest = work / "list-10x.csv"
        manifest.write_text("path\n" + "".join(f"{p}\n" for _ in range(10) for p in images))
        batch("rine batch, 10x list", [str(manifest)], 10 * len(images))

    base = len(images) / results["rine detect"]["seconds"]
    print(f"\n{args.arch}, {len(images)} images, device {args.device}, precision {args.precision}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'mode':<24} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs detect':>9} {'peak MB':>8}")
    for name, r in results.items():
        n = r.get("n", len(images))
        ips = n / r["seconds"]
        print(f"{name:<24} {n:>7} {r['seconds']:>8.1f} {ips:>9.2f} {ips / base:>8.2f}x {r['peak_mb']:>8.0f}")
    if "rine batch, 10x list" in results:
        ratio = results["rine batch, 10x list"]["peak_mb"] / results["rine batch"]["peak_mb"]
        print(f"peak memory, 10x list / 1x list: {ratio:.2f} (target <= 1.2)")
    print("(wall time end to end: model loading and the local Ray's start are included)")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "stderr_tail"} for k, v in results.items()}))


if __name__ == "__main__":
    main()
