"""Operations tests for `rine serve` (issue 27): logs that cannot be forged, request ids, JSON
logs, early refusals readable by clients that send first, corrupt AVIF, the OpenAPI contract,
the Host token, Prometheus metrics and the start of a graceful stop."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rine.server.app import create_app, stop_accepting  # noqa: E402
from rine.server.limits import ServerSettings  # noqa: E402
from rine.server.logs import JsonFormatter, RequestIdFilter, escape, request_id  # noqa: E402

from support.corrupt_images import corrupt_avif  # noqa: E402

MB = 1024 * 1024


def png_bytes(size=(48, 40), seed=0, fmt="PNG") -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def files(*items):
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


@contextlib.contextmanager
def collect_logs(level=logging.INFO, fmt: logging.Formatter | None = None):
    """Records of every logger, formatted by `fmt` (JSON by default), through a handler with the
    request-id filter, as `rine serve --log-format json` installs it: yields the list of lines."""
    lines: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = ListHandler(level)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(fmt or JsonFormatter())
    root = logging.getLogger()
    old_level, access = root.level, logging.getLogger("rine.server.access")
    old_access = access.level
    root.addHandler(handler)
    root.setLevel(min(level, old_level or level))
    access.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        access.setLevel(old_access)


# ---------------------------------------------------------------------------- defect 1: log injection
def test_request_controlled_text_cannot_forge_a_log_line(tiny_detector):
    with collect_logs(fmt=logging.Formatter("%(levelname)s %(name)s: %(message)s")) as lines, \
            TestClient(create_app(tiny_detector)) as c:
        r = c.get("/x%0aINFO%20rine.server.access:%20127.0.0.1%20POST%20/v1/detect%20200%1b[2J%00")
        assert r.status_code == 404
    access = [line for line in lines if line.startswith("INFO rine.server.access:")]
    assert len(access) == 1, access
    line = access[0]
    # one line, no control byte, the forged part visibly escaped
    assert "\n" not in line and "\x1b" not in line and "\x00" not in line
    assert "/x\\x0aINFO rine.server.access:" in line and "\\x1b[2J\\x00" in line


def test_escape():
    assert escape("a\nb\rc\x1b\x00\x7f\u202e\\") == "a\\x0ab\\x0dc\\x1b\\x00\\x7f\\u202e\\\\"
    assert escape("plain /v1/detect é") == "plain /v1/detect é"
    assert escape("x" * 600, 10) == "x" * 10 + "..."


# ---------------------------------------------------------------------------- request ids and JSON logs
def test_request_id_is_echoed_when_safe_and_generated_otherwise(client_app):
    c = client_app
    r = c.get("/healthz", headers={"X-Request-ID": "trace-0af7651916cd43dd8448eb211c80319c"})
    assert r.headers["x-request-id"] == "trace-0af7651916cd43dd8448eb211c80319c"
    generated = set()
    for unsafe in ("a b", "x\x01y", "é".encode(), "-starts-with-dash", "y" * 129, ""):
        rid = c.get("/healthz", headers={"X-Request-ID": unsafe}).headers["x-request-id"]
        assert rid != unsafe and len(rid) == 32 and int(rid, 16) >= 0
        generated.add(rid)
    assert len(generated) == 6  # a new one each time, not a constant
    assert request_id("y" * 128) == "y" * 128
    # the refusals of the guards carry one too
    assert c.get("/nowhere").headers["x-request-id"]


@pytest.fixture
def client_app(tiny_detector):
    with TestClient(create_app(tiny_detector)) as c:
        yield c


class FailingEncoder:
    """The tiny detector whose encoder fails: the failure is logged by the encoder thread."""

    def __init__(self, detector):
        self.inner, self.config, self.threshold = detector, detector.config, detector.threshold

    def block_importance(self):
        return self.inner.block_importance()

    def score_views(self, views):
        raise RuntimeError("encoder broke")


def test_every_log_line_of_a_request_carries_its_id_in_json(tiny_detector, monkeypatch):
    from rine.server.service import Service

    prepare = Service.prepare

    def logging_prepare(self, *args, **kwargs):  # runs in the decode pool's threads
        logging.getLogger("rine.server.service").info("decoding in %s", threading.current_thread().name)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(Service, "prepare", logging_prepare)
    with collect_logs() as lines, TestClient(create_app(FailingEncoder(tiny_detector))) as c:
        r = c.post("/v1/detect", files=files(("a.png", png_bytes())), headers={"X-Request-ID": "req-42"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "req-42"
        c.get("/healthz", headers={"X-Request-ID": "req-43"})
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    mine = [e for e in entries if e["request_id"] == "req-42"]
    # the decode thread's line, the encoder thread's error line and the access line carry the id
    assert any(e["message"].startswith("decoding in rine-decode") for e in mine), entries
    assert any(e["logger"] == "rine.server.batching" and e["level"] == "ERROR" for e in mine), entries
    access = [e for e in mine if e["logger"] == "rine.server.access"]
    assert len(access) == 1
    a = access[0]
    assert (a["route"], a["status"], a["images"], a["method"], a["client"]) == ("/v1/detect", 500, 1, "POST", "testclient")
    assert a["ms"] > 0 and a["time"].endswith("Z") and a["level"] == "INFO"
    assert [e["request_id"] for e in entries if e["logger"] == "rine.server.access"] == ["req-42", "req-43"]


# ---------------------------------------------------------------------------- defect 2: early refusals
@contextlib.contextmanager
def served(app):
    """`app` on a real uvicorn server on loopback (a thread): the TCP behaviour TestClient skips."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5))
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_early_refusals_are_readable_by_clients_that_send_the_whole_body_first(tiny_detector):
    """urllib and requests send the whole body before reading the answer. A refusal sent before
    the body has arrived, on a connection that closes after it (urllib always sends
    `Connection: close`; so do many SDKs), closed the socket with unread data: the kernel
    resets it and the client gets ConnectionResetError (or BrokenPipe) instead of the answer."""
    import urllib.error
    import urllib.request

    requests = pytest.importorskip("requests")
    settings = ServerSettings(max_file_bytes=1 * MB, max_request_bytes=2 * MB, memory_budget_bytes=1 * MB,
                              api_key="k")
    data = np.random.default_rng(0).bytes(6 * MB)
    boundary = "rine-test-boundary"

    def body(*parts: bytes) -> bytes:
        return b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f{i}\"\r\n"
                        f"Content-Type: image/png\r\n\r\n".encode() + p + b"\r\n" for i, p in enumerate(parts)) \
            + f"--{boundary}--\r\n".encode()

    cases = [  # (what, body, key, expected status)
        ("413 from Content-Length", body(data), "k", 413),
        ("503 memory budget, mid-body", body(data[: 900 * 1024], data[MB : MB + 900 * 1024]), "k", 503),
        ("401 before reading", body(data[: 3 * MB]), None, 401),
    ]
    outcomes = []

    def via_urllib(url, payload, headers):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, payload, headers), timeout=60) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def via_requests(url, payload, headers):
        r = requests.post(url, data=payload, headers={**headers, "Connection": "close"}, timeout=60)
        return r.status_code, r.headers, r.content

    with served(create_app(tiny_detector, settings)) as base:
        for _ in range(4):
            for client in (via_urllib, via_requests):
                for what, payload, key, expected in cases:
                    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                               **({"X-API-Key": key} if key else {})}
                    try:
                        status, headers_back, content = client(f"{base}/v1/detect", payload, headers)
                        outcomes.append((client.__name__, what, status, expected))
                        assert json.loads(content)["detail"] and headers_back["x-request-id"]
                    except (OSError, requests.ConnectionError) as e:
                        outcomes.append((client.__name__, what, type(e).__name__, expected))
    failed = [o for o in outcomes if o[2] != o[3]]
    assert not failed, f"{len(failed)} of {len(outcomes)}: {failed[:6]}"


# ---------------------------------------------------------------------------- defect 3: corrupt AVIF
def test_corrupt_avif_is_a_corrupt_image_without_a_traceback(client_app, caplog):
    bad = corrupt_avif()
    with caplog.at_level(logging.DEBUG):
        r = client_app.post("/v1/detect", files=files(("broken.avif", bad)))
        several = client_app.post("/v1/detect", files=files(("broken.avif", bad), ("ok.png", png_bytes())))
    assert r.status_code == 422 and r.json()["detail"].startswith("corrupt or truncated image: ")
    assert [x["status"] for x in several.json()["results"]] == [422, 200]
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"


# ---------------------------------------------------------------------------- defect 4: the OpenAPI contract
def test_openapi_declares_every_answer_and_the_files_bounds(tiny_detector):
    settings = ServerSettings(api_key="k", allowed_hosts=("localhost",), max_files=7)
    with TestClient(create_app(tiny_detector, settings)) as c:
        spec = c.get("/openapi.json", headers={"Host": "localhost"}).json()
    detect = spec["paths"]["/v1/detect"]["post"]
    assert {"200", "400", "401", "403", "408", "413", "415", "421", "422", "500", "503"} <= set(detect["responses"])
    media = detect["requestBody"]["content"]["multipart/form-data"]
    field = media["schema"]["properties"]["files"]
    assert (field["minItems"], field["maxItems"]) == (1, 7)
    assert media["encoding"]["files"]["contentType"] == "image/*"
    assert {"401", "421", "503"} <= set(spec["paths"]["/v1/model"]["get"]["responses"])
    assert {"421", "503"} <= set(spec["paths"]["/readyz"]["get"]["responses"])
    assert {"401", "421"} <= set(spec["paths"]["/metrics"]["get"]["responses"])
    # without a key or a Host list, those answers cannot happen and are not declared
    with TestClient(create_app(tiny_detector, ServerSettings())) as c:
        plain = c.get("/openapi.json").json()["paths"]["/v1/detect"]["post"]["responses"]
    assert "401" not in plain and "421" not in plain and "413" in plain


# ---------------------------------------------------------------------------- defect 5: the Host token
def test_host_is_compared_as_a_host_port_token(tiny_detector):
    from rine.server.guards import host_port

    img = png_bytes()
    with TestClient(create_app(tiny_detector, ServerSettings(allowed_hosts=("localhost",)))) as c:
        for host in ("evil.example@localhost", "localhost#x", "[bad", "localhost/x", "localhost:8000@evil",
                     "localhost:99999", "local host", "[::1"):
            r = c.post("/v1/detect", files=files(("a.png", img)), headers={"Host": host})
            assert r.status_code == 421, host
        for host in ("localhost", "localhost:8000", "LOCALHOST.", "127.0.0.1:1", "[::1]:80"):
            assert c.post("/v1/detect", files=files(("a.png", img)), headers={"Host": host}).status_code == 200, host
        # each refusal is counted among the refusal kinds, not only by status
        assert value(scrape(c, Host="localhost"), "rine_request_refusals_total", kind="wrong_host") == 8
    assert host_port("Example.ORG.:8443") == ("example.org", 8443) and host_port("[::1]") == ("::1", None)
    assert host_port("a@b") == ("", None)


# ---------------------------------------------------------------------------- metrics
def scrape(c, **headers) -> dict[str, dict[tuple, float]]:
    """/metrics parsed by prometheus-client's own parser: {sample name: {labels: value}}."""
    r = c.get("/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(m, name, **labels) -> float:
    return m.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_parse_and_move_with_requests(client_app, tiny_detector):
    from rine.model.checkpoints import head_digest

    c = client_app
    before = scrape(c)
    assert value(before, "rine_ready") == 1.0
    info = next(labels for labels in before["rine_model_info"])
    assert dict(info)["name"] == "tiny-test" and dict(info)["head_digest"] == head_digest(tiny_detector.head)
    assert dict(info)["calibration"] == "none" and dict(info)["precision"]
    r = c.post("/v1/detect", files=files(("a.png", png_bytes()), ("b.png", png_bytes(seed=1)), ("c.txt", b"hello")))
    assert r.status_code == 200
    c.post("/v1/detect", content=b"x", headers={"content-type": "text/plain"})  # 415, refused as a whole
    after = scrape(c)
    assert value(after, "rine_images_scored_total") - value(before, "rine_images_scored_total") == 2
    assert value(after, "rine_image_refusals_total", kind="not_image") - value(before, "rine_image_refusals_total",
                                                                               kind="not_image") == 1
    assert value(after, "rine_request_refusals_total", kind="not_multipart") == 1
    detect_200 = dict(route="/v1/detect", method="POST", status="200")
    assert value(after, "rine_http_requests_total", **detect_200) - value(before, "rine_http_requests_total",
                                                                          **detect_200) == 1
    assert value(after, "rine_http_request_duration_seconds_count", route="/v1/detect") == 2
    assert value(after, "rine_batch_views_sum") >= 2 and value(after, "rine_batch_views_count") >= 1
    assert value(after, "rine_queue_wait_seconds_count") == 2  # one per image scored
    assert value(after, "rine_detect_images_per_request_sum") == 3
    assert value(after, "rine_upload_memory_limit_bytes") == ServerSettings().memory_budget_bytes
    assert value(after, "rine_detect_in_flight") == 0 and value(after, "rine_upload_memory_bytes") == 0


def test_metric_labels_stay_bounded_whatever_the_client_sends(client_app):
    c = client_app
    for i in range(40):
        c.get(f"/probe-{i}/{'x' * i}")
        c.request(f"M{i}X", "/healthz")
    m = scrape(c)
    series = m["rine_http_requests_total"]
    routes = {dict(k)["route"] for k in series}
    methods = {dict(k)["method"] for k in series}
    assert routes <= {"/healthz", "/metrics", "unmatched"} and "unmatched" in routes
    assert methods <= {"GET", "other"} and "other" in methods
    assert len(series) < 10


def test_metrics_need_the_key_unless_the_operator_opens_them(tiny_detector):
    with TestClient(create_app(tiny_detector, ServerSettings(api_key="k"))) as c:
        assert c.get("/metrics").status_code == 401
        assert scrape(c, **{"X-API-Key": "k"})["rine_ready"]
    with TestClient(create_app(tiny_detector, ServerSettings(api_key="k", metrics_open=True))) as c:
        assert scrape(c)["rine_ready"]
        assert c.post("/v1/detect", files=files(("a.png", png_bytes()))).status_code == 401  # the API still needs it
    with TestClient(create_app(tiny_detector, ServerSettings(metrics=False))) as c:
        assert c.get("/metrics").status_code == 404


def test_model_load_time_is_recorded(tiny_detector):
    def slow_factory():
        time.sleep(0.2)
        return tiny_detector

    with TestClient(create_app(detector_factory=slow_factory)) as c:
        deadline = time.monotonic() + 30
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        m = scrape(c)
    assert 0.2 <= value(m, "rine_model_load_seconds") < 30


# ---------------------------------------------------------------------------- graceful stop
def test_stopping_refuses_new_work_with_503(client_app):
    c = client_app
    assert c.post("/v1/detect", files=files(("a.png", png_bytes()))).status_code == 200
    stop_accepting(c.app)
    r = c.post("/v1/detect", files=files(("a.png", png_bytes())))
    assert r.status_code == 503 and r.json()["reason"] == "stopping" and r.headers["retry-after"]
    ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["reason"] == "stopping"
    assert c.get("/healthz").status_code == 200  # the process is still up
    assert value(scrape(c), "rine_request_refusals_total", kind="stopping") == 1


def test_cli_operations_flags():
    from rine.cli import build_parser
    from rine.cli.serve import settings_from_args

    parser = build_parser()
    args = parser.parse_args(["serve", "--log-format", "json", "--metrics-open", "--graceful-timeout", "3"])
    s = settings_from_args(args)
    assert (args.log_format, s.metrics, s.metrics_open, args.graceful_timeout) == ("json", True, True, 3)
    assert settings_from_args(parser.parse_args(["serve", "--no-metrics"])).metrics is False
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--log-format", "xml"])


@pytest.mark.slow
def test_sigterm_finishes_the_upload_in_flight_and_refuses_new_work(tiny_checkpoint_dir, tmp_path):
    """`rine serve --stop-delay`: after SIGTERM, /readyz and new uploads get 503 "stopping" while
    an upload already in flight is answered 200, and the process exits with status 0."""
    import os
    import re
    import signal
    import subprocess
    import sys

    import httpx

    from support.serve_proc import wait_ready

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rine", "serve", "--host", "127.0.0.1", "--port", "0", "--model",
             str(tiny_checkpoint_dir), "--stop-delay", "4", "--graceful-timeout", "20", "--threads", "1",
             "--log-format", "json"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 180
        while not (found := re.search(r"serving on (http://127\.0\.0\.1:(\d+))", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        base, port = found.group(1), int(found.group(2))
        proc.stderr = open(log)  # wait_ready reports the child's output from here
        wait_ready(base, proc, 180)
        boundary = b"rine-sigterm"
        body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
                + png_bytes() + b"\r\n--" + boundary + b"--\r\n")
        held = socket.create_connection(("127.0.0.1", port), timeout=60)
        held.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary="
                     + boundary + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:50])
        while httpx.get(f"{base}/readyz", timeout=10).json().get("in_flight") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["reason"] == "stopping"
        fresh = httpx.post(f"{base}/v1/detect", files=files(("b.png", png_bytes())), timeout=30)
        assert fresh.status_code == 503 and fresh.json()["reason"] == "stopping"
        held.sendall(body[50:])
        answer = b""
        while chunk := held.recv(65536):
            answer += chunk
        held.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert proc.wait(60) == 0, log.read_text()
        # --log-format json: every line of stdout and stderr is one JSON object, its own too
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        messages = [entry["message"] for entry in lines]
        assert messages[0].startswith("serving on http://127.0.0.1:") and "stopped by SIGTERM" in messages[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
