"""The service's limits: settings, per-request and server-wide budgets, and the bounded multipart reader.

Uploads are parsed from the request stream by our own reader: parts stay in memory (never on
disk, never under the client's file name), every byte counts against the file, request and
server-wide memory limits, and a body that is too large is refused before or while it is
read, not after. Errors are `HTTPError`s, answered as JSON by the app.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse
from python_multipart.multipart import MultipartParser, parse_options_header

from ..data.decoding import DecodeOptions
from ..data.images import ImageLoadError
from ..provenance.types import TrustConfig

logger = logging.getLogger(__name__)

MB = 1024 * 1024
FILES_FIELD = "files"
FORM_FIELDS = ("stability",)  # the non-file fields a request may set (the others are ignored)


@dataclass
class ServerSettings:
    """Limits of the service. The defaults protect a small machine (2 cores, a few GB)."""

    max_file_bytes: int = 20 * MB  # one uploaded image
    max_request_bytes: int = 64 * MB  # a whole request body (all its files)
    max_files: int = 16  # images per request
    max_pixels: int = 40_000_000  # per image, checked from the header before decoding
    # All the images of one request, from their headers: a few KB of blank WebP can be a
    # 40 M-pixel image that takes a second to decode, so bytes alone do not bound the work.
    max_request_pixels: int = 200_000_000
    memory_budget_bytes: int = 512 * MB  # uploads held in memory by all requests together
    max_concurrent_requests: int = 256  # /v1/detect requests being read, decoded or scored
    decode_workers: int = field(default_factory=lambda: max(1, min(2, os.cpu_count() or 1)))
    max_batch: int = 32  # views per encoder batch (an image is 1 view, 10 with ten-crop)
    max_wait_ms: float = 10.0  # how long an idle encoder waits to fill a batch
    max_queue: int = 256  # images waiting for the encoder before 503
    read_timeout_s: float = 30.0  # to receive a whole request body
    score_timeout_s: float = 60.0  # from the end of the upload to the last score
    retry_after_s: int = 2  # advertised with every 503
    api_key: str | None = field(default=None, repr=False)
    # Names the `Host` header may carry (None: any). A loopback server without a key gets
    # the loopback names from `rine serve`: a page whose own name was re-pointed at
    # 127.0.0.1 (DNS rebinding) then cannot use it.
    allowed_hosts: tuple[str, ...] | None = None
    metrics: bool = True  # GET /metrics (Prometheus text format)
    metrics_open: bool = False  # /metrics answered without the API key (an operator's choice)
    # A refusal sent before the body has arrived reads and drops up to this much of the rest,
    # so that clients that send the whole body before reading get the answer, not a reset.
    drain_bytes: int = 64 * MB
    # What each upload declares about its origin (rine.provenance), beside its score; C2PA
    # manifests are verified against these anchors (None: no provenance in the results).
    trust: TrustConfig | None = field(default_factory=TrustConfig)

    def __post_init__(self) -> None:
        if self.max_request_bytes < self.max_file_bytes:
            raise ValueError("max_request_bytes must be at least max_file_bytes")
        for name in ("max_file_bytes", "max_files", "max_pixels", "max_request_pixels", "max_concurrent_requests",
                     "decode_workers",
                     "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (use None for no key)")
        if self.memory_budget_bytes < self.max_file_bytes:
            raise ValueError("memory_budget_bytes must be at least max_file_bytes, or such a file could never be held")
        if self.max_wait_ms < 0 or self.retry_after_s < 0 or self.drain_bytes < 0:
            raise ValueError("max_wait_ms, retry_after_s and drain_bytes must not be negative")
        if self.read_timeout_s <= 0 or self.score_timeout_s <= 0:
            raise ValueError("read_timeout_s and score_timeout_s must be positive")

    @property
    def decode(self) -> DecodeOptions:
        """The uploads' decoding as `DecodeOptions`: the per-image limits and the pool's threads
        (no per-image timeout: the request's `score_timeout_s` bounds decoding and scoring)."""
        return DecodeOptions(max_pixels=self.max_pixels, max_bytes=self.max_file_bytes, workers=self.decode_workers,
                             decoder="threads", timeout=None)


class HTTPError(Exception):
    """An error answered as JSON `{"detail": ...}` with its status (and headers)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers or {}, extra or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail, **self.extra}, status_code=self.status, headers=self.headers)


def load_error_status(kind: str) -> int:
    """HTTP status of an `ImageLoadError.kind`: 413 too big, 415 not an image, 422 broken."""
    if kind in ("too_large", "too_many_pixels"):
        return 413
    if kind in ("not_image", "bad_mode"):
        return 415
    return 422


def display_name(filename: str | None, index: int) -> str:
    """The client's file name, for display only: last path component, printable, bounded."""
    if not filename:
        return f"file {index + 1}"
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:200]
    return base or f"file {index + 1}"



def _mb(n: int) -> str:
    """Bytes as people read them in a limit: "20 MB (20971520 bytes)", "1.5 GB (...)"."""
    for unit, size in (("GB", 1024 * MB), ("MB", MB), ("KB", 1024)):
        if n >= size:
            return f"{f'{n / size:.1f}'.removesuffix('.0')} {unit} ({n} bytes)"
    return f"{n} bytes"


# ---------------------------------------------------------------------- upload reading
@dataclass
class _Upload:
    filename: str | None
    data: bytearray = field(default_factory=bytearray)
    size: int = 0
    too_large: bool = False


class _MemoryBudget:
    """Bytes of upload held in memory by all requests; touched only from the event loop."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


class _PixelBudget:
    """Pixels decoded for one request, reserved from each image's header (decode threads)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            if self.used + n > self.limit:
                raise ImageLoadError(
                    f"too many pixels in this request: this image's {n} would bring it over the limit of "
                    f"{self.limit} for all its images together; send it in another request", "too_many_pixels")
            self.used += n


class _UploadReader:
    """Streams a multipart body into in-memory `_Upload`s under the settings' limits."""

    MAX_OTHER_FIELD_BYTES = 64 * 1024  # non-file fields are ignored, but still bounded

    def __init__(self, settings: ServerSettings, budget: _MemoryBudget):
        self.settings, self.budget = settings, budget
        self.uploads: list[_Upload] = []
        self.fields: dict[str, bytes] = {}  # the values of FORM_FIELDS, bounded in total
        self._field: str | None = None
        self.held = 0  # bytes taken from the budget, given back by release()
        self.received = 0
        self._other_bytes = 0
        self._part: _Upload | None = None
        self._in_file = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._error: HTTPError | None = None

    # python-multipart callbacks: they run synchronously inside parser.write()
    def on_part_begin(self) -> None:
        self._part, self._in_file, self._disposition = None, False, b""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"")
        if name == FILES_FIELD.encode():
            if len(self.uploads) >= self.settings.max_files:
                raise HTTPError(413, f"too many files: at most {self.settings.max_files} per request")
            raw = options.get(b"filename")
            filename = raw.decode("utf-8", "replace") if raw is not None else None
            self._part = _Upload(display_name(filename, len(self.uploads)))
            self.uploads.append(self._part)
            self._in_file = True
        elif name.decode("utf-8", "replace") in FORM_FIELDS:  # others are read and dropped
            self._field = name.decode("utf-8")
            self.fields.setdefault(self._field, b"")  # present, even when empty

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if not self._in_file:
            self._other_bytes += n
            if self._other_bytes > self.MAX_OTHER_FIELD_BYTES:
                raise HTTPError(413, "form fields other than 'files' are too large")
            if self._field is not None:
                self.fields[self._field] = self.fields.get(self._field, b"") + data[start:end]
            return
        part = self._part
        assert part is not None
        part.size += n
        if part.too_large:
            return
        if part.size > self.settings.max_file_bytes:
            # Keep reading (the request cap still bounds it) so that the other files get results.
            part.too_large = True
            self.budget.give(len(part.data))
            self.held -= len(part.data)
            part.data = bytearray()
            return
        if not self.budget.take(n):
            raise HTTPError(503, "server busy: upload memory budget exhausted, retry later",
                            {"Retry-After": str(self.settings.retry_after_s)}, {"reason": "busy"})
        self.held += n
        part.data += data[start:end]

    def on_part_end(self) -> None:
        self._in_file, self._field = False, None

    async def read(self, request: Request, boundary: bytes) -> list[_Upload]:
        callbacks = {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
            "on_headers_finished", "on_part_data", "on_part_end")}
        parser = MultipartParser(boundary, callbacks)
        limit = self.settings.max_request_bytes
        try:
            async for chunk in request.stream():
                self.received += len(chunk)
                if self.received > limit:
                    raise HTTPError(413, f"request body too large: over the limit of {_mb(limit)}")
                parser.write(chunk)
            parser.finalize()
        except HTTPError:
            raise
        except Exception as e:  # python-multipart's parse errors, client disconnects
            logger.debug("bad multipart body", exc_info=True)
            raise HTTPError(400, f"malformed multipart body: {type(e).__name__}") from None
        return self.uploads

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0
        for up in self.uploads:
            up.data = bytearray()
