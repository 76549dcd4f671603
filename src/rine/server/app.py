"""The HTTP service's routes: `create_app(detector or detector_factory, settings)` -> FastAPI app.

Endpoints: `POST /v1/detect` (multipart field `files`, one or several images),
`GET /v1/model`, `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus), the web page at `/` and the OpenAPI
document at `/openapi.json` (FastAPI's browsable `/docs` is off: it loads its viewer
from a CDN, and the service is meant to work on an offline network).

The model's lifecycle is `service.Service`; the limits and the bounded upload reader are in
`limits.py`; the Host/Origin guards and security headers in `guards.py`; request ids, the
access line and early refusals in `access.py`; the metrics in `metrics.py`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from python_multipart.multipart import parse_options_header

from .access import N_IMAGES, AccessLog
from .client_side import (
    MODEL_URL,
    VENDOR_DIR,
    VENDOR_FILES,
    VENDOR_URL,
    WASM_CSP_SOURCE,
    ClientSide,
    client_info,
)
from .guards import PAGE_CSP, AllowedHosts, SecurityHeaders, same_site
from .limits import (
    FILES_FIELD,
    HTTPError,
    ServerSettings,
    _mb,
    _UploadReader,
)
from .metrics import ServiceMetrics, refusal_kind
from .service import Service, load_served

if TYPE_CHECKING:
    from ..inference.loading import ModelOptions

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STABILITY_FIELD = "stability"
API_KEY_HEADER = "X-API-Key"


# ---------------------------------------------------------------------- response models (OpenAPI)
class ImageResult(BaseModel):
    name: str
    status: int
    prob_fake: float | None = None
    logit: float | None = None
    is_fake: bool | None = None
    verdict: str | None = None  # real, synthetic, or uncertain (in the calibration's band)
    block_importance: list[float] | None = None
    error: str | None = None
    # with `error`: a stable token to tell refusals apart (too_large, empty, not_image, corrupt,
    # too_many_pixels, ..., scoring_failed), never the text
    error_kind: str | None = None
    threshold: float | None = None  # the cut that made is_fake (calibrated model, override or stability)
    # with the form field stability=true: conditions (name -> prob_fake), spread, flips, flipped, reason
    stability: dict[str, Any] | None = None
    # what the file declares about its origin (docs/provenance.md) and the combined decision
    provenance: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None


class DetectResponse(BaseModel):
    model: str
    threshold: float
    model_block_importance: list[float]
    results: list[ImageResult]


class ModelInfo(BaseModel):
    name: str
    backbone: str
    revision: str | None
    threshold: float
    calibration: dict[str, Any] | None = None
    crop: str
    image_size: int
    n_blocks: int
    block_importance: list[float]
    max_file_bytes: int
    max_files: int


class ErrorResponse(BaseModel):
    detail: str
    reason: str | None = None  # 503 only: loading, busy, timeout, failed or stopping


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Prometheus' classic text format, which every Prometheus version reads
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# ---------------------------------------------------------------------- the app
def create_app(
    detector: Any = None,
    settings: ServerSettings | None = None,
    *,
    model: ModelOptions | None = None,
    threshold: float | None = None,
    uncertain_band: float | None = None,
    detector_factory: Callable[[], Any] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
    client_side: ClientSide | None = None,
) -> FastAPI:
    """The FastAPI app around a loaded `Detector`, or one loaded in a background thread at
    startup from `model` (`ModelOptions`, through `rine.inference.loading.load_detector`, with
    the `threshold`/`uncertain_band` overrides) or by `detector_factory` (a test's hook); until
    then `/readyz` answers 503. Resources start with the
    app's lifespan: use `with TestClient(app)` in tests. `client_side` (an ONNX export, see
    `client_side.check_client_side`) lets the page score images in the browser."""
    settings = settings or ServerSettings()
    if model is not None:
        if detector is not None or detector_factory is not None:
            raise ValueError("give one of detector, model or detector_factory")
        detector_factory = functools.partial(load_served, model, threshold, uncertain_band)
    metrics = ServiceMetrics() if settings.metrics else None
    if metrics is not None and detector_factory is not None:
        detector_factory = _timed(detector_factory, metrics)
    service = Service(settings, detector, detector_factory, on_load_error)
    if metrics is not None:
        service.on_batch = metrics.observe_batch
        metrics.bind(lambda: service.in_flight, lambda: service.budget.used, settings.memory_budget_bytes,
                     lambda: service.batcher.depth if service.batcher is not None else 0, lambda: service.ready)
        if detector is not None:
            metrics.model_loaded(detector, None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="rine",
        summary="Detect synthetic (AI-generated) images with RINE (ECCV 2024).",
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their viewers from a CDN
        redoc_url=None,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.stopping = False  # set by stop_accepting(app): new work gets 503 "stopping"
    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="required when the server was started with an API key")
    expected_key = settings.api_key.encode() if settings.api_key else None

    if expected_key is None:
        async def check_key() -> None:  # no key asked for: the schema declares no security scheme
            return None
    else:
        async def check_key(key: str | None = Depends(key_header)) -> None:
            # Starlette decodes header bytes as latin-1: re-encoding gives the raw bytes back.
            given = (key or "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, expected_key):
                raise HTTPError(401, f"missing or wrong {API_KEY_HEADER} header")

    def require_ready() -> Service:
        if app.state.stopping:
            raise service.busy("server is shutting down; retry on another instance or after its restart",
                               "stopping")
        if not service.ready:
            if service.load_error is None:
                raise service.busy("model is loading", "loading")
            raise service.busy("model failed to load", "failed")
        return service

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        if metrics is not None:
            metrics.refused(refusal_kind(exc.status, exc.extra.get("reason")))
        return exc.response()

    # What the answers can be, declared for generated clients and fuzzers: 401 only with a key,
    # 421 only with a Host allow-list (both are this server's settings).
    guarded = {421: _error("the Host header names a host this server does not answer to (--allowed-host)")} \
        if settings.allowed_hosts is not None else {}
    keyed = {401: _error("missing or wrong X-API-Key")} if settings.api_key else {}
    unready = {503: _error("not ready (reason: loading, failed, busy, timeout or stopping); see Retry-After")}
    errors = {**guarded, **keyed, **unready}

    @app.get("/healthz", tags=["health"], summary="the process is up", responses=guarded)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    app.head("/healthz", include_in_schema=False)(healthz)  # uptime monitors use HEAD

    @app.get("/readyz", tags=["health"], summary="the model is loaded and the encoder is running",
             responses={**guarded, **unready})
    async def readyz() -> JSONResponse:
        if app.state.stopping:
            return JSONResponse({"ready": False, "detail": "server is shutting down", "reason": "stopping"},
                                status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        if not service.ready:
            detail = ("model is loading" if service.load_error is None
                      else f"model failed to load ({service.load_error}); see the server log")
            reason = "loading" if service.load_error is None else "failed"
            return JSONResponse({"ready": False, "detail": detail, "reason": reason}, status_code=503,
                                headers={"Retry-After": str(settings.retry_after_s)})
        return JSONResponse({"ready": True, "in_flight": service.in_flight,
                             "upload_bytes_held": service.budget.used, **service.batcher.stats()})

    @app.get("/v1/model", tags=["detect"], response_model=ModelInfo, responses=errors,
             dependencies=[Depends(check_key)], summary="the loaded model")
    async def model_info() -> dict[str, Any]:
        return require_ready().model_info()

    @app.post(
        "/v1/detect",
        tags=["detect"],
        response_model=DetectResponse,
        dependencies=[Depends(check_key)],
        summary="probability that each uploaded image is synthetic",
        description=(
            f"multipart/form-data with one or more images in the repeatable field `{FILES_FIELD}`, and "
            f"optionally `{STABILITY_FIELD}=true`: each image is also scored after the everyday re-encodings of "
            "docs/stability.md (JPEG 90 and 70, a 1080 px downscale, WebP; about 5x the work), and its record "
            "gains `stability` and a verdict that is `uncertain` when one of them changes the answer. "
            "One record per image, in upload order. With several files, a file that cannot be "
            "scored gets `error` and its own `status` in a 200 answer; with one file, its error "
            "status is the answer's status (413 too large, 415 not an image, 422 undecodable)."
        ),
        responses={
            **errors,
            400: _error("malformed multipart body, invalid Content-Length, or a stability field not true or false"),
            403: _error("a browser request from a page of another site (Origin)"),
            408: _error("the request body did not arrive in time"),
            413: _error("a file, the body, the number of files or the pixels over a limit"),
            415: _error("not multipart/form-data, or (one file) not an image in a supported format"),
            422: _error("no files, or (one file) an empty, truncated or corrupt image"),
            500: _error("(one file) the encoder failed on this image"),
        },
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {
                "type": "object", "required": [FILES_FIELD],
                "properties": {FILES_FIELD: {
                    "type": "array", "minItems": 1, "maxItems": settings.max_files,
                    "items": {"type": "string", "format": "binary", "contentMediaType": "image/*"},
                }},
                # `stability` (true/false) is in the description, not here: Schemathesis mutates an
                # optional multipart field into an empty array, which is no part at all on the wire
                # (the same bytes as a valid request without it), and reports the 200 as a flaw.
            },
            # judged by content, not by this header; generated clients should still send an image
            "encoding": {FILES_FIELD: {"contentType": "image/*"}},
        }}}},
    )
    async def detect(request: Request):
        t_start = time.perf_counter()
        if not same_site(request.headers):
            raise HTTPError(403, "cross-origin request refused: this API takes uploads from its own page, "
                                 "or from clients outside a browser")
        svc = require_ready()
        boundary = _multipart_boundary(request.headers.get("content-type", ""))
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise HTTPError(400, "invalid Content-Length")
            if int(length) > settings.max_request_bytes:
                raise HTTPError(413, f"request body too large: {_mb(int(length))}, over the limit of "
                                     f"{_mb(settings.max_request_bytes)}")
        if svc.in_flight >= settings.max_concurrent_requests:
            raise svc.busy("server busy: too many requests in progress")
        svc.in_flight += 1
        reader = _UploadReader(settings, svc.budget)
        try:
            try:
                uploads = await asyncio.wait_for(reader.read(request, boundary), settings.read_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPError(408, f"request body not received within {settings.read_timeout_s:g} s") from None
            setattr(request.state, N_IMAGES, len(uploads))  # for the access log
            if not uploads:
                raise HTTPError(422, f"no images: send them in the multipart field '{FILES_FIELD}'")
            records = await svc.score_uploads(uploads, stability=_form_flag(reader.fields, STABILITY_FIELD))
        finally:
            reader.release()
            svc.in_flight -= 1
        if metrics is not None:
            metrics.observe_records(records)
        body = {
            "model": svc.detector.config.name,
            "threshold": svc.detector.threshold,
            "model_block_importance": svc._model_block_importance,
            "results": records,
        }
        # Server-Timing lets a client tell time spent here from time spent on the network.
        timing = {"Server-Timing": f"total;dur={1000 * (time.perf_counter() - t_start):.1f}"}
        if len(records) == 1 and records[0]["error"]:
            return JSONResponse({"detail": records[0]["error"], "error_kind": records[0]["error_kind"], **body}, status_code=records[0]["status"],
                                headers=timing)
        return JSONResponse(body, headers=timing)

    if metrics is not None:
        @app.get("/metrics", tags=["health"], response_class=Response,
                 dependencies=[] if settings.metrics_open else [Depends(check_key)],
                 responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                  "description": "Prometheus text format"},
                            **guarded, **({} if settings.metrics_open else keyed)},
                 summary="Prometheus metrics (with the API key unless started with --metrics-open)")
        async def metrics_text() -> Response:
            return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    page_csp = PAGE_CSP
    add_client_side_routes(app, client_side, settings, require_ready, check_key, errors)
    if client_side is not None:
        page_csp = PAGE_CSP.replace("script-src 'self'", f"script-src 'self' {WASM_CSP_SOURCE}")
    if settings.allowed_hosts is not None:  # added first: runs inside the security headers
        on_refusal = None if metrics is None else (lambda status: metrics.refused(refusal_kind(status, None)))
        app.add_middleware(AllowedHosts, hosts=settings.allowed_hosts, on_refusal=on_refusal)
    app.add_middleware(SecurityHeaders, page_csp=page_csp)
    # outermost: every answer is logged, counted and carries a request id, the guards' refusals too
    app.add_middleware(AccessLog, observe=metrics.observe_request if metrics is not None else None,
                       drain_bytes=settings.drain_bytes, drain_s=settings.read_timeout_s)
    return app


def stop_accepting(app: FastAPI) -> None:
    """Begin a graceful stop: /readyz and every new request that needs the model answer 503
    (reason `stopping`); requests already past that check are answered as usual."""
    app.state.stopping = True


def _timed(factory: Callable[[], Any], metrics: ServiceMetrics) -> Callable[[], Any]:
    """`factory` that records its load time and the model's identity in `metrics`."""

    def load() -> Any:
        t0 = time.perf_counter()
        detector = factory()
        metrics.model_loaded(detector, time.perf_counter() - t0)
        return detector

    return load


def add_client_side_routes(app: FastAPI, client: ClientSide | None, settings: ServerSettings,
                           require_ready: Callable[[], Service], check_key, errors: dict) -> None:
    """GET /v1/client-side (the page's settings; `enabled: false` without --client-side), and
    with it the export's model.onnx and onnxruntime-web's files. Fixed names only: a URL never
    becomes a file-system path."""

    @app.get("/v1/client-side", tags=["detect"], dependencies=[Depends(check_key)], responses=errors,
             summary="what the page needs to score images in the browser (rine serve --client-side)")
    async def client_side_info() -> dict[str, Any]:
        if client is None:
            return {"enabled": False}
        return {"enabled": True, **client_info(client, require_ready().detector, settings.max_pixels)}

    if client is None:
        return

    @app.get(MODEL_URL, include_in_schema=False, dependencies=[Depends(check_key)])
    async def client_side_model() -> FileResponse:
        return FileResponse(client.onnx_path, media_type="application/octet-stream",
                            headers={"Cache-Control": "no-cache"})  # revalidated: a new export may replace it

    @app.get(VENDOR_URL + "{name}", include_in_schema=False)
    async def vendor_file(name: str) -> FileResponse:
        media_type = VENDOR_FILES.get(name)
        if media_type is None:
            raise HTTPError(404, "not found")
        return FileResponse(VENDOR_DIR / name, media_type=media_type)


def _form_flag(fields: dict[str, bytes], name: str) -> bool:
    """A boolean form field as OpenAPI declares it: absent or `false` -> False, `true` -> True;
    anything else is a 400 (the schema says boolean, and a client's typo must not pass silently)."""
    if name not in fields:
        return False
    raw = fields[name].strip()
    if raw in (b"true", b"false"):
        return raw == b"true"
    raise HTTPError(400, f"form field '{name}' must be true or false")


def _multipart_boundary(content_type: str) -> bytes:
    ctype, options = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise HTTPError(415, f"send images as multipart/form-data in the field '{FILES_FIELD}'")
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise HTTPError(400, "multipart/form-data without a valid boundary")
    return boundary


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:
        return "0"
