"""`rine provenance`: the evidence alone, with no model and no torch (checked in a fresh
subprocess, since this test process has torch loaded), folders recursed like `rine detect`,
trust anchors from the option or $RINE_TRUST_ANCHORS, errors that name the file."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rine.cli import main

from support import provenance_files as pf

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    ca = pf.make_authority()
    img = pf.texture(128, 4)
    (root / "anchors.pem").write_bytes(ca.root_pem)
    (root / "signed.jpg").write_bytes(pf.sign(pf.encode(img, "JPEG", quality=90), "image/jpeg", ca, "digitalCapture"))
    (root / "sub").mkdir()
    (root / "sub" / "a1111.png").write_bytes(pf.png_with_text(img, [("tEXt", "parameters", pf.A1111_PARAMETERS)]))
    (root / "sub" / "plain.webp").write_bytes(pf.encode(img, "WEBP"))
    (root / "sub" / "bomb.png").write_bytes(pf.insert_png_chunks(pf.encode(img, "PNG"), [
        pf.png_chunk(b"zTXt", b"prompt\x00\x00" + __import__("zlib").compress(b"x" * (50 << 20)))]))
    return root


def _jsonl(text: str) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, text.splitlines())}


def test_folder_recursion_and_trust_in_a_subprocess_without_torch(files):
    code = ("import sys; from rine.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'; sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(SRC), "RINE_TRUST_ANCHORS": str(files / "anchors.pem")}
    out = subprocess.run([sys.executable, "-c", code, "provenance", "--format", "jsonl", str(files)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    records = _jsonl(out.stdout)
    assert set(records) == {"signed.jpg", "a1111.png", "plain.webp", "bomb.png"}
    signed = records["signed.jpg"]["provenance"]
    assert (signed["digital_source_type"], signed["verified"]) == ("digitalCapture", True)
    assert records["a1111.png"]["provenance"]["digital_source_type"] == "trainedAlgorithmicMedia"
    assert records["plain.webp"]["provenance"]["signals"] == []
    assert "compression bomb" in records["bomb.png"]["provenance"]["signals"][0]["error"]


def test_option_overrides_env_and_no_anchors_means_unverified(files, capsys, monkeypatch):
    monkeypatch.delenv("RINE_TRUST_ANCHORS", raising=False)
    assert main(["provenance", "--format", "jsonl", str(files / "signed.jpg")]) == 0
    p = _jsonl(capsys.readouterr().out)["signed.jpg"]["provenance"]
    assert p["verified"] is False and "no trust anchors configured" in p["reason"]
    monkeypatch.setenv("RINE_TRUST_ANCHORS", str(files / "missing.pem"))
    assert main(["provenance", "--trust-anchors", str(files / "anchors.pem"), "--format", "jsonl",
                 str(files / "signed.jpg")]) == 0
    assert _jsonl(capsys.readouterr().out)["signed.jpg"]["provenance"]["verified"] is True


def test_bad_anchors_and_missing_files(files, capsys, tmp_path):
    (tmp_path / "x.pem").write_text("not a certificate")
    assert main(["provenance", "--trust-anchors", str(tmp_path / "x.pem"), str(files)]) == 2
    assert "x.pem holds no PEM certificate" in capsys.readouterr().err
    assert main(["provenance", "--format", "jsonl", str(files / "nope.png"), str(files / "signed.jpg")]) == 1
    captured = capsys.readouterr()
    assert _jsonl(captured.out)["nope.png"]["error"] == "no such file" and "1 file could not be read" in captured.err


def test_csv_and_table(files, capsys, tmp_path):
    out = tmp_path / "evidence.csv"
    assert main(["provenance", "-o", str(out), "--trust-anchors", str(files / "anchors.pem"), str(files)]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(out.read_text()))}
    assert rows["signed.jpg"]["provenance_verified"] == "True" and rows["signed.jpg"]["provenance_source_type"] == "digitalCapture"
    assert rows["a1111.png"]["provenance_signals"] == "png-text:png:parameters"
    assert main(["provenance", "--format", "table", str(files / "sub" / "plain.webp")]) == 0
    assert "absence proves nothing" in capsys.readouterr().out


def test_batch_refuses_bad_anchors_before_starting_ray(files, capsys, tmp_path, monkeypatch):
    """`rine batch` checks the anchors (the option, else $RINE_TRUST_ANCHORS) up front: exit 2
    naming the file and the option, no output folder job started; --no-provenance skips them."""
    pytest.importorskip("ray")
    import rine.cluster.batch

    started = []
    monkeypatch.setattr(rine.cluster.batch, "run_batch", lambda cfg: started.append(cfg) or pytest.fail("ran"))
    (tmp_path / "x.pem").write_text("not a certificate")
    monkeypatch.setenv("RINE_TRUST_ANCHORS", str(tmp_path / "x.pem"))
    assert main(["batch", str(files / "signed.jpg"), "--out", str(tmp_path / "out"), "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "x.pem holds no PEM certificate" in err and "--trust-anchors or $RINE_TRUST_ANCHORS" in err and not started
    monkeypatch.setattr(rine.cluster.batch, "run_batch", lambda cfg: started.append(cfg) or _Done())
    assert main(["batch", str(files / "signed.jpg"), "--out", str(tmp_path / "out"), "--model", "m",
                 "--no-provenance"]) == 0
    assert started[0].provenance is False


class _Done:
    """A finished `run_batch` result for the CLI's summary lines."""

    error, skipped_shards, written, seconds, images_per_s, exit_code = None, 0, 0, 0.0, 0.0, 0

    class reconciliation:  # noqa: N801 - stands in for an attribute
        n_inputs = scored = errors = 0
        missing: list = []
        complete = True
