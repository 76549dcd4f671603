"""End to end: `rine serve --client-side` in a subprocess, images scored INSIDE headless Chromium.

The page must (1) cut crops byte-identical to Python's `crop_views(load_image(...))` on the
test images and on files made to catch the usual decoding traps (EXIF rotation, translucent
alpha, palettes with transparency, 16-bit and interlaced PNGs, images smaller than the crop),
and (2) score the demo images with onnxruntime-web while every request to /v1/detect is
aborted by the test, giving the server's probabilities to 1e-4.

Skips without Debian's chromium, Playwright, the onnx extra or onnxruntime-web (fetched by
scripts/vendor_onnxruntime_web.sh, which scripts/setup.sh --dev runs).
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import OFFICIAL
from support.browser import CHROMIUM, CHROMIUM_ARGS
from support.onnx_fixtures import (
    DEMO_IMAGES,
    export_with_cli,
    image_paths,
    make_sensitive_checkpoint,
)
from support.serve_proc import running_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


@pytest.fixture(scope="module")
def browser_page():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (scripts/setup.sh --dev does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    from rine.server.client_side import missing_vendor_files

    if missing_vendor_files():
        pytest.skip("onnxruntime-web is not installed: bash scripts/vendor_onnxruntime_web.sh")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def export(tiny_backbone_dir, tmp_path_factory):
    """An ONNX export of a sensitive tiny model."""
    tmp = tmp_path_factory.mktemp("client")
    return export_with_cli(make_sensitive_checkpoint(tiny_backbone_dir, tmp / "ckpt"), tmp / "export")


@pytest.fixture(scope="module")
def client_server(export, tmp_path_factory):
    """`rine serve --client-side` on `export`; yields its base URL."""
    pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from rine.server.client_side import missing_vendor_files

    if missing_vendor_files():
        pytest.skip("onnxruntime-web is not installed: bash scripts/vendor_onnxruntime_web.sh")
    tmp = tmp_path_factory.mktemp("serve")
    with running_server(["--model", str(export), "--client-side", "--no-access-log"], tmp / "server.log") as base:
        yield base


def tricky_images(folder: Path) -> list[Path]:
    """Files on which a browser's own decoding differs from Pillow's unless handled."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)

    def noise(h, w, c):
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    out = []

    def save(name, image, **kw):
        out.append(folder / name)
        image.save(out[-1], **kw)

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW": rine does not rotate, nor must the page
    save("exif_rotated.jpg", Image.fromarray(noise(240, 320, 3)), quality=90, exif=exif.tobytes())
    rgba = noise(250, 300, 4)
    rgba[..., 3] = rng.integers(0, 4, (250, 300), dtype=np.uint8)  # nearly transparent: colour must survive
    save("translucent_rgba.png", Image.fromarray(rgba, "RGBA"))
    save("translucent_rgba_interlaced.png", Image.fromarray(rgba, "RGBA"), interlace=1)
    pal = Image.fromarray(noise(230, 230, 3)).quantize(64)
    pal.info["transparency"] = 3
    save("palette_trns.png", pal, transparency=3)
    save("grey_alpha.png", Image.fromarray(noise(260, 226, 2), "LA"))
    save("small_grey.png", Image.fromarray(noise(100, 150, 1)[..., 0], "L"))
    save("grey_4bit.png", Image.fromarray((noise(240, 240, 1)[..., 0] // 17 * 17), "L"), bits=4)
    wide16 = (noise(230, 301, 3).astype(np.uint16) * 257 + rng.integers(0, 256, (230, 301, 3))).astype(">u2")
    path16 = folder / "rgb16.png"
    _write_png16(path16, wide16)
    out.append(path16)
    save("odd_size.jpg", Image.fromarray(noise(225, 301, 3)), quality=95, subsampling=2)
    return out


def _write_png16(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    path.write_bytes(png + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_page_crops_are_pythons_byte_for_byte(client_server, browser_page, tmp_path):
    from rine.config import PreprocessConfig
    from rine.data.images import load_image
    from rine.data.preprocess import crop_views

    page = browser_page.new_page(bypass_csp=True)  # page.evaluate needs eval()
    page.goto(client_server + "/")
    page.wait_for_function("window.rineClientSide !== undefined")
    files = image_paths() + tricky_images(tmp_path)
    mismatched = []
    for path in files:
        for crop in ("center", "ten"):
            want = crop_views(load_image(path), PreprocessConfig(crop=crop))
            got = page.evaluate(
                """async ([b64, crop]) => {
                    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                    const r = await window.rineClientSide.crops(new Blob([bytes]), {image_size: 224, crop});
                    let s = ""; for (let i = 0; i < r.views.length; i += 8192) s += String.fromCharCode(...r.views.subarray(i, i + 8192));
                    return [r.n, btoa(s)];
                }""",
                [base64.b64encode(path.read_bytes()).decode(), crop],
            )
            views = np.frombuffer(base64.b64decode(got[1]), np.uint8)
            if got[0] != len(want) or views.tobytes() != want.tobytes():
                diff = (np.abs(views.reshape(want.shape).astype(int) - want) if views.size == want.size else None)
                mismatched.append((path.name, crop, None if diff is None else int(diff.max())))
    assert not mismatched, f"crops differ from Python's (file, crop, largest difference): {mismatched}"
    page.close()


def test_page_scores_in_the_browser_with_nothing_uploaded(client_server, browser_page):
    import httpx

    files = [OFFICIAL / name for name in DEMO_IMAGES]
    expected = {}
    for f in files:
        r = httpx.post(f"{client_server}/v1/detect", files=[("files", (f.name, f.read_bytes()))], timeout=30)
        assert r.status_code == 200, r.text
        expected[f.name] = r.json()["results"][0]
    assert abs(expected[files[0].name]["prob_fake"] - expected[files[1].name]["prob_fake"]) > 1e-3

    # The page's own CSP stays on here: WebAssembly must run under it ('wasm-unsafe-eval').
    context = browser_page.new_context()
    page = context.new_page()
    uploads: list[str] = []

    def block(route):
        uploads.append(route.request.url)
        route.abort()

    page.route("**/v1/detect*", block)
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    response = page.goto(client_server + "/")
    assert "'wasm-unsafe-eval'" in response.headers["content-security-policy"]
    page.wait_for_selector("#client-side-toggle:checked")
    page.set_input_files("#file-input", [str(f) for f in files])
    page.wait_for_selector("#results .card[data-state=done] >> nth=1", timeout=60_000)
    cards = page.query_selector_all("#results .card")
    assert len(cards) == 2
    for card in cards:
        api = expected[card.get_attribute("data-name")]
        prob = float(card.query_selector(".prob").get_attribute("data-prob"))
        assert prob == pytest.approx(api["prob_fake"], abs=1e-4)
        assert card.query_selector(".verdict").get_attribute("data-verdict") == api["verdict"]
        assert "not uploaded" in card.inner_text()
        assert len(card.query_selector_all(".chart svg rect.bar")) == 3
    assert uploads == []  # not even tried: nothing left the browser
    assert "nothing is uploaded" in page.inner_text(".lede")
    assert not console_errors, console_errors

    # The user can still choose the server: untick, and the next file is uploaded.
    page.unroute("**/v1/detect*")
    page.uncheck("#client-side-toggle")
    page.set_input_files("#file-input", [str(files[0])])
    page.wait_for_selector("#results .card:nth-child(3)[data-state=done]", timeout=30_000)
    third = page.query_selector_all("#results .card")[2]
    assert float(third.query_selector(".prob").get_attribute("data-prob")) == pytest.approx(
        expected[files[0].name]["prob_fake"], abs=1e-12)
    assert "not uploaded" not in third.inner_text()
    context.close()


def test_client_side_refusals(tiny_checkpoint_dir, export, tmp_path, capsys, monkeypatch):
    """--client-side needs an export small enough to download, and a crop a browser can cut."""
    from rine.cli import main
    from rine.server import client_side

    code = main(["serve", "--model", str(tiny_checkpoint_dir), "--client-side", "--port", "0"])
    assert code == 2 and "--client-side needs an ONNX export" in capsys.readouterr().err
    monkeypatch.setattr(client_side, "MAX_CLIENT_MODEL_BYTES", 1000)
    code = main(["serve", "--model", str(export), "--client-side", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "MB: too large for a page to download" in err and "ViT-B/32" in err
    monkeypatch.undo()
    code = main(["serve", "--model", str(export), "--client-side", "--crop", "resize", "--port", "0"])
    assert code == 2 and "cannot use the resize crop" in capsys.readouterr().err
    with pytest.raises(client_side.ClientSideError, match="vendor_onnxruntime_web.sh"):
        monkeypatch.setattr(client_side, "VENDOR_DIR", tmp_path / "nowhere")
        client_side.check_client_side(export, "center")


def test_vendor_and_model_routes_take_only_their_names(export):
    """The client-side routes serve fixed files; a path in the URL reaches nothing else."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rine.inference.onnx_backend import load_onnx_detector
    from rine.server.app import create_app
    from rine.server.client_side import missing_vendor_files

    if missing_vendor_files():
        pytest.skip("onnxruntime-web is not installed: bash scripts/vendor_onnxruntime_web.sh")
    from rine.server.client_side import check_client_side

    app = create_app(load_onnx_detector(export), client_side=check_client_side(export, "center"))
    with TestClient(app) as client:
        info = client.get("/v1/client-side").json()
        assert info["enabled"] and info["crop"] == "center" and info["image_size"] == 224 and info["n_blocks"] == 3
        model = client.get(info["model_url"])
        assert model.status_code == 200 and model.content == (export / "model.onnx").read_bytes()
        wasm = client.get("/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm")
        assert wasm.status_code == 200 and wasm.headers["content-type"] == "application/wasm"
        assert client.get("/vendor/onnxruntime-web/ort.wasm.min.mjs").headers["content-type"].startswith("text/javascript")
        for bad in ("NOTICE.txt", "..%2F..%2Fclient_side.py", "%2E%2E/%2E%2E/app.py", "ort.min.mjs"):
            assert client.get("/vendor/onnxruntime-web/" + bad).status_code == 404, bad
        assert client.get("/vendor/onnxruntime-web/../../app.py").status_code == 404
    with TestClient(create_app(load_onnx_detector(export))) as client:  # not started with --client-side
        assert client.get("/v1/client-side").json() == {"enabled": False}
        assert client.get("/vendor/onnxruntime-web/ort.wasm.min.mjs").status_code == 404


# ---------------------------------------------------------------------------- a calibrated export
# Platt-like map, so that a page ignoring it is wrong in the probability as well as in the verdict.
CAL_SCALE, CAL_OFFSET = 0.8, -0.3


@pytest.fixture(scope="module")
def calibrated(export, tmp_path_factory):
    """A copy of `export` whose config.json carries a calibration fitted to the test images'
    ten-crop logits: the cut sits just above the least synthetic-looking image that plain
    sigmoid > 0.5 calls synthetic (so it flips to real), and the uncertain band holds only the
    next image up. Returns (folder, files, {name: expected verdict}, {name: per-view logits})
    for five files: those two, the next one up (synthetic) and two others."""
    import dataclasses
    import shutil

    from rine.config import CONFIG_NAME, CalibrationConfig, RINEConfig
    from rine.data.images import load_image
    from rine.data.preprocess import crop_views
    from rine.inference.onnx_backend import load_onnx_detector
    from rine.model.calibration import expit

    folder = tmp_path_factory.mktemp("calibrated") / "export"
    shutil.copytree(export, folder)
    files = image_paths()
    det = load_onnx_detector(folder, crop="ten")
    views = {p.name: det.backend.score_views(crop_views(load_image(p), det.config.preprocess))[0].numpy() for p in files}
    z = {name: float(np.float32(v.mean())) for name, v in views.items()}
    c = {name: CAL_SCALE * v + CAL_OFFSET for name, v in z.items()}
    up = sorted((n for n in z if z[n] > 0), key=c.get)  # plain verdict "synthetic", least sure first
    assert len(up) >= 3, f"the test needs 3 images with a positive logit: {z}"
    flip, unsure, above = up[0], up[1], up[2]
    assert min(c[unsure] - c[flip], c[above] - c[unsure]) > 0.05, c  # margins far beyond float noise
    cut = (c[flip] + c[unsure]) / 2
    low, high = expit((c[flip] + 3 * c[unsure]) / 4).item(), expit((c[unsure] + c[above]) / 2).item()
    cal = CalibrationConfig(method="platt", threshold_logit=cut, scale=CAL_SCALE, offset=CAL_OFFSET,
                            uncertain_low=low, uncertain_high=high)
    dataclasses.replace(RINEConfig.load(folder / CONFIG_NAME), calibration=cal).save(folder / CONFIG_NAME)
    # Scored in the page: those three and the two smallest of the others (less to decode in
    # JavaScript; the crop test above covers every file).
    others = sorted((p for p in files if p.name not in (flip, unsure, above)), key=lambda p: p.stat().st_size)
    files = [p for p in files if p.name in (flip, unsure, above)] + others[:2]
    verdicts = {p.name: "uncertain" if p.name == unsure else "synthetic" if c[p.name] > cut else "real" for p in files}
    assert verdicts[flip] == "real" and verdicts[above] == "synthetic" and list(verdicts.values()).count("real") >= 2
    return folder, files, verdicts, {p.name: views[p.name] for p in files}


def test_page_applies_the_calibration_as_the_server(calibrated, browser_page, tmp_path):
    """`rine serve --client-side --crop ten` on a calibrated export: the page, scoring in the
    browser, shows each file's verdict, threshold and probability as /v1/detect records them
    (calibrated probability of the MEAN logit of the ten crops, the calibrated cut, "uncertain"
    in the band), and the model line explains the calibration as in server mode."""
    import httpx

    from rine.model.calibration import expit

    folder, files, verdicts, views = calibrated
    # The broken pages this must tell apart from the right one, on these very files:
    plain = {n: float(expit(v.mean()).item()) for n, v in views.items()}  # calibration ignored
    per_crop = {n: float(expit(CAL_SCALE * v.astype(np.float64) + CAL_OFFSET).mean()) for n, v in views.items()}
    args = ["--model", str(folder), "--client-side", "--crop", "ten", "--no-access-log"]
    with running_server(args, tmp_path / "server.log") as base:
        api = {}
        for f in files:
            r = httpx.post(f"{base}/v1/detect", files=[("files", (f.name, f.read_bytes()))], timeout=30)
            assert r.status_code == 200, r.text
            api[f.name] = r.json()["results"][0]
        assert {n: r["verdict"] for n, r in api.items()} == verdicts
        assert max(abs(plain[n] - r["prob_fake"]) for n, r in api.items()) > 1e-2
        assert max(abs(per_crop[n] - r["prob_fake"]) for n, r in api.items()) > 1e-3

        context = browser_page.new_context()
        page = context.new_page()
        uploads: list[str] = []
        page.route("**/v1/detect*", lambda route: (uploads.append(route.request.url), route.abort()))
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.goto(base + "/")
        page.wait_for_selector("#client-side-toggle:checked")
        # (the page's own CSP stays on, which forbids wait_for_function: selectors only)
        page.wait_for_selector('#model:text-matches("^Model ")')
        model_line = page.inner_text("#model")
        assert "calibrated for this use (platt" in model_line and '"uncertain"' in model_line, model_line
        page.set_input_files("#file-input", [str(f) for f in files])
        page.wait_for_selector(f"#results .card[data-state=done] >> nth={len(files) - 1}", timeout=60_000)
        shown = {}
        for card in page.query_selector_all("#results .card"):
            prob = card.query_selector(".prob")
            shown[card.get_attribute("data-name")] = (
                card.query_selector(".verdict").get_attribute("data-verdict"),
                float(prob.get_attribute("data-threshold")), float(prob.get_attribute("data-prob")),
                "not uploaded" in card.inner_text())
        context.close()
    assert uploads == [] and not console_errors, (uploads, console_errors)
    assert all(local for *_, local in shown.values()) and shown.keys() == api.keys()
    assert {n: s[0] for n, s in shown.items()} == verdicts  # the flip and the uncertain one included
    assert {n: s[1] for n, s in shown.items()} == {n: r["threshold"] for n, r in api.items()}
    for name, (_, _, prob, _) in shown.items():
        assert prob == pytest.approx(api[name]["prob_fake"], abs=1e-5), name


def test_client_side_info_carries_the_servers_decision_rule(calibrated, export, capsys):
    """/v1/client-side gives the page the rule /v1/model describes and /v1/detect applies: the
    export's calibration, or --threshold / --uncertain-band on a plain one; and `rine serve
    --client-side` no longer refuses a calibrated export (it stops here at --threads 0, a check
    that comes after the client-side one)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rine.cli import main
    from rine.inference.onnx_backend import load_onnx_detector
    from rine.server.app import create_app
    from rine.server.client_side import check_client_side

    folder = calibrated[0]
    code = main(["serve", "--model", str(folder), "--client-side", "--crop", "ten", "--threads", "0", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--threads must be at least 1" in err and "calibration" not in err, err
    plain = load_onnx_detector(export)
    overridden = load_onnx_detector(export)
    overridden.set_decision(threshold=0.3, uncertain_band=0.1)
    for det, folder_ in ((load_onnx_detector(folder, crop="ten"), folder), (plain, export), (overridden, export)):
        with TestClient(create_app(det, client_side=check_client_side(folder_, det.config.preprocess.crop))) as client:
            info, model = client.get("/v1/client-side").json(), client.get("/v1/model").json()
        assert info["calibration"] == model["calibration"] == det.decision.public()
        assert info["threshold"] == model["threshold"] == det.threshold
    assert load_onnx_detector(folder).decision.public()["method"] == "platt"
    assert plain.decision.public() is None and plain.threshold == 0.5
    assert overridden.threshold == 0.3 and overridden.decision.public()["uncertain_low"] == pytest.approx(0.2)
