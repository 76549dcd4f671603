"""End to end: `rine serve` in a subprocess, the web page driven by headless Chromium.

Skips when Debian's chromium or Playwright for Python is missing (CI installs both
through scripts/setup.sh --dev).
"""

from __future__ import annotations

import csv
import os
import re
import shutil

import pytest

from conftest import OFFICIAL
from support.browser import CHROMIUM, CHROMIUM_ARGS
from support.serve_proc import running_server

DEMO_IMAGES = ("real_aadlygmazf.jpg", "fake_dalle_zzrybysskm.png")

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture
def server(tiny_checkpoint_dir, tmp_path):
    """`python -m rine serve` on a free loopback port; yields its base URL once ready."""
    pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    with running_server(["--model", str(tiny_checkpoint_dir), "--device", "cpu", "--no-access-log"],
                        tmp_path / "server.log") as base:
        yield base


def test_page_shows_what_the_api_returns(server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (scripts/setup.sh --dev does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    import httpx

    files = [OFFICIAL / name for name in DEMO_IMAGES]
    expected = {}
    for f in files:
        r = httpx.post(f"{server}/v1/detect", files=[("files", (f.name, f.read_bytes()))], timeout=30)
        assert r.status_code == 200, r.text
        expected[f.name] = r.json()["results"][0]

    foreign: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            # Playwright evaluates its probes with eval(), which the page's own CSP forbids;
            # the header is checked on the response instead, and the request log below
            # checks what the CSP is there for (nothing loaded from another origin).
            page = browser.new_page(viewport={"width": 1000, "height": 900}, bypass_csp=True)
            page.on("request", lambda req: foreign.append(req.url)
                    if not req.url.startswith((server, "blob:", "data:")) else None)
            console_errors: list[str] = []
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            response = page.goto(server + "/")
            assert "script-src 'self'" in response.headers["content-security-policy"]
            page.wait_for_function("document.querySelector('#model').textContent.startsWith('Model ')")

            # the picker is reachable from the keyboard, and labelled
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") == "file-input"
            assert page.evaluate("document.activeElement.labels.length") >= 1

            page.set_input_files("#file-input", [str(f) for f in files])
            page.wait_for_function(
                "document.querySelectorAll('#results .card[data-state=done]').length === 2", timeout=30_000
            )
            cards = page.query_selector_all("#results .card")
            assert len(cards) == 2
            for card in cards:
                name = card.get_attribute("data-name")
                api = expected[name]
                verdict = card.query_selector(".verdict")
                assert verdict.get_attribute("data-verdict") == api["verdict"]
                assert verdict.inner_text().strip().lower() == api["verdict"]
                prob = card.query_selector(".prob")
                assert float(prob.get_attribute("data-prob")) == pytest.approx(api["prob_fake"], abs=1e-12)
                shown = re.search(r"([\d.]+)%", prob.inner_text())
                assert shown, prob.inner_text()
                assert float(shown.group(1)) == pytest.approx(100 * api["prob_fake"], abs=0.051)
                bars = card.query_selector_all(".chart svg rect.bar")
                assert len(bars) == len(api["block_importance"])
                thumb = card.query_selector("img.thumb")
                assert thumb.get_attribute("src").startswith("blob:")
                assert page.evaluate("img => img.complete && img.naturalWidth > 0", thumb)
            shot = tmp_path / "rine-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 0
            if os.environ.get("RINE_SCREENSHOT_COPY"):
                shutil.copy(shot, os.environ["RINE_SCREENSHOT_COPY"])
            assert not console_errors, console_errors
        finally:
            browser.close()
    assert not foreign, f"the page requested other origins: {foreign}"


def test_page_waits_out_503s_refuses_big_files_and_exports(server, tmp_path):
    """A 503 (model loading, busy) is retried as Retry-After says; a file over the server's
    limit is refused before it is sent; screen readers hear each file's name with its
    result; the results download as CSV."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (scripts/setup.sh --dev does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    demo = OFFICIAL / DEMO_IMAGES[0]
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024))  # over the default 20 MB
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(accept_downloads=True, bypass_csp=True)
            page = context.new_page()
            posts: list[str] = []
            answered_503 = []

            def detect(route):
                posts.append(route.request.url)
                if not answered_503:  # the first upload meets a server that is still loading
                    answered_503.append(True)
                    route.fulfill(status=503, headers={"Retry-After": "1", "content-type": "application/json"},
                                  body='{"detail": "model is loading"}')
                else:
                    route.continue_()

            page.route("**/v1/detect", detect)
            page.goto(server + "/")
            page.wait_for_function("document.querySelector('#model').textContent.startsWith('Model ')")
            page.set_input_files("#file-input", [str(demo), str(big)])
            page.wait_for_function("document.querySelectorAll('#results .card[data-state]:not([data-state=pending])')"
                                   ".length === 2", timeout=30_000)
            cards = {c.get_attribute("data-name"): c for c in page.query_selector_all("#results .card")}
            assert cards[demo.name].get_attribute("data-state") == "done"
            assert cards["huge.png"].get_attribute("data-state") == "error"
            assert "this server takes images of at most 20 MB" in cards["huge.png"].inner_text()
            assert len(posts) == 2  # the 503, then the retry; the big file was never sent
            said = page.inner_text("#announce")
            assert said.startswith(("huge.png: could not be scored", f"{demo.name}: ")), said
            with page.expect_download() as download:
                page.click("#download")
            rows = list(csv.DictReader(open(download.value.path(), newline="", encoding="utf-8")))
            assert {r["name"] for r in rows} == {demo.name, "huge.png"}
            row = next(r for r in rows if r["name"] == demo.name)
            assert row["verdict"] in ("real", "synthetic") and 0 < float(row["prob_fake"]) < 1 and not row["error"]
        finally:
            browser.close()


def test_csv_download_does_not_turn_file_names_into_formulas(server, tmp_path):
    """File names come from whoever sent the files: one named `=cmd|...` must reach the CSV
    as text (a leading quote), not as a formula a spreadsheet would run; numbers stay numbers."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (scripts/setup.sh --dev does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    from conftest import write_image

    names = ["=cmd|' -C calc'!A0.png", "+SUM(1,2).png", "-2+3.png", "@now.png", "plain.png"]
    files = [write_image(tmp_path / "up" / name, (64, 64), seed=i) for i, name in enumerate(names)]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(accept_downloads=True, bypass_csp=True).new_page()
            page.goto(server + "/")
            page.wait_for_function("document.querySelector('#model').textContent.startsWith('Model ')")
            page.set_input_files("#file-input", [str(f) for f in files])
            page.wait_for_function(f"document.querySelectorAll('#results .card[data-state=done]').length === {len(files)}",
                                   timeout=60_000)
            with page.expect_download() as download:
                page.click("#download")
            raw = open(download.value.path(), newline="", encoding="utf-8").read()
        finally:
            browser.close()
    rows = list(csv.DictReader(raw.splitlines()))
    assert sorted(r["name"] for r in rows) == sorted(("'" + n) if n[0] in "=+-@" else n for n in names), raw
    for r in rows:
        assert r["verdict"] in ("real", "synthetic") and not r["error"]
        float(r["prob_fake"]), float(r["logit"])  # numbers are written as numbers, even negative logits
        assert not r["logit"].startswith("'")
