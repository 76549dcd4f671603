"""Schemathesis against the schema `rine serve` serves (issue 27): a bounded run that must end green.

The server is a real `rine serve` on loopback with a tiny random model and an API key (so that
the key's 401s are part of the contract tested); the run is bounded in examples and seconds.
What the schema cannot say (an `image/*` part may hold any bytes; the server judges images by
content) is stated in tests/data/schemathesis.toml.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.serve_proc import running_server

pytest.importorskip("schemathesis")
pytest.importorskip("prometheus_client")

CONFIG = Path(__file__).parent / "data" / "schemathesis.toml"


@pytest.mark.slow
def test_schemathesis_finds_nothing_in_the_served_schema(tiny_checkpoint_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RINE_TEST_API_KEY", "st-key-0123456789")
    cli = shutil.which("schemathesis") or shutil.which("st")
    command = [cli] if cli else [sys.executable, "-m", "schemathesis.cli"]
    args = ["--model", str(tiny_checkpoint_dir), "--api-key-env", "RINE_TEST_API_KEY", "--threads", "1"]
    with running_server(args, tmp_path / "serve.log") as base:
        run = subprocess.run(
            [*command, "--config-file", str(CONFIG), "run", f"{base}/openapi.json",
             "-H", "X-API-Key: st-key-0123456789", "--max-examples", "12", "--max-time", "25", "--seed", "27",
             "--workers", "1", "--request-timeout", "30", "--report", "junit",
             "--report-dir", str(tmp_path / "report")],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,  # its example database goes there
        )
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary
    assert "generated" in summary and "Tested: 6" in summary, summary  # it ran, on every operation
