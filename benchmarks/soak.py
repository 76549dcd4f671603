"""Soak test for `rine serve` on loopback (127.0.0.1 only): a bounded run of mixed traffic
from many clients, then a SIGTERM with requests in flight.

Phase 1 (--duration seconds): each client loops over valid uploads (1 to 3 images),
oversized files, malformed requests (not an image, truncated image, broken multipart,
no `files` field, wrong content type) and slow uploads (a valid body trickled over
--slow-seconds). Reports failed valid requests (target 0), 5xx answers (target 0),
transport errors, and the server's resident memory over time (target: flat once warm).

Phase 2 (graceful stop under load): --sigterm-clients slow uploads are sent up to half
their body and held until the server counts them all in flight (/readyz); the server gets
SIGTERM, --sigterm-clients new requests are sent at once on fresh connections, and the held
bodies are finished. Targets: every upload in flight gets its 200 within the bound
(--stop-delay + --graceful-timeout); no new request is served (each gets 503 "stopping" while
the server still listens, for --stop-delay, or is refused or reset once it has stopped
listening); the server exits with status 0 within the bound (plus 5 s for process exit).

    python benchmarks/soak.py                          # 60 s, 32 clients, tiny random model
    python benchmarks/soak.py --duration 600 --clients 64
    python benchmarks/soak.py --model rine-vitl14-4class --duration 300

The tiny model is random (it is scored, not judged): what is measured is the service.
Exit status 0 when every target is met.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load import build_tiny_checkpoint, free_port, make_payloads, read_mem_kb, wait_ready  # noqa: E402

HOST = "127.0.0.1"  # loopback only, whatever the options
KINDS = ("valid", "oversized", "malformed", "slow")
BOUNDARY = b"rine-soak-boundary"


def multipart(files: list[tuple[str, bytes]], field: str = "files") -> bytes:
    parts = [b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"" + field.encode() + b"\"; filename=\""
             + name.encode() + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
             for name, data in files]
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


def request_head(length: int, content_type: bytes | None = None) -> bytes:
    ctype = content_type or b"multipart/form-data; boundary=" + BOUNDARY
    return (b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n")


async def raw_request(port: int, head: bytes, body: bytes, chunks: int = 1, pause: float = 0.0,
                      gate: asyncio.Event | None = None, timeout: float = 120.0) -> int | str:
    """Send one request over a fresh connection, the body in `chunks` pieces `pause` s apart
    (with `gate`: half of them, then wait for it, then the rest); its status code, or the
    name of what went wrong ("closed": the connection ended without a complete answer)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except (OSError, asyncio.TimeoutError) as e:
        return f"connect:{type(e).__name__}"
    try:
        writer.write(head)
        step = max(1, -(-len(body) // chunks))
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        for i, piece in enumerate(pieces):
            if gate is not None and i == len(pieces) // 2:
                await gate.wait()
            writer.write(piece)
            await writer.drain()
            if pause and i < len(pieces) - 1:
                await asyncio.sleep(pause)
        raw = await asyncio.wait_for(reader.read(), timeout)  # Connection: close -> read to the end
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        return type(e).__name__
    finally:
        writer.close()
    head_end = raw.find(b"\r\n\r\n")
    if not raw.startswith(b"HTTP/1.1 ") or head_end < 0:
        return "closed"
    status = int(raw[9:12])
    length = next((int(line.split(b":", 1)[1]) for line in raw[:head_end].split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    if length is not None and len(raw) - head_end - 4 < length:
        return "truncated answer"
    return status


def malformed_requests(payloads) -> list[tuple[str, bytes, bytes, set[int]]]:
    """(name, head, body, expected statuses) of requests a client may get wrong."""
    not_image = multipart(payloads["not_image"][:1])
    truncated = multipart(payloads["truncated"][:1])
    broken = multipart(payloads["valid"][:1])[:-40]  # the closing boundary cut off
    no_files = multipart(payloads["valid"][:1], field="image")
    wrong_type = b"just some bytes"
    return [
        ("not an image", request_head(len(not_image)), not_image, {415}),
        ("truncated image", request_head(len(truncated)), truncated, {422}),
        ("broken multipart", request_head(len(broken)), broken, {400, 422}),
        ("no files field", request_head(len(no_files)), no_files, {422}),
        ("wrong content type", request_head(len(wrong_type), b"text/plain"), wrong_type, {415}),
    ]


async def soak(port: int, pid: int, payloads, args) -> tuple[list, list]:
    """Phase 1: (results [(kind, what, expected, outcome)], memory samples [(s, kB)])."""
    valid, oversized = payloads["valid"], payloads["oversized"]
    malformed = malformed_requests(payloads)
    weights = [float(w) for w in args.mix.split(",")]
    results: list[tuple[str, str, set[int], int | str]] = []
    memory: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    stop_at = t0 + args.duration

    async def client(i: int) -> None:
        rnd = random.Random(args.seed * 1000 + i)
        while time.perf_counter() < stop_at:
            kind = rnd.choices(KINDS, weights)[0]
            chunks, pause = 1, 0.0
            if kind in ("valid", "slow"):
                body = multipart(rnd.sample(valid, rnd.randint(1, 3)))
                what, head, expected = f"{kind} upload", request_head(len(body)), {200}
                if kind == "slow":
                    chunks, pause = 8, args.slow_seconds / 7
            elif kind == "oversized":
                body = multipart(oversized)
                what, head, expected = "oversized file", request_head(len(body)), {413}
            else:
                what, head, body, expected = rnd.choice(malformed)
            outcome = await raw_request(port, head, body, chunks, pause, timeout=args.request_timeout)
            results.append((kind, what, expected, outcome))

    async def sampler() -> None:
        while time.perf_counter() < stop_at:
            rss = read_mem_kb(pid).get("VmRSS")
            if rss:
                memory.append((time.perf_counter() - t0, rss))
            await asyncio.sleep(args.sample_every)

    await asyncio.gather(sampler(), *(client(i) for i in range(args.clients)))
    return results, memory


def report_soak(results, memory, warm_kb: int, args) -> bool:
    n = len(results)
    by_kind: dict[str, Counter] = {k: Counter() for k in KINDS}
    for kind, _, _, outcome in results:
        by_kind[kind][str(outcome)] += 1
    failed_valid = sum(1 for k, _, _, o in results if k in ("valid", "slow") and o != 200)
    five_xx = sum(1 for *_, o in results if isinstance(o, int) and o >= 500)
    transport = sum(1 for *_, o in results if not isinstance(o, int))
    unexpected = Counter(f"{what} -> {o}" for _, what, expected, o in results if o not in expected)
    print(f"phase 1: {args.clients} clients, {args.duration:g} s, {n} requests ({n / args.duration:.1f}/s)")
    for kind in KINDS:
        print(f"  {kind:<10} " + ", ".join(f"{k}: {v}" for k, v in sorted(by_kind[kind].items())))
    print(f"  failed valid requests: {failed_valid}   5xx: {five_xx}   transport errors: {transport}")
    if unexpected:
        print("  unexpected answers: " + ", ".join(f"{k} ({v})" for k, v in unexpected.most_common(8)))
    flat = True
    if len(memory) >= 8:
        # Flat: the last quarter's median RSS is within --memory-tolerance of the second quarter's
        # (the first quarter is the allocator warming up under load).
        q = len(memory) // 4
        ref = statistics.median(kb for _, kb in memory[q : 2 * q])
        last = statistics.median(kb for _, kb in memory[3 * q :])
        growth = (last - ref) / ref
        flat = growth <= args.memory_tolerance
        marks = [memory[min(len(memory) - 1, int(f * (len(memory) - 1)))] for f in (0, 0.25, 0.5, 0.75, 1)]
        print("  server RSS (MiB) over time: " + "  ".join(f"{t:.0f}s:{kb / 1024:.0f}" for t, kb in marks))
        print(f"  RSS warm {warm_kb / 1024:.0f} MiB; median 2nd quarter {ref / 1024:.0f}, last quarter "
              f"{last / 1024:.0f} MiB: growth {100 * growth:+.1f}% (flat if <= {100 * args.memory_tolerance:g}%)")
    else:
        print("  too few memory samples to judge growth (run longer)")
    ok = failed_valid == 0 and five_xx == 0 and transport == 0 and flat
    print("phase 1 targets (0 failed valid, 0 5xx, 0 transport errors, flat memory): " + ("MET" if ok else "NOT MET"))
    return ok


async def sigterm_in_flight(port: int, proc: subprocess.Popen, payloads, args) -> tuple[list, list, float]:
    """Phase 2: (outcomes of the uploads in flight at SIGTERM, outcomes of the new requests sent
    after it, seconds from SIGTERM to the last in-flight answer)."""
    gate = asyncio.Event()
    body = multipart(payloads["valid"][:2])
    answered_at: list[float] = []

    async def held() -> int | str:
        outcome = await raw_request(port, request_head(len(body)), body, chunks=6, gate=gate,
                                    timeout=args.request_timeout)
        answered_at.append(time.perf_counter())
        return outcome

    tasks = [asyncio.create_task(held()) for _ in range(args.sigterm_clients)]
    async with httpx.AsyncClient() as client:
        deadline = time.perf_counter() + 60
        while (await client.get(f"http://{HOST}:{port}/readyz", timeout=10)).json().get("in_flight", 0) \
                < args.sigterm_clients:
            if time.perf_counter() > deadline:
                raise SystemExit("phase 2: the uploads never were all in flight")
            await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    t_signal = time.perf_counter()
    fresh = [asyncio.create_task(raw_request(port, request_head(len(body)), body, timeout=args.request_timeout))
             for _ in range(args.sigterm_clients)]
    await asyncio.sleep(0.5)  # the server has begun shutting down with the bodies half sent
    gate.set()
    in_flight = await asyncio.gather(*tasks)
    return in_flight, await asyncio.gather(*fresh), max(answered_at, default=t_signal) - t_signal


def report_sigterm(in_flight: list, fresh: list, last_answer_s: float, proc: subprocess.Popen, args) -> bool:
    """Phase 2's figures and targets; waits for the server to exit."""
    t0 = time.perf_counter()
    try:
        code: int | str = proc.wait(args.stop_delay + args.graceful_timeout + 30)
    except subprocess.TimeoutExpired:
        code = f"still running after {args.stop_delay + args.graceful_timeout + 30:g} s"
    exit_s = last_answer_s + (time.perf_counter() - t0)  # from SIGTERM, about (the wait began after the answers)
    bound = args.stop_delay + args.graceful_timeout
    served_new = sum(1 for o in fresh if o == 200)
    refused_new = Counter("503" if o == 503 else "refused" if str(o).startswith("connect:") else str(o) for o in fresh)
    finished = all(o == 200 for o in in_flight) and last_answer_s <= bound
    print(f"phase 2: SIGTERM with {len(in_flight)} uploads in flight: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(Counter(str(o) for o in in_flight).items()))
          + f", the last answered {last_answer_s:.2f} s after SIGTERM (bound {bound:g} s)")
    print(f"  {len(fresh)} new requests sent after SIGTERM: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(refused_new.items())))
    print(f"  server exit status {code}, {exit_s:.2f} s after SIGTERM")
    good = finished and served_new == 0 and code == 0 and exit_s <= bound + 5
    print("phase 2 targets (in-flight uploads answered 200 within the bound, no new request served, "
          "exit status 0): " + ("MET" if good else "NOT MET"))
    return good


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of phase 1 (default 60)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients in phase 1 (default 32)")
    p.add_argument("--mix", default="0.55,0.1,0.2,0.15", help="weights of valid,oversized,malformed,slow")
    p.add_argument("--slow-seconds", type=float, default=2.0, help="how long a slow upload takes to send")
    p.add_argument("--sigterm-clients", type=int, default=8,
                   help="uploads in flight at SIGTERM, and new requests sent after it (0: skip phase 2)")
    p.add_argument("--graceful-timeout", type=float, default=10.0,
                   help="the server's --graceful-timeout: the bound on finishing the requests in flight")
    p.add_argument("--stop-delay", type=float, default=1.0,
                   help="the server's --stop-delay: how long it answers new requests 503 before it stops listening")
    p.add_argument("--memory-tolerance", type=float, default=0.05, help="RSS growth still called flat (0.05 = 5%%)")
    p.add_argument("--max-file-mb", type=float, default=2.0, help="server's --max-file-mb (oversized files exceed it)")
    p.add_argument("--model", help="a checkpoint folder or pretrained name instead of the tiny random model")
    p.add_argument("--width", type=int, default=64, help="tiny model: encoder width")
    p.add_argument("--layers", type=int, default=3, help="tiny model: encoder blocks")
    p.add_argument("--patch", type=int, default=32, help="tiny model: patch size")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for rine serve (repeatable)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--sample-every", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rine-soak-") as tmp:
        if args.model:
            model_args = ["--model", args.model]
        else:
            model_args = ["--model", str(build_tiny_checkpoint(Path(tmp), args.width, args.layers, args.patch))]
        port = free_port()
        cmd = [sys.executable, "-m", "rine", "serve", "--host", HOST, "--port", str(port), "--no-access-log",
               "--max-file-mb", str(args.max_file_mb), "--graceful-timeout", str(args.graceful_timeout),
               "--stop-delay", str(args.stop_delay),
               *model_args, *args.server_arg]
        log = open(Path(tmp) / "server.log", "w+b")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        ok = False
        try:
            ready = asyncio.run(wait_ready(f"http://{HOST}:{port}", proc, 600))
            print(f"server pid {proc.pid} ready in {ready:.1f} s: {' '.join(cmd[1:])}")
            payloads = make_payloads(int(args.max_file_mb * 1024 * 1024))
            for name, data in payloads["valid"]:  # warm-up: first-call allocations are not growth
                httpx.post(f"http://{HOST}:{port}/v1/detect", files=[("files", (name, data))], timeout=60)
            warm = read_mem_kb(proc.pid).get("VmRSS", 0)
            results, memory = asyncio.run(soak(port, proc.pid, payloads, args))
            ok = report_soak(results, memory, warm, args)
            if args.sigterm_clients:
                ok = report_sigterm(*asyncio.run(sigterm_in_flight(port, proc, payloads, args)), proc, args) and ok
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.seek(0)
            text = log.read().decode(errors="replace")
            if not ok:
                sys.stderr.write(text[-3000:])
            else:  # how the shutdown went (with --server-arg=-v: uvicorn's own lines too)
                print("\n".join(line for line in text.splitlines() if any(
                    w in line for w in ("shutdown", "Shutting", "Waiting", "Cancel", "stopped", "Finished"))))
            log.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
