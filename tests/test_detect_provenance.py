"""`rine detect` records carry what each file declares (`provenance`) and the combined
`decision`, CSV its flat columns; the detector's own fields are the same with and without."""

from __future__ import annotations

import csv
import io
import json

import pytest

from rine.cli import main

from support import provenance_files as pf

pytest.importorskip("c2pa")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect-prov")
    ca = pf.make_authority()
    img = pf.texture(240, 8)
    (root / "anchors.pem").write_bytes(ca.root_pem)
    (root / "signed.jpg").write_bytes(pf.sign(pf.encode(img, "JPEG", quality=90), "image/jpeg", ca, "trainedAlgorithmicMedia"))
    (root / "a1111.png").write_bytes(pf.png_with_text(img, [("tEXt", "parameters", pf.A1111_PARAMETERS)]))
    (root / "plain.png").write_bytes(pf.encode(img, "PNG"))
    return root


def _run(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_records_carry_provenance_and_decision(capsys, files, tiny_checkpoint_dir):
    names = [str(files / n) for n in ("signed.jpg", "a1111.png", "plain.png")]
    model = ("--model", str(tiny_checkpoint_dir), "--no-progress", "--format", "jsonl")
    bare = [json.loads(x) for x in _run(capsys, "detect", *names, *model, "--no-provenance").splitlines()]
    full = [json.loads(x) for x in _run(capsys, "detect", *names, *model, "--trust-anchors", str(files / "anchors.pem")).splitlines()]
    for b, f in zip(bare, full, strict=True):
        assert "provenance" not in b and "decision" not in b
        assert {k: f[k] for k in b} == b  # the detector's fields, unchanged
    signed, a1111, plain = full
    assert signed["provenance"]["verified"] is True and signed["decision"]["decision"] == "synthetic"
    assert signed["decision"]["basis"].startswith("verified C2PA declaration")
    detector_says = "synthetic" if a1111["is_fake"] else "real"
    assert a1111["provenance"]["digital_source_type"] == "trainedAlgorithmicMedia" and not a1111["provenance"]["verified"]
    assert a1111["decision"]["decision"] == detector_says and "unverified declaration" in a1111["decision"]["basis"]
    assert plain["provenance"]["digital_source_type"] is None and plain["decision"]["basis"] == "detector"


def test_csv_columns_and_no_anchors(capsys, files, tiny_checkpoint_dir, monkeypatch):
    monkeypatch.delenv("RINE_TRUST_ANCHORS", raising=False)
    out = _run(capsys, "detect", str(files / "signed.jpg"), "--model", str(tiny_checkpoint_dir), "--no-progress", "--format", "csv")
    (row,) = csv.DictReader(io.StringIO(out))
    assert row["provenance_source_type"] == "trainedAlgorithmicMedia" and row["provenance_verified"] == "False"
    assert "no trust anchors configured" in row["provenance_reason"]
    assert row["decision"] == ("synthetic" if row["is_fake"] == "True" else "real")  # the detector's verdict stands


def test_bad_trust_anchors_is_a_usage_error(capsys, files, tiny_checkpoint_dir, tmp_path):
    (tmp_path / "x.pem").write_text("nope")
    assert main(["detect", str(files / "plain.png"), "--model", str(tiny_checkpoint_dir), "--trust-anchors", str(tmp_path / "x.pem")]) == 2
    assert "x.pem holds no PEM certificate" in capsys.readouterr().err
