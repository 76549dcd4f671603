"""API tests for `rine serve` (FastAPI TestClient, tiny random-weight detector)."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

from fastapi.testclient import TestClient  # noqa: E402

from rine.server.app import create_app  # noqa: E402
from rine.server.batching import Batcher, Overloaded, ScoringFailed  # noqa: E402
from rine.server.limits import ServerSettings, display_name, load_error_status  # noqa: E402

from conftest import OFFICIAL, assert_scores_as_reference_decode  # noqa: E402
from support.serve_proc import wait_ready  # noqa: E402


def png_bytes(size=(64, 48), mode="RGB", seed=0, fmt="PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, ch), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if ch == 1 else arr, mode).save(buf, format=fmt)
    return buf.getvalue()


def upload(*items):
    """[(name, bytes)] -> the `files=` argument of the test client."""
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


@pytest.fixture
def client(tiny_detector):
    with TestClient(create_app(tiny_detector)) as c:
        yield c


def make_client(detector, **settings):
    return TestClient(create_app(detector, ServerSettings(**settings)))


class GatedDetector:
    """The tiny detector whose encoder waits for `gate`: lets a test hold work in the batcher."""

    def __init__(self, detector):
        self.inner = detector
        self.config = detector.config
        self.threshold = detector.threshold
        self.gate = threading.Event()
        self.entered = threading.Event()

    def block_importance(self):
        return self.inner.block_importance()

    def score_views(self, views):
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        return self.inner.score_views(views)


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# ---------------------------------------------------------------------------- health, model, page
def test_health_model_and_openapi(client, tiny_detector):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    info = client.get("/v1/model").json()
    assert info["name"] == "tiny-test"
    # a local backbone folder is shown by its name only, not the server's path
    assert info["backbone"] == "tiny-clip-vision"
    assert info["revision"] is None
    assert info["threshold"] == 0.5
    assert info["n_blocks"] == 3
    np.testing.assert_allclose(info["block_importance"], tiny_detector.block_importance(), atol=1e-6)
    spec = client.get("/openapi.json").json()
    assert {"/v1/detect", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["items"]["format"] == "binary"
    assert info["max_file_bytes"] == ServerSettings().max_file_bytes and info["max_files"] == 16
    # HEAD for uptime monitors; no browsable docs, whose viewer would come from a CDN
    assert client.head("/healthz").status_code == 200 and client.head("/").status_code == 200
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for path in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(path).text
        assert client.get(path).status_code == 200
        # no CDN, no web font: nothing is loaded from another origin
        assert "https://" not in text and "@import" not in text and "@font-face" not in text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert 'for="file-input"' in page.text and 'id="file-input"' in page.text


def test_readyz_false_until_model_loaded(tiny_detector):
    release = threading.Event()

    def factory():
        assert release.wait(30)
        return tiny_detector

    with TestClient(create_app(detector_factory=factory)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False and "Retry-After" in r.headers
        assert r.json()["reason"] == "loading"
        r = c.post("/v1/detect", files=upload(("a.png", png_bytes())))
        assert r.status_code == 503 and r.json()["reason"] == "loading"  # a client may wait and retry
        assert c.get("/v1/model").status_code == 503
        release.set()
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert c.post("/v1/detect", files=upload(("a.png", png_bytes()))).status_code == 200


def test_load_failure_is_reported(tiny_detector):
    errors = []

    def factory():
        raise FileNotFoundError("no such checkpoint")

    with TestClient(create_app(detector_factory=factory, on_load_error=errors.append)) as c:
        wait_until(lambda: errors)
        r = c.get("/readyz")
        detail = r.json()["detail"]
        assert r.status_code == 503 and "FileNotFoundError" in detail
        assert "no such checkpoint" not in detail  # messages may hold local paths: log only


def test_model_options_load_through_the_library_loader(tiny_checkpoint_dir, tiny_detector, monkeypatch):
    """`create_app(model=ModelOptions(...))` (what `rine serve` passes) loads through
    rine.inference.loading.load_detector, the fast encoder only, with the decision overrides;
    the scores are those of the same checkpoint loaded directly."""
    import rine.inference.loading as loading
    from rine.inference.loading import ModelOptions

    calls = []
    real_load = loading.load_detector

    def spy(options, **kwargs):
        calls.append((options, kwargs))
        return real_load(options, **kwargs)

    monkeypatch.setattr(loading, "load_detector", spy)
    options = ModelOptions(model=str(tiny_checkpoint_dir), device="cpu", precision=tiny_detector.precision)
    data = (OFFICIAL / "real_aadlygmazf.jpg").read_bytes()
    with TestClient(create_app(model=options, threshold=0.25, uncertain_band=0.1)) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, timeout=120)
        assert c.get("/v1/model").json()["threshold"] == 0.25
        rec = c.post("/v1/detect", files=upload(("real.jpg", data))).json()["results"][0]
    assert calls == [(options, {"keep_reference": False, "progress": False})]
    assert rec["threshold"] == 0.25 and rec["verdict"] in ("real", "synthetic", "uncertain")
    expected = tiny_detector.predict([str(OFFICIAL / "real_aadlygmazf.jpg")])[0]
    assert rec["logit"] == pytest.approx(expected.logit, abs=1e-5)


def test_model_options_that_do_not_fit_are_a_load_error():
    from rine.errors import OptionError
    from rine.inference.loading import ModelOptions

    errors = []
    with TestClient(create_app(model=ModelOptions(head="h.pth"), on_load_error=errors.append)) as c:
        wait_until(lambda: errors, timeout=60)
        assert "OptionError" in c.get("/readyz").json()["detail"]
    assert isinstance(errors[0], OptionError) and "backbone" in str(errors[0])
    with pytest.raises(ValueError, match="one of detector, model or detector_factory"):
        create_app(object(), model=ModelOptions(model="x"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        ServerSettings(max_file_bytes=1_000_000, memory_budget_bytes=10_000)
    with pytest.raises(ValueError, match="max_wait_ms"):
        ServerSettings(max_wait_ms=-1)
    with pytest.raises(ValueError, match="score_timeout_s"):
        ServerSettings(score_timeout_s=0)


def test_failure_while_starting_the_encoder_is_reported(tiny_detector, monkeypatch):
    """Anything failing after the model loaded (here the batcher) ends in load_error, not a hang."""
    import rine.server.service as app_module

    def broken_batcher(*args, **kwargs):
        raise ValueError("batcher cannot start")

    monkeypatch.setattr(app_module, "Batcher", broken_batcher)
    errors = []
    with TestClient(create_app(detector_factory=lambda: tiny_detector, on_load_error=errors.append)) as c:
        wait_until(lambda: errors)
        assert c.get("/readyz").status_code == 503


# ---------------------------------------------------------------------------- scoring
def test_detect_matches_detector_predict(client, tiny_detector):
    real = (OFFICIAL / "real_aadlygmazf.jpg").read_bytes()
    fake = (OFFICIAL / "fake_dalle_zzrybysskm.png").read_bytes()
    r = client.post("/v1/detect", files=upload(("real.jpg", real), ("fake.png", fake)))
    assert r.status_code == 200
    assert r.headers["server-timing"].startswith("total;dur=")
    data = r.json()
    assert data["model"] == "tiny-test" and data["threshold"] == 0.5
    assert len(data["model_block_importance"]) == 3
    expected = tiny_detector.predict([real, fake])
    assert [rec["name"] for rec in data["results"]] == ["real.jpg", "fake.png"]
    for rec, pred in zip(data["results"], expected, strict=True):
        assert rec["status"] == 200 and rec["error"] is None
        assert rec["prob_fake"] == pytest.approx(pred.prob_fake, abs=1e-5)
        assert rec["logit"] == pytest.approx(pred.logit, abs=1e-5)
        assert rec["verdict"] == ("synthetic" if pred.is_fake else "real")
        assert rec["is_fake"] == pred.is_fake
        np.testing.assert_allclose(rec["block_importance"], pred.block_contribution, atol=1e-5)
        assert sum(rec["block_importance"]) == pytest.approx(1.0, abs=1e-4)


def test_ten_crop_is_sigmoid_of_mean_logit(sensitive_checkpoint_dir):
    from rine.inference.detector import Detector

    det = Detector.from_pretrained(str(sensitive_checkpoint_dir), crop="ten", precision="fp32")
    data = png_bytes((300, 260), seed=3)
    with make_client(det) as c:
        rec = c.post("/v1/detect", files=upload(("a.png", data))).json()["results"][0]
    from PIL import Image

    from rine.data.preprocess import crop_views

    views = crop_views(Image.open(io.BytesIO(data)).convert("RGB"), det.config.preprocess)
    assert views.shape[0] == 10
    logits, _ = det.score_views(views)
    assert rec["prob_fake"] == pytest.approx(torch.sigmoid(logits.mean()).item(), abs=1e-5)
    assert rec["logit"] == pytest.approx(logits.mean().item(), abs=1e-6)
    # Negative control: the mean of the ten probabilities is another score on this image.
    assert abs(rec["prob_fake"] - torch.sigmoid(logits).mean().item()) > 0.01


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("L", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP")])
def test_detect_accepts_common_formats(sensitive_detector, mode, fmt):
    """Each format scores as `Detector.predict` on the reference's decode of the same bytes
    (RGBA: alpha dropped, L: grey replicated), not as a wrong decode of them."""
    data = png_bytes(size=(260, 240), mode=mode, fmt=fmt, seed=5)
    with make_client(sensitive_detector) as c:
        r = c.post("/v1/detect", files=upload((f"x.{fmt.lower()}", data)))
    assert r.status_code == 200
    assert_scores_as_reference_decode(sensitive_detector, [data], [r.json()["results"][0]["prob_fake"]])


def test_concurrent_requests_are_batched_together(tiny_detector):
    gated = GatedDetector(tiny_detector)
    n = 6
    with make_client(gated, max_wait_ms=0) as c:
        # The first request occupies the encoder; the others queue behind it and must
        # come out as ONE batch when it frees up.
        results = [None] * n
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, c.post("/v1/detect", files=upload((f"{i}.png", png_bytes(seed=i))))
        )) for i in range(n)]
        threads[0].start()
        assert gated.entered.wait(10)
        for t in threads[1:]:
            t.start()
        batcher = c.app.state.service.batcher
        wait_until(lambda: batcher.depth == n - 1)
        gated.gate.set()
        for t in threads:
            t.join(30)
        assert all(r.status_code == 200 for r in results)
        assert batcher.batches == 2 and batcher.largest_batch == n - 1
        for i, r in enumerate(results):
            expected = tiny_detector.predict(png_bytes(seed=i))[0].prob_fake
            assert r.json()["results"][0]["prob_fake"] == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------- input errors
def test_not_an_image_is_415(client):
    r = client.post("/v1/detect", files=upload(("notes.txt", b"just some text, not pixels")))
    assert r.status_code == 415
    assert "not an image" in r.json()["detail"]
    assert r.json()["results"][0]["error"] == r.json()["detail"]
    assert r.json()["results"][0]["error_kind"] == r.json()["error_kind"] == "not_image"


def test_truncated_and_empty_are_422(client):
    data = png_bytes((128, 128))
    r = client.post("/v1/detect", files=upload(("cut.png", data[: len(data) // 2])))
    assert r.status_code == 422 and "truncated" in r.json()["detail"]
    assert r.json()["results"][0]["error_kind"] == "corrupt"
    r = client.post("/v1/detect", files=upload(("empty.png", b""), ("ok.png", data)))
    assert [(x["status"], x["error_kind"]) for x in r.json()["results"]] == [(422, "empty"), (200, None)]


class PoisonedDetector(GatedDetector):
    """The tiny detector, except that its encoder fails on any batch holding an all-black view."""

    def score_views(self, views):
        if (np.asarray(views).reshape(len(views), -1).max(axis=1) == 0).any():
            raise RuntimeError("encoder failed at /secret/path")
        return self.inner.score_views(views)


def test_encoder_failure_costs_only_the_image_that_caused_it(tiny_detector):
    black = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 48)).save(black, format="PNG")
    files = [("a.png", png_bytes(seed=1)), ("black.png", black.getvalue()), ("b.png", png_bytes(seed=2))]
    with make_client(PoisonedDetector(tiny_detector), max_batch=64, max_wait_ms=200) as c:
        r = c.post("/v1/detect", files=upload(*files))
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["name"] for x in results] == ["a.png", "black.png", "b.png"]
    assert results[1]["status"] == 500 and results[1]["prob_fake"] is None
    assert "RuntimeError" in results[1]["error"] and "secret" not in r.text
    assert [x["error_kind"] for x in results] == [None, "scoring_failed", None]
    expected = tiny_detector.predict([Image.open(io.BytesIO(d)) for _, d in files[::2]])
    for got, want in zip(results[::2], expected, strict=True):
        assert got["status"] == 200 and got["prob_fake"] == pytest.approx(want.prob_fake, abs=1e-5)


def test_several_files_get_per_file_errors_in_order(client):
    good = png_bytes(seed=1)
    r = client.post("/v1/detect", files=upload(("a.png", good), ("b.txt", b"nope"), ("c.png", good[:100]), ("d.png", good)))
    assert r.status_code == 200
    recs = r.json()["results"]
    assert [x["name"] for x in recs] == ["a.png", "b.txt", "c.png", "d.png"]
    assert [x["status"] for x in recs] == [200, 415, 422, 200]
    assert recs[1]["prob_fake"] is None and recs[1]["verdict"] is None
    assert recs[0]["prob_fake"] == pytest.approx(recs[3]["prob_fake"], abs=1e-6)


def test_file_over_size_limit_is_413(tiny_detector):
    big = png_bytes((200, 200))  # ~120 KB of noise
    small = png_bytes((32, 32))
    with make_client(tiny_detector, max_file_bytes=50_000, max_request_bytes=1_000_000) as c:
        r = c.post("/v1/detect", files=upload(("big.png", big)))
        assert r.status_code == 413 and "too large" in r.json()["detail"]
        r = c.post("/v1/detect", files=upload(("big.png", big), ("small.png", small)))
        assert r.status_code == 200
        assert [(x["status"], x["error_kind"]) for x in r.json()["results"]] == [(413, "too_large"), (200, None)]
        assert c.app.state.service.budget.used == 0


def test_request_over_size_limit_is_413_before_reading(tiny_detector):
    with make_client(tiny_detector, max_file_bytes=10_000, max_request_bytes=20_000) as c:
        r = c.post("/v1/detect", files=upload(("a.png", b"\0" * 50_000)))
        assert r.status_code == 413 and "request body too large" in r.json()["detail"]

        # no Content-Length (chunked): the limit is enforced while reading
        boundary = "xyz"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
                .encode() + b"\0" * 50_000 + f"\r\n--{boundary}--\r\n".encode())

        def chunks():
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        r = c.post("/v1/detect", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413


def test_too_many_pixels_is_413(tiny_detector):
    with make_client(tiny_detector, max_pixels=100 * 100) as c:
        r = c.post("/v1/detect", files=upload(("wide.png", png_bytes((200, 100)))))
        assert r.status_code == 413 and "too many pixels" in r.json()["detail"]


def test_request_pixel_budget_refuses_the_image_that_exceeds_it(tiny_detector):
    img = png_bytes((100, 100))  # 10,000 px each: the budget holds two
    with make_client(tiny_detector, max_request_pixels=25_000, decode_workers=1) as c:
        r = c.post("/v1/detect", files=upload(("1.png", img), ("2.png", img), ("3.png", img)))
        assert r.status_code == 200
        statuses = [x["status"] for x in r.json()["results"]]
        assert statuses == [200, 200, 413], statuses
        assert "too many pixels in this request" in r.json()["results"][2]["error"]
        # The budget is per request: the next one starts afresh.
        assert c.post("/v1/detect", files=upload(("4.png", img))).status_code == 200


def test_uploads_from_other_sites_pages_are_refused(client):
    img = png_bytes((32, 32))
    # TestClient's Host is "testserver"; a browser names the page's site in Origin.
    r = client.post("/v1/detect", files=upload(("a.png", img)), headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    assert client.post("/v1/detect", files=upload(("a.png", img)), headers={"Origin": "null"}).status_code == 403
    # The server's own page, a proxy that forwards the site's host, and clients without Origin.
    assert client.post("/v1/detect", files=upload(("a.png", img)), headers={"Origin": "http://testserver"}).status_code == 200
    proxied = {"Origin": "https://rine.example.org", "X-Forwarded-Host": "rine.example.org"}
    assert client.post("/v1/detect", files=upload(("a.png", img)), headers=proxied).status_code == 200
    assert client.post("/v1/detect", files=upload(("a.png", img))).status_code == 200


def test_origin_check_cases():
    from starlette.datastructures import Headers

    from rine.server.guards import same_site

    def allowed(**headers):
        raw = [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
        return same_site(Headers(raw=raw))

    # Same site: ports as the scheme's default, IPv6, case, a trailing dot, proxies.
    assert allowed(origin="https://site", host="site:443") and allowed(origin="http://site:80", host="site")
    assert allowed(origin="http://[::1]:8000", host="[::1]:8000") and allowed(origin="http://LOCALHOST:8000", host="localhost:8000")
    assert allowed(origin="https://site.", host="site:443")
    assert allowed(origin="https://rine.example.org:8443", host="rine.example.org")  # nginx $host drops the port
    assert allowed(origin="https://site", host="127.0.0.1:8000", x_forwarded_host="site, proxy2")
    assert allowed(origin="https://site", host="127.0.0.1:8000", forwarded='for=1.2.3.4;host="site";proto=https')
    # Other sites, other ports of this host, opaque origins.
    assert not allowed(origin="https://evil.example", host="site")
    assert not allowed(origin="http://localhost:3000", host="localhost:8000")
    assert not allowed(origin="null", host="site")
    assert not allowed(origin="https://site", host="127.0.0.1:8000", x_forwarded_host="evil, site")
    assert not allowed(origin="http://[bad", host="site")  # not a URL: refused, not a 500


def test_decompression_bomb_is_refused_from_the_header(client):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(buf, format="PNG")  # 144 M px, ~140 KB compressed
    r = client.post("/v1/detect", files=upload(("bomb.png", buf.getvalue())))
    assert r.status_code == 413 and "too many pixels" in r.json()["detail"]


THIN_IMAGE_CHILD = """
import io, json, resource, sys
from fastapi.testclient import TestClient
from PIL import Image
from rine.inference.detector import Detector
from rine.server.app import create_app

buf = io.BytesIO()
Image.new("L", (1, 5_000_000)).save(buf, format="PNG", optimize=True)
small = io.BytesIO()
Image.new("L", (240, 240)).save(small, format="PNG")
with TestClient(create_app(Detector.from_pretrained(sys.argv[1], precision="fp32"))) as c:
    def post(data):
        r = c.post("/v1/detect", files=[("files", ("x.png", data, "application/octet-stream"))])
        return r.status_code, r.json()["results"][0]["status"]
    assert post(small.getvalue()) == (200, 200)  # warm: the model, the batcher, the first forward
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status = post(buf.getvalue())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"status": status, "grown_mb": (after - before) / 1024, "png_bytes": len(buf.getvalue())}))
"""


@pytest.mark.slow
def test_thin_images_cost_a_crop_not_their_padding(tiny_checkpoint_dir):
    """A 1-pixel-wide PNG of 5 M rows is 10 KB; padding it whole to width 224 took 3.8 GB.
    Measured in a fresh process: ru_maxrss is a lifetime peak, so in the test process an
    earlier, heavier test would hide any growth."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, "-c", THIN_IMAGE_CHILD, str(tiny_checkpoint_dir)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["png_bytes"] < 64 * 1024 and out["status"] == [200, 200]
    assert out["grown_mb"] < 500, out  # the image itself is 5 M px = 15 MB in RGB


def test_formats_outside_the_list_are_refused_by_content(client):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    r = client.post("/v1/detect", files=upload(("disguised.jpg", eps)))
    assert r.status_code == 415 and "supported format" in r.json()["detail"], r.json()


def test_bad_requests(client):
    assert client.post("/v1/detect", content=b"{}", headers={"content-type": "application/json"}).status_code == 415
    r = client.post("/v1/detect", data={"other": "x"}, files=[("other_file", ("a.png", png_bytes(), "image/png"))])
    assert r.status_code == 422 and "files" in r.json()["detail"]
    r = client.post("/v1/detect", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400
    r = client.post("/v1/detect", content=b"--b\r\nnot a header line\r\n\r\n", headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code in (400, 422)


def test_too_many_files_is_413(tiny_detector):
    with make_client(tiny_detector, max_files=2) as c:
        img = png_bytes((16, 16))
        r = c.post("/v1/detect", files=upload(("1.png", img), ("2.png", img), ("3.png", img)))
        assert r.status_code == 413 and "too many files" in r.json()["detail"]


def test_client_filename_is_display_only_and_nothing_is_spooled(client, monkeypatch):
    import tempfile

    import starlette.formparsers

    def no_disk(*a, **k):
        raise AssertionError("an upload touched the disk")

    for mod, name in ((tempfile, "SpooledTemporaryFile"), (tempfile, "NamedTemporaryFile"),
                      (tempfile, "mkstemp"), (starlette.formparsers, "SpooledTemporaryFile")):
        monkeypatch.setattr(mod, name, no_disk)
    big = png_bytes((1100, 1000))  # > 1 MB: Starlette's own parser would spool this to a temp file
    assert len(big) > 1024 * 1024
    r = client.post("/v1/detect", files=upload(("../../etc/passwd", big)))
    assert r.status_code == 200 and r.json()["results"][0]["name"] == "passwd"
    assert display_name("C:\\Users\\x\\a\x00b.png", 0) == "ab.png"
    assert display_name("", 4) == "file 5"
    assert len(display_name("a" * 5000, 0)) == 200


def test_load_error_status_mapping():
    from PIL import Image

    from rine.data.images import ImageLoadError, load_image

    def kind_of(data: bytes, **limits) -> str:
        with pytest.raises(ImageLoadError) as e:
            load_image(data, **limits)
        return e.value.kind

    png = io.BytesIO()
    Image.new("RGB", (9, 9)).save(png, format="PNG")
    assert load_error_status(kind_of(png.getvalue(), max_bytes=4)) == 413
    assert load_error_status(kind_of(png.getvalue(), max_pixels=80)) == 413
    assert load_error_status(kind_of(b"plain text, not an image")) == 415
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    assert load_error_status(kind_of(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])) == 422
    assert load_error_status(kind_of(b"")) == 422
    assert set(ImageLoadError.KINDS) >= {"too_large", "too_many_pixels", "not_image", "corrupt", "empty"}


def test_model_that_failed_to_load_is_503_failed(tiny_detector):
    """`reason: failed` (do not retry: the operator must act), unlike `loading` (retry soon)."""

    def factory():
        raise RuntimeError("weights are corrupt")

    errors = []
    with TestClient(create_app(detector_factory=factory, on_load_error=errors.append)) as c:
        wait_until(lambda: errors)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "failed"
        r = c.post("/v1/detect", files=upload(("a.png", png_bytes())))
        assert r.status_code == 503 and r.json()["reason"] == "failed" and "failed to load" in r.json()["detail"]


def test_invalid_content_length_is_400(client):
    for bad in ("12abc", "-5", "1e3"):
        r = client.post("/v1/detect", content=b"--b--\r\n", headers={
            "Content-Type": "multipart/form-data; boundary=b", "Content-Length": bad})
        assert r.status_code == 400 and r.json()["detail"] == "invalid Content-Length", (bad, r.text)


def test_unconvertible_mode_is_415_for_that_file_only(client):
    """A float TIFF (mode F) cannot be turned into 8-bit RGB without inventing a scale: that
    file's record is 415; the other file in the request is still scored."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)).save(buf, format="TIFF")
    r = client.post("/v1/detect", files=upload(("float.tif", buf.getvalue()), ("ok.png", png_bytes())))
    assert r.status_code == 200
    bad, ok = r.json()["results"]
    assert bad["status"] == 415 and "unsupported image mode 'F'" in bad["error"] and bad["prob_fake"] is None
    assert ok["status"] == 200 and ok["prob_fake"] is not None


# ---------------------------------------------------------------------------- API key
def test_non_ascii_api_key(tiny_detector):
    """A key with non-ASCII characters, sent as its UTF-8 bytes (what clients send), matches;
    the same text in another encoding does not."""
    key = "clé-ключ-鍵"
    with make_client(tiny_detector, api_key=key) as c:
        assert c.get("/v1/model", headers={"X-API-Key": key.encode("utf-8")}).status_code == 200
        assert c.get("/v1/model", headers={"X-API-Key": "clé".encode("latin-1")}).status_code == 401
        assert c.get("/v1/model", headers={"X-API-Key": key.encode("utf-8")[:-1]}).status_code == 401


def test_api_key(tiny_detector):
    with make_client(tiny_detector, api_key="s3cret-key") as c:
        img = png_bytes()
        assert c.post("/v1/detect", files=upload(("a.png", img))).status_code == 401
        assert c.post("/v1/detect", files=upload(("a.png", img)), headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/v1/model").status_code == 401
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        r = c.post("/v1/detect", files=upload(("a.png", img)), headers={"X-API-Key": "s3cret-key"})
        assert r.status_code == 200
        # health and the page stay open (the page asks for the key itself)
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200
        spec = c.get("/openapi.json").json()
        assert "X-API-Key" in str(spec["components"]["securitySchemes"])


# ---------------------------------------------------------------------------- overload and timeouts
def test_full_queue_is_503_with_retry_after(tiny_detector):
    gated = GatedDetector(tiny_detector)
    with make_client(gated, max_queue=1, max_wait_ms=0) as c:
        out = {}
        first = threading.Thread(target=lambda: out.__setitem__(1, c.post("/v1/detect", files=upload(("1.png", png_bytes())))))
        first.start()
        assert gated.entered.wait(10)  # request 1 is inside the encoder
        second = threading.Thread(target=lambda: out.__setitem__(2, c.post("/v1/detect", files=upload(("2.png", png_bytes())))))
        second.start()
        batcher = c.app.state.service.batcher
        wait_until(lambda: batcher.depth == 1)  # request 2 fills the queue
        r = c.post("/v1/detect", files=upload(("3.png", png_bytes())))
        assert r.status_code == 503 and r.headers["Retry-After"] == "2"
        assert "queue full" in r.json()["detail"] and r.json()["reason"] == "busy"
        gated.gate.set()
        first.join(30)
        second.join(30)
        assert out[1].status_code == 200 and out[2].status_code == 200
        assert c.post("/v1/detect", files=upload(("4.png", png_bytes()))).status_code == 200


def test_too_many_requests_in_flight_is_503(tiny_detector):
    gated = GatedDetector(tiny_detector)
    with make_client(gated, max_concurrent_requests=1, max_wait_ms=0) as c:
        t = threading.Thread(target=lambda: c.post("/v1/detect", files=upload(("1.png", png_bytes()))))
        t.start()
        assert gated.entered.wait(10)
        r = c.post("/v1/detect", files=upload(("2.png", png_bytes())))
        assert r.status_code == 503 and "Retry-After" in r.headers
        gated.gate.set()
        t.join(30)
        assert c.app.state.service.in_flight == 0


def test_memory_budget_is_503(tiny_detector):
    small = png_bytes((48, 48))  # each fits the per-file limit; together they exceed the budget
    assert 5_000 < len(small) <= 10_000
    with make_client(tiny_detector, max_file_bytes=10_000, memory_budget_bytes=10_000) as c:
        r = c.post("/v1/detect", files=upload(("a.png", small), ("b.png", small)))
        assert r.status_code == 503 and "memory budget" in r.json()["detail"] and r.json()["reason"] == "busy"
        assert c.app.state.service.budget.used == 0
        assert c.post("/v1/detect", files=upload(("a.png", png_bytes((16, 16))))).status_code == 200


def test_score_timeout_is_503_and_frees_the_request(tiny_detector):
    gated = GatedDetector(tiny_detector)
    with make_client(gated, score_timeout_s=0.2, max_wait_ms=0) as c:
        r = c.post("/v1/detect", files=upload(("a.png", png_bytes())))
        assert r.status_code == 503 and "longer than" in r.json()["detail"] and r.json()["reason"] == "timeout"
        gated.gate.set()
        assert c.app.state.service.in_flight == 0


def test_slow_upload_times_out_with_408(tiny_detector):
    app = create_app(tiny_detector, ServerSettings(read_timeout_s=0.2))
    boundary = b"bnd"
    sent = []

    async def scenario():
        first = True

        async def receive():
            nonlocal first
            if first:
                first = False
                head = b"--bnd\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
                return {"type": "http.request", "body": head, "more_body": True}
            await asyncio.sleep(3600)  # a client that stops sending

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/detect", "raw_path": b"/v1/detect", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary)],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        app.state.service.start()
        try:
            await asyncio.wait_for(app(scope, receive, send), 10)
        finally:
            app.state.service.close()

    asyncio.run(scenario())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408


# ---------------------------------------------------------------------------- the batcher alone
def echo_scores(views):
    """logit = mean pixel value of each view; contributions = [logit, 1]."""
    m = views.reshape(len(views), -1).mean(axis=1).astype(np.float32)
    return m, np.stack([m, np.ones_like(m)], axis=1)


def views_of(value, n=1):
    return np.full((n, 4, 4, 3), value, dtype=np.uint8)


def test_batcher_splits_results_per_item():
    # The window is long and the batch fills at exactly 13 views: one batch however slowly the
    # three submits arrive (a 0.2 s window could close between them on a loaded machine).
    b = Batcher(echo_scores, max_batch=13, max_wait_s=60, max_queue=16).start()
    try:
        futures = [b.submit(views_of(v, n)) for v, n in [(1, 1), (2, 10), (3, 2)]]
        out = [f.result(10) for f in futures]
    finally:
        b.close()
    assert [o.logits.tolist() for o in out] == [[1.0], [2.0] * 10, [3.0] * 2]
    assert out[1].contributions.shape == (10, 2)
    assert b.batches == 1 and b.largest_batch == 13


def test_batcher_respects_max_batch_and_bounds():
    gate, entered = threading.Event(), threading.Event()
    sizes = []

    def gated(views):
        sizes.append(len(views))
        entered.set()
        assert gate.wait(30)
        return echo_scores(views)

    b = Batcher(gated, max_batch=4, max_wait_s=0.0, max_queue=3).start()
    try:
        first = b.submit(views_of(0, 2))
        assert entered.wait(10)  # the worker holds `first`; the queue is empty again
        queued = [b.submit(views_of(i, 2)) for i in range(1, 4)]
        with pytest.raises(Overloaded, match="queue full"):
            b.submit(views_of(9, 2))
        gate.set()
        assert first.result(10).logits.tolist() == [0.0, 0.0]
        assert [f.result(10).logits[0] for f in queued] == [1.0, 2.0, 3.0]
    finally:
        gate.set()
        b.close()
    assert sizes == [2, 4, 2]  # 3 queued images of 2 views: 4 views, then the rest
    assert b.rejected == 1
    with pytest.raises(Overloaded):
        b.submit(views_of(0))  # closed
    with pytest.raises(ValueError):
        Batcher(echo_scores, max_batch=0)
    other = Batcher(echo_scores).start()
    with pytest.raises(ValueError):
        other.submit(np.zeros((1, 4, 4, 3), dtype=np.float32))
    other.close()


def test_batcher_close_fails_work_a_stuck_encoder_never_took():
    gate, entered = threading.Event(), threading.Event()

    def stuck(views):
        entered.set()
        gate.wait(30)
        return echo_scores(views)

    b = Batcher(stuck, max_wait_s=0.0).start()
    b.submit(views_of(1))
    assert entered.wait(10)
    waiting = b.submit(views_of(2))
    b.close(timeout=0.1)
    with pytest.raises(Overloaded, match="shutting down"):
        waiting.result(10)
    gate.set()


def test_batcher_skips_cancelled_and_reports_errors():
    calls = []

    def failing(views):
        calls.append(len(views))
        raise RuntimeError("encoder exploded")

    gate = threading.Event()
    # The encoder is held by a first item while the others queue: the cancel always lands
    # before the batcher could take the item (no timing window to win).
    b = Batcher(lambda v: gate.wait(10) and failing(v), max_batch=8, max_wait_s=0.0, max_queue=8).start()
    try:
        blocker = b.submit(views_of(0))
        wait_until(lambda: b.depth == 0)
        cancelled = b.submit(views_of(1))
        assert cancelled.cancel()
        kept = b.submit(views_of(2, 3))
        gate.set()
        with pytest.raises(ScoringFailed, match="RuntimeError"):  # the type, not the message
            kept.result(10)
        with pytest.raises(ScoringFailed):
            blocker.result(10)
    finally:
        gate.set()
        b.close()
    assert calls == [1, 3]  # the cancelled item is skipped; a lone image is not retried


def test_batcher_isolates_the_image_that_breaks_a_batch():
    calls = []

    def fails_on_13(views):
        calls.append(len(views))
        if (views == 13).any():
            raise ValueError("bad input")
        return echo_scores(views)

    gate = threading.Event()
    b = Batcher(lambda v: gate.wait(10) and fails_on_13(v), max_batch=16, max_wait_s=0.0, max_queue=8).start()
    try:
        first = b.submit(views_of(1))  # taken alone while the gate is shut; the others queue up
        wait_until(lambda: b.depth == 0)
        futures = [b.submit(views_of(v, n)) for v, n in [(2, 1), (13, 2), (4, 3)]]
        gate.set()
        assert first.result(10).logits.tolist() == [1.0]
        assert futures[0].result(10).logits.tolist() == [2.0]
        with pytest.raises(ScoringFailed, match="ValueError"):
            futures[1].result(10)
        assert futures[2].result(10).logits.tolist() == [4.0] * 3
    finally:
        b.close()
    assert calls == [1, 6, 1, 2, 3]  # the batch of three failed, then each was scored alone


def test_batcher_close_fails_waiting_work():
    b = Batcher(echo_scores)
    with pytest.raises(Overloaded):
        b.submit(views_of(1))  # not started
    b.start()
    f = b.submit(views_of(1))
    b.close()
    assert f.result(10).logits.tolist() == [1.0]  # finished before the worker stopped


# ---------------------------------------------------------------------------- the command
def test_cli_serve_options(monkeypatch):
    from rine.cli import build_parser, main
    from rine.cli.serve import settings_from_args

    parser = build_parser()
    args = parser.parse_args(["serve", "--max-file-mb", "1", "--max-request-mb", "2", "--max-batch", "8"])
    s = settings_from_args(args)
    assert s.max_file_bytes == 1024 * 1024 and s.max_batch == 8 and s.api_key is None
    monkeypatch.setenv("RINE_TEST_KEY", "k1")
    s = settings_from_args(parser.parse_args(["serve", "--api-key-env", "RINE_TEST_KEY"]))
    assert s.api_key == "k1" and "k1" not in repr(s)
    monkeypatch.delenv("RINE_TEST_KEY")
    assert main(["serve", "--api-key-env", "RINE_TEST_KEY"]) == 2
    assert main(["serve", "--max-file-mb", "30", "--max-request-mb", "10"]) == 2
    assert main(["serve", "--port", "70000"]) == 2
    assert main(["serve", "--device", "gpu"]) == 2  # before listening, not in the background load


def test_allowed_hosts_against_dns_rebinding(tiny_detector, monkeypatch):
    from rine.cli import build_parser
    from rine.cli.serve import settings_from_args
    from rine.server.guards import LOOPBACK_HOSTS

    parser = build_parser()
    # Loopback without a key: only loopback names; with a key or on a network address: any;
    # --allowed-host adds names (a reverse proxy's public one).
    assert settings_from_args(parser.parse_args(["serve"])).allowed_hosts == LOOPBACK_HOSTS
    assert settings_from_args(parser.parse_args(["serve", "--host", "0.0.0.0"])).allowed_hosts is None
    monkeypatch.setenv("RINE_TEST_KEY", "k1")
    assert settings_from_args(parser.parse_args(["serve", "--api-key-env", "RINE_TEST_KEY"])).allowed_hosts is None
    # Names are kept without port or scheme; the server's own --host name is added.
    s = settings_from_args(parser.parse_args(["serve", "--allowed-host", "Rine.example.org:443",
                                              "--allowed-host", "https://other.example/", "--host", "box.lan"]))
    assert s.allowed_hosts == (*LOOPBACK_HOSTS, "rine.example.org", "other.example", "box.lan")
    from rine.cli import main

    assert main(["serve", "--allowed-host", "[bad"]) == 2  # a usage error, not a traceback
    img = png_bytes((32, 32))
    with make_client(tiny_detector, allowed_hosts=s.allowed_hosts) as c:
        r = c.post("/v1/detect", files=upload(("a.png", img)), headers={"Host": "evil.example:8000"})
        assert r.status_code == 421 and "--allowed-host" in r.json()["detail"]
        assert r.headers["x-content-type-options"] == "nosniff"  # the security headers wrap it
        assert c.get("/", headers={"Host": "evil.example"}).status_code == 421
        # Names given, and any IP literal (rebinding needs a name): loopback, other 127/8
        # addresses, IPv6 spellings, a server addressed by its IP; and HTTP/1.0 without Host.
        for host in ("127.0.0.1:8000", "localhost", "localhost.", "[::1]:8000", "RINE.example.org", "rine.example.org.",
                     "box.lan:8000", "127.0.0.2:8711", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]", "10.1.2.3", ""):
            assert c.post("/v1/detect", files=upload(("a.png", img)), headers={"Host": host}).status_code == 200, host


def test_rine_serve_exits_2_when_the_model_cannot_load(tmp_path, caplog):
    from rine.cli import main

    missing = tmp_path / "no-such-checkpoint"
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="rine.cli.serve"):
        assert main(["serve", "--port", "0", "--model", str(missing), "--no-access-log"]) == 2  # port 0: any free one
    assert time.monotonic() - t0 < 30  # it gave up instead of serving an unready model forever
    assert "without an API key" not in caplog.text  # loopback: no warning


def test_rine_serve_beyond_loopback_without_a_key_warns(tmp_path, caplog, monkeypatch):
    from rine.cli import main

    missing = str(tmp_path / "no-such-checkpoint")  # the server exits once the load fails
    with caplog.at_level("WARNING", logger="rine.cli.serve"):
        assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--model", missing, "--no-access-log"]) == 2
    assert "listening on 0.0.0.0 without an API key" in caplog.text
    caplog.clear()
    monkeypatch.setenv("RINE_TEST_KEY", "k1")
    with caplog.at_level("WARNING", logger="rine.cli.serve"):
        assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--model", missing, "--no-access-log",
                     "--api-key-env", "RINE_TEST_KEY"]) == 2
    assert "without an API key" not in caplog.text


def test_rine_serve_on_a_busy_port_says_so_before_serving(tiny_checkpoint_dir, capsys):
    import socket

    from rine.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", str(tiny_checkpoint_dir), "--no-access-log"]) == 2
    out, err = capsys.readouterr()
    assert "serving on" not in out and f"cannot listen on 127.0.0.1 port {port}" in err and "--port" in err, err


def test_serve_listens_on_every_address_of_its_host():
    import socket

    from rine.cli.serve import _listen

    sockets = _listen("", 0)  # all interfaces, as asyncio reads "": 0.0.0.0 and, where there is IPv6, ::
    try:
        families = {s.family for s in sockets}
        assert socket.AF_INET in families and len({s.getsockname()[1] for s in sockets}) == 1
        for s in sockets:
            if s.family == socket.AF_INET6:
                assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        with socket.create_connection(("127.0.0.1", sockets[0].getsockname()[1]), timeout=5):
            pass
    finally:
        for s in sockets:
            s.close()


def test_rine_serve_subprocess_with_api_key(tiny_checkpoint_dir, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    import httpx

    env = {**os.environ, "RINE_TEST_SERVE_KEY": "k-123"}
    # --port 0 and the port read from "serving on": a port found free, closed, then handed to
    # the child could be taken by another process in between.
    proc = subprocess.Popen(
        [sys.executable, "-m", "rine", "serve", "--port", "0", "--model", str(tiny_checkpoint_dir),
         "--api-key-env", "RINE_TEST_SERVE_KEY", "--no-access-log"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # "" if the child exits first
        assert "serving on http://127.0.0.1:" in line, (line, proc.poll())
        port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, 60)
        img = (OFFICIAL / "real_aadlygmazf.jpg").read_bytes()
        assert httpx.post(f"{base}/v1/detect", files=upload(("a.jpg", img))).status_code == 401
        r = httpx.post(f"{base}/v1/detect", files=upload(("a.jpg", img)), headers={"X-API-Key": "k-123"})
        assert r.status_code == 200 and r.json()["results"][0]["name"] == "a.jpg"
        # a body announced larger than the limit is refused without being read
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nX-API-Key: k-123\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000\r\n\r\n--b\r\n")
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
    finally:
        proc.terminate()
        proc.wait(15)
    assert "k-123" not in proc.stderr.read()
