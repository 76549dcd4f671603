"""Prometheus metrics of the service (`GET /metrics`, prometheus-client's text format).

One registry per app (not prometheus-client's global one), so that several apps in one
process (tests) do not share counters. Every label takes values from a fixed set: the
route *template* (`/v1/detect`, `unmatched` for a path no route answers), the HTTP method
(or `other`), the status code, a refusal kind from this module's lists; never a raw path,
a file name, a header value or a client address, which would let clients grow the series
without bound. The model's identity (name, head digest, precision, calibration) is an info
metric set once per load.

Gauges that mirror the service's own counters (in-flight uploads, memory budget, encoder
queue) are read at scrape time, so nothing on the request path updates them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# A per-image error's status -> the refusal kind (the record's `status`: limits.load_error_status)
IMAGE_REFUSAL_KINDS = {413: "too_large", 415: "not_image", 422: "corrupt", 500: "scoring_failed"}
# 503 reasons (`reason` in the body) and other request-level refusals
REQUEST_REFUSAL_KINDS = frozenset({
    "loading", "failed", "busy", "timeout", "stopping",  # 503
    "request_too_large", "bad_request", "read_timeout", "unauthorized", "cross_origin", "not_multipart",
    "no_images", "wrong_host",
})

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_VIEW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IMAGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    """The service's metrics and the hooks that update them."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("rine_http_requests", "HTTP requests answered, by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("rine_http_request_duration_seconds", "time to the end of the answer, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.images_scored = Counter("rine_images_scored", "images scored (status 200 in their record)", registry=r)
        self.images_per_request = Histogram("rine_detect_images_per_request", "images uploaded per /v1/detect request",
                                            buckets=IMAGES_BUCKETS, registry=r)
        self.image_refusals = Counter("rine_image_refusals", "uploaded images that got an error record, by kind",
                                      ["kind"], registry=r)
        self.request_refusals = Counter("rine_request_refusals", "requests refused as a whole, by kind "
                                        "(503 reasons: loading, failed, busy, timeout, stopping)", ["kind"], registry=r)
        self.batch_views = Histogram("rine_batch_views", "views per encoder batch (the cross-request batcher)",
                                     buckets=BATCH_VIEW_BUCKETS, registry=r)
        self.queue_wait = Histogram("rine_queue_wait_seconds", "time an image waited in the batcher's queue "
                                    "before its encoder batch started", buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.in_flight = Gauge("rine_detect_in_flight", "/v1/detect requests being read, decoded or scored", registry=r)
        self.budget_used = Gauge("rine_upload_memory_bytes", "upload bytes held in memory by all requests", registry=r)
        self.budget_limit = Gauge("rine_upload_memory_limit_bytes", "the upload memory budget (--memory-budget-mb)",
                                  registry=r)
        self.queue_depth = Gauge("rine_queue_images", "images waiting for the encoder", registry=r)
        self.ready = Gauge("rine_ready", "1 once the model is loaded and the encoder runs, else 0", registry=r)
        self.load_seconds = Gauge("rine_model_load_seconds", "how long the model took to load", registry=r)
        self.model = Info("rine_model", "the loaded model: name, head digest, precision, calibration", registry=r)
        for kind in REQUEST_REFUSAL_KINDS:  # present at 0 from the start: rate() needs a first sample
            self.request_refusals.labels(kind)
        for kind in IMAGE_REFUSAL_KINDS.values():
            self.image_refusals.labels(kind)

    # ------------------------------------------------------------------ hooks
    def bind(self, in_flight: Callable[[], int], budget_used: Callable[[], int], budget_limit: int,
             queue_depth: Callable[[], int], ready: Callable[[], bool]) -> None:
        """Gauges read at scrape time from the service's own state."""
        self.in_flight.set_function(in_flight)
        self.budget_used.set_function(budget_used)
        self.budget_limit.set(budget_limit)
        self.queue_depth.set_function(queue_depth)
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """`access.Observer`: labels are already bounded (route template, method label)."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_records(self, records: list[dict[str, Any]]) -> None:
        """The records of one /v1/detect answer: images scored and per-image refusals."""
        self.images_per_request.observe(len(records))
        for rec in records:
            if rec["status"] == 200:
                self.images_scored.inc()
            else:
                self.image_refusals.labels(IMAGE_REFUSAL_KINDS.get(rec["status"], "other")).inc()

    def refused(self, kind: str) -> None:
        self.request_refusals.labels(kind if kind in REQUEST_REFUSAL_KINDS else "other").inc()

    def observe_batch(self, n_views: int, waits_s: list[float]) -> None:
        """`Batcher.on_batch`: called from the encoder thread (prometheus-client is thread-safe)."""
        self.batch_views.observe(n_views)
        for w in waits_s:
            self.queue_wait.observe(w)

    def model_loaded(self, detector: Any, seconds: float | None) -> None:
        from ..model.checkpoints import head_digest
        from .service import decision_rule

        if seconds is not None:
            self.load_seconds.set(seconds)
        head = getattr(detector, "head", None)
        try:
            digest = head_digest(head) if head is not None else "unknown"
        except Exception:  # noqa: BLE001 - a detector-like wrapper: identity is best effort
            digest = "unknown"
        rule = decision_rule(detector)
        public = rule.public()
        calibration = (public or {}).get("method") or ("threshold" if public else "none")
        self.model.info({"name": str(detector.config.name), "head_digest": digest,
                         "precision": str(getattr(detector, "precision", "unknown")),
                         "calibration": str(calibration), "threshold": f"{rule.threshold:g}"})

    def render(self) -> bytes:
        return generate_latest(self.registry)


def refusal_kind(status: int, reason: str | None) -> str:
    """The request-level refusal kind of an HTTPError (`reason` for 503s)."""
    if status == 503:
        return reason or "busy"
    return {400: "bad_request", 401: "unauthorized", 403: "cross_origin", 408: "read_timeout",
            413: "request_too_large", 415: "not_multipart", 421: "wrong_host", 422: "no_images"}.get(status, "other")
