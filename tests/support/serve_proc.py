"""`python -m rine serve` in a child process for end-to-end tests, on a port it picks itself.

`--port 0` makes the server bind a free port and print it ("serving on http://127.0.0.1:N"):
a port found free here and closed before the child binds it could be taken meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll `base`/readyz until it answers 200; fail with the child's stderr (a pipe) if it
    exits first, or after `timeout_s` (a liveness bound, not a speed check)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.1)


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path, ready_s: float = 180) -> Iterator[str]:
    """Start `rine serve --host 127.0.0.1 --port 0 ARGS`, wait until /readyz answers 200, yield
    its base URL; the server is stopped on exit. `ready_s` is a liveness bound (a loaded
    2-core machine takes its time), not a speed check."""
    import httpx

    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rine", "serve", "--host", "127.0.0.1", "--port", "0", *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = None
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"rine serve exited with {proc.returncode}:\n{log_path.read_text()}")
            if base is None:
                found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", log_path.read_text())
                base = found.group(1) if found else None
            try:
                if base is not None and httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"rine serve did not become ready in {ready_s:g} s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
