"""--stability in `rine serve` (the form field, the page's checkbox) and `rine batch`: the
records `rine detect --stability` gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from rine.data.reencode import (
    DEFAULT_CONDITIONS,
)

from support.stability import pillow_file


@pytest.mark.parametrize("crop", ["center", "ten"])
def test_rine_serve_form_field_stability(photo_checkpoint, stability_inputs, crop, tmp_path):
    """POST /v1/detect with stability=true: each record gains the conditions `rine detect` gives
    the Pillow-written files, a verdict and a threshold; without the field the answer is what
    it was (no key added); a bad value is a 400. Ten-crop: 50 views per image, more than a
    batch, still scored."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rine.inference.detector import Detector
    from rine.server.app import create_app

    det = Detector.from_pretrained(str(photo_checkpoint), device="cpu", precision="fp32", crop=crop)
    names = ("jpeg", "grey", "small")
    files = [("files", (f"{n}.img", stability_inputs[n].read_bytes(), "application/octet-stream")) for n in names]
    with TestClient(create_app(det)) as client:
        plain = client.post("/v1/detect", files=files)
        off = client.post("/v1/detect", files=files, data={"stability": "false"})
        on = client.post("/v1/detect", files=files, data={"stability": "true"})
        bad = [client.post("/v1/detect", files=files, data={"stability": v}) for v in ("maybe", "1", "")]
    assert plain.status_code == off.status_code == on.status_code == 200
    assert all(b.status_code == 400 and "stability" in b.json()["detail"] for b in bad)
    assert off.json()["results"] == plain.json()["results"]
    assert all("stability" not in r and "threshold" not in r for r in plain.json()["results"])
    for n, rec, old in zip(names, on.json()["results"], plain.json()["results"], strict=True):
        assert rec["logit"] == pytest.approx(old["logit"], abs=1e-5)
        assert rec["block_importance"] == pytest.approx(old["block_importance"], abs=1e-5)
        st = rec["stability"]
        expected = det.predict([pillow_file(stability_inputs[n], c, tmp_path) for c in DEFAULT_CONDITIONS])
        for c, p in zip(DEFAULT_CONDITIONS, expected, strict=True):
            assert st["conditions"][c] == pytest.approx(p.prob_fake, abs=1e-5), (n, c)
        flipped = [c for c, p in zip(DEFAULT_CONDITIONS, expected, strict=True) if p.is_fake != old["is_fake"]]
        assert st["flipped"] == flipped and st["flips"] == len(flipped)
        assert rec["threshold"] == 0.5
        assert rec["verdict"] == ("uncertain" if flipped else old["verdict"])


@pytest.mark.slow
@pytest.mark.browser
def test_page_checkbox_says_the_reason_in_words(flippy_checkpoint, stability_inputs, tmp_path):
    """`rine serve` with a head cut among one image's re-encodings: with the box ticked the page
    shows "Uncertain: an ordinary re-save would change this answer" and the API's reason as a
    sentence; unticked, the card is as before (no stability line)."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium not found: install Debian's chromium (scripts/setup.sh --dev does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from support.serve_proc import running_server

    image = stability_inputs["jpeg"]
    with running_server(["--model", str(flippy_checkpoint), "--device", "cpu", "--no-access-log"],
                        tmp_path / "server.log") as base:
        api = httpx.post(f"{base}/v1/detect", files=[("files", (image.name, image.read_bytes()))],
                         data={"stability": "true"}, timeout=60).json()["results"][0]
        assert api["stability"]["flips"] > 0 and api["verdict"] == "uncertain"
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            try:
                page = browser.new_page(bypass_csp=True)
                page.goto(base + "/")
                page.wait_for_function("document.querySelector('#model').textContent.startsWith('Model ')")
                page.set_input_files("#file-input", [str(image)])
                page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 1", timeout=60_000)
                assert page.query_selector(".card .stability").is_hidden()
                page.check("#stability")
                page.set_input_files("#file-input", [str(image)])
                page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 2", timeout=60_000)
                card = page.query_selector_all(".card")[1]
                assert card.query_selector(".verdict").inner_text() == "Uncertain: an ordinary re-save would change this answer"
                line = card.query_selector(".stability").inner_text()
                reason = api["stability"]["reason"]
                assert line.startswith(reason[0].upper() + reason[1:] + ".")
                assert "treat this answer as uncertain" in line
            finally:
                browser.close()


@pytest.mark.slow
def test_rine_batch_stability_records_equal_detect(flippy_checkpoint, stability_inputs, tmp_path, monkeypatch):
    """`rine batch --stability` (Ray Data; re-encoding in the decoding tasks): each record's
    threshold, verdict, flips, reason and per-condition probabilities are those of
    `rine detect --stability`; an error file stays one error record; a job keeps its choice."""
    pytest.importorskip("ray")
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    from rine.cluster.batch import run_batch
    from rine.cluster.job import BatchConfig, BatchError
    from rine.data.decoding import DecodeOptions
    from rine.inference.detector import Detector

    here = Path(__file__).resolve().parent  # the local Ray's workers import this checkout's rine
    monkeypatch.setenv("PYTHONPATH", f"{here.parent / 'src'}:{here}")

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("jpeg", "small", "grey", "webp"):
        shutil.copy(stability_inputs[name], folder / stability_inputs[name].name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    cfg = BatchConfig(inputs=[str(folder)], out=str(out), model=str(flippy_checkpoint), precision="fp32",
                      stability=True, shard_size=4, batch_size=3, decode_batch=2, address="local",
                      progress=False, temp_dir=tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    try:
        result = run_batch(cfg)
        with pytest.raises(BatchError, match="stability"):  # a job keeps the choice it started with
            run_batch(BatchConfig(**{**cfg.__dict__, "stability": False}))
    finally:
        shutil.rmtree(cfg.temp_dir, ignore_errors=True)
    assert result.error is None and result.exit_code == 1  # the broken file's error record
    rows = {r["path"]: r for part in sorted(out.glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()}
    det = Detector.from_pretrained(str(flippy_checkpoint), device="cpu", precision="fp32")
    expected = det.predict(sorted(rows), stability=True, decode=DecodeOptions(decoder="threads"))
    assert sum(p.error is None for p in expected) == 4
    for p in expected:
        r = rows[p.path]
        assert r["error"] == p.error
        if p.error is not None:
            assert r["verdict"] is None and r["stability_flips"] is None
            continue
        assert abs(r["logit"] - p.logit) < 1e-5 and r["verdict"] == p.verdict and r["threshold"] == p.threshold
        assert r["stability_flips"] == p.stability["flips"] and r["stability_reason"] == p.stability["reason"]
        assert r["stability_spread"] == pytest.approx(p.stability["spread"], abs=1e-5)
        for c, prob in p.stability["conditions"].items():
            assert r[f"stability_{c}"] == pytest.approx(prob, abs=1e-5)
    assert any(rows[p.path]["verdict"] == "uncertain" for p in expected if p.error is None)
