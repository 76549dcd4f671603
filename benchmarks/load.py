"""Load test for `rine serve`: N concurrent clients on loopback for a bounded time.

Starts the server as a subprocess (a small random-weight backbone by default, or a
real checkpoint with --model / --backbone + --head), then each client loops sending a
mix of valid images, oversized uploads, non-images and truncated images. Prints
requests/s, latency percentiles, counts by status code, and the server's memory
(VmRSS sampled over the run, VmHWM = peak) to show whether it stays flat.

    python benchmarks/load.py                     # 64 clients, 20 s, tiny model
    python benchmarks/load.py --clients 128 --duration 60
    python benchmarks/load.py --model rine-vitl14-4class --duration 120

Target: no 5xx and no failed valid request at 64 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

KINDS = ("valid", "oversized", "not_image", "truncated")
EXPECTED = {"valid": {200}, "oversized": {413}, "not_image": {415}, "truncated": {422}}


def build_tiny_checkpoint(folder: Path, width: int, layers: int, patch: int) -> Path:
    """A random CLIP vision encoder + random RINE head saved like any checkpoint."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from rine.config import HeadConfig, RINEConfig
    from rine.model.checkpoints import save_pretrained
    from rine.model.head import RINEHead

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=max(1, width // 64), image_size=224, patch_size=patch,
                           projection_dim=width)
    CLIPVisionModel(cfg).save_pretrained(folder / "backbone")
    head_cfg = HeadConfig(in_dim=width, n_blocks=layers, nproj=2, proj_dim=64)
    config = RINEConfig(backbone=str(folder / "backbone"), head=head_cfg, name=f"bench-w{width}-l{layers}")
    save_pretrained(RINEHead(head_cfg), config, folder / "ckpt")
    return folder / "ckpt"


def make_payloads(max_file_bytes: int, seed: int = 0) -> dict[str, list[tuple[str, bytes]]]:
    rng = np.random.default_rng(seed)
    valid = []
    for i, (w, h, fmt) in enumerate([(256, 256, "JPEG"), (320, 240, "PNG"), (512, 384, "JPEG"), (224, 300, "WEBP")]):
        # smooth gradients + noise: compresses like a photo, not like pure noise
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt, quality=90) if fmt != "PNG" else Image.fromarray(arr).save(buf, format=fmt)
        valid.append((f"valid{i}.{fmt.lower()}", buf.getvalue()))
    oversized = [("huge.jpg", valid[0][1] + bytes(max_file_bytes))]  # a JPEG with trailing bytes
    not_image = [("notes.txt", b"this is not an image\n" * 50), ("random.bin", rng.bytes(4096))]
    truncated = [(name, data[: len(data) // 3]) for name, data in valid[:2]]
    return {"valid": valid, "oversized": oversized, "not_image": not_image, "truncated": truncated}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_mem_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


async def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.perf_counter()
    async with httpx.AsyncClient() as client:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                if (await client.get(f"{base}/readyz", timeout=2)).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("server not ready in time")


async def run_load(base: str, payloads, args, pid: int):
    weights = [float(w) for w in args.mix.split(",")]
    results: list[tuple[str, int | str, float]] = []  # kind, status or error name, seconds
    mem_samples: list[tuple[float, int]] = []
    server_ms: list[float] = []
    stop_at = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client_loop(i: int, client: httpx.AsyncClient):
        rnd = random.Random(i)
        while time.perf_counter() < stop_at:
            kind = rnd.choices(KINDS, weights)[0]
            name, data = rnd.choice(payloads[kind])
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{base}/v1/detect", files=[("files", (name, data))], timeout=args.request_timeout)
                outcome: int | str = r.status_code
                timing = r.headers.get("server-timing", "")
                if "dur=" in timing:
                    server_ms.append(float(timing.split("dur=", 1)[1].split(",")[0]))
            except httpx.HTTPError as e:
                outcome = type(e).__name__
            results.append((kind, outcome, time.perf_counter() - t0))

    async def sampler():
        t_start = time.perf_counter()
        while time.perf_counter() < stop_at:
            mem = read_mem_kb(pid)
            if "VmRSS" in mem:
                mem_samples.append((time.perf_counter() - t_start, mem["VmRSS"]))
            await asyncio.sleep(args.sample_every)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(sampler(), *(client_loop(i, client) for i in range(args.clients)))
    return results, mem_samples, server_ms, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def report(results, mem_samples, elapsed, warm_rss_kb, hwm_kb, server_stats, args) -> bool:
    by_status = Counter(str(s) for _, s, _ in results)
    by_kind = defaultdict(Counter)
    for kind, status, _ in results:
        by_kind[kind][str(status)] += 1
    lat = [t for _, _, t in results]
    lat_valid = [t for k, s, t in results if k == "valid" and s == 200]
    failed_valid = sum(1 for k, s, _ in results if k == "valid" and s != 200)
    five_xx = sum(1 for _, s, _ in results if isinstance(s, int) and s >= 500)
    transport = sum(1 for _, s, _ in results if not isinstance(s, int))
    unexpected = sum(1 for k, s, _ in results if s not in EXPECTED[k])
    print(f"clients: {args.clients}  duration: {elapsed:.1f} s  requests: {len(results)}")
    print(f"throughput: {len(results) / elapsed:.1f} req/s  ({len(lat_valid) / elapsed:.1f} images scored/s)")
    print(f"latency all:   p50 {1000 * pct(lat, 50):.0f} ms  p99 {1000 * pct(lat, 99):.0f} ms")
    print(f"latency valid: p50 {1000 * pct(lat_valid, 50):.0f} ms  p99 {1000 * pct(lat_valid, 99):.0f} ms")
    print("status counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())))
    for kind in KINDS:
        lk = [t for k, _, t in results if k == kind]
        print(f"  {kind:<10} " + ", ".join(f"{k}: {v}" for k, v in sorted(by_kind[kind].items()))
              + f"  (p50 {1000 * pct(lk, 50):.0f} ms, p99 {1000 * pct(lk, 99):.0f} ms)")
    print(f"5xx: {five_xx}  failed valid: {failed_valid}  transport errors: {transport}  unexpected status: {unexpected}")
    if server_stats:
        print("server batching: " + ", ".join(f"{k}={server_stats[k]}" for k in
                                             ("batches", "images", "mean_batch_views", "largest_batch_views", "rejected")))
    if mem_samples:
        n = len(mem_samples)
        quarters = [mem_samples[min(n - 1, int(q * (n - 1)))] for q in (0, 0.25, 0.5, 0.75, 1.0)]
        print("server RSS over the run (MiB): " + "  ".join(f"{t:.0f}s:{kb / 1024:.0f}" for t, kb in quarters))
        rss = [kb for _, kb in mem_samples]
        second_half = rss[n // 2 :]
        first_half = rss[: max(1, n // 2)]
        print(f"server RSS: warm {warm_rss_kb / 1024:.0f} MiB, max sampled {max(rss) / 1024:.0f} MiB, "
              f"mean 1st half {statistics.mean(first_half) / 1024:.0f} MiB, 2nd half {statistics.mean(second_half) / 1024:.0f} MiB")
    print(f"server peak memory (VmHWM): {hwm_kb / 1024:.0f} MiB")
    ok = five_xx == 0 and failed_valid == 0 and transport == 0
    print("target (no 5xx, no failed valid request): " + ("MET" if ok else "NOT MET"))
    return ok


def encoder_baseline(model_args: list[str], batch: int, seconds: float = 5.0) -> float:
    """Images/s of `Detector.score_views` alone on full batches, in this process: what
    batched inference gives without HTTP, decoding or queueing (a ceiling for the server)."""
    from rine.cli import build_parser
    from rine.cli.common import load_detector

    args = build_parser().parse_args(["serve", *model_args, "--device", "cpu"])
    detector = load_detector(args)
    size = detector.config.preprocess.image_size
    views = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    detector.score_views(views)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        detector.score_views(views)
        n += batch
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    p.add_argument("--mix", default="0.7,0.1,0.1,0.1", help="weights of valid,oversized,not_image,truncated")
    p.add_argument("--max-file-mb", type=float, default=2.0, help="server's --max-file-mb (oversized uploads exceed it)")
    p.add_argument("--model", help="a checkpoint folder or pretrained name instead of the tiny random model")
    p.add_argument("--backbone", help="with --head: a real backbone source")
    p.add_argument("--head", help="with --backbone: a head file or folder")
    p.add_argument("--width", type=int, default=128, help="tiny model: encoder width")
    p.add_argument("--layers", type=int, default=6, help="tiny model: encoder blocks")
    p.add_argument("--patch", type=int, default=32, help="tiny model: patch size")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for rine serve (repeatable)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--sample-every", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--json", metavar="FILE", help="also write the raw figures here")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip measuring the encoder alone (in this process) after the load")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rine-load-") as tmp:
        if args.head or args.backbone:
            model_args = ["--backbone", args.backbone, "--head", args.head]
        elif args.model:
            model_args = ["--model", args.model]
        else:
            t0 = time.perf_counter()
            ckpt = build_tiny_checkpoint(Path(tmp), args.width, args.layers, args.patch)
            model_args = ["--model", str(ckpt)]
            print(f"tiny random model: width {args.width}, {args.layers} blocks, patch {args.patch} "
                  f"(built in {time.perf_counter() - t0:.1f} s)")
        port = free_port()
        cmd = [sys.executable, "-m", "rine", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
               "--max-file-mb", str(args.max_file_mb), *model_args, *args.server_arg]
        log = open(Path(tmp) / "server.log", "w+b")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        base = f"http://127.0.0.1:{port}"
        try:
            ready_s = asyncio.run(wait_ready(base, proc, 600))
            print(f"server pid {proc.pid} ready in {ready_s:.1f} s: {' '.join(cmd[1:])}")
            payloads = make_payloads(int(args.max_file_mb * 1024 * 1024))
            # warm-up: one of each, so that first-call allocations are not counted as growth
            for kind in KINDS:
                for name, data in payloads[kind]:
                    httpx.post(f"{base}/v1/detect", files=[("files", (name, data))], timeout=60)
            warm = read_mem_kb(proc.pid).get("VmRSS", 0)
            results, mem, server_ms, elapsed = asyncio.run(run_load(base, payloads, args, proc.pid))
            stats = httpx.get(f"{base}/readyz", timeout=10).json()
            hwm = read_mem_kb(proc.pid).get("VmHWM", 0)
            ok = report(results, mem, elapsed, warm, hwm, stats, args)
            if server_ms:
                print(f"time inside the server (Server-Timing, decoded/scored requests): "
                      f"p50 {pct(server_ms, 50):.0f} ms  p99 {pct(server_ms, 99):.0f} ms")
            if not args.no_baseline:
                proc.terminate()  # the baseline should not share the CPU with an idle server
                proc.wait(10)
                batch = int(next((a.split("=", 1)[1] for a in args.server_arg if a.startswith("--max-batch=")), 32))
                ips = encoder_baseline(model_args, batch)
                print(f"encoder alone (score_views, batch {batch}, this process): {ips:.1f} images/s")
            if args.json:
                Path(args.json).write_text(json.dumps({
                    "clients": args.clients, "elapsed_s": elapsed, "requests": len(results),
                    "status": Counter(str(s) for _, s, _ in results), "rss_kb": mem, "hwm_kb": hwm,
                    "server": stats}, indent=1))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.returncode not in (0, -15, None):
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-3000:])
            log.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
