"""The outermost middleware: request id, answers readable by clients that send first, one log line.

One log line per request, on the logger `rine.server.access` (INFO):

    INFO rine.server.access: 127.0.0.1 POST /v1/detect 200 3 images 41.2 ms

The client address, method, path (never the query string), status, number of images
(detect requests) and the time to the end of the answer; request-controlled text (path,
method, a proxy-given client address) is escaped (`logs.escape`), so that a request cannot
forge a line. Never a header (the API key is one), a file name or any image content. The
same fields go into the record's `extra` for `--log-format json`. `rine serve` turns the
line on by default (`--no-access-log` turns it off); an app built with `create_app` logs
through the logging configuration of its host.

Every answer carries `X-Request-ID` (the client's when safe, else a new one), which is also
the `request_id` of every log record of that request.

A refusal sent before the request body has arrived (413 from Content-Length, 503, 401, 421,
...) is followed by `Connection: close`, and the rest of the body is read and dropped (at most
`drain_bytes`, for at most `drain_s`) before the answer ends: clients that send the whole body
before reading (urllib, requests, most SDKs) otherwise get a connection reset instead of the
answer, because closing a socket with unread data makes the kernel send RST.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .logs import REQUEST_ID_HEADER, current_request_id, escape, request_id

logger = logging.getLogger("rine.server.access")

N_IMAGES = "n_images"  # the key a route sets in the request's state (`request.state.n_images`)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

# (route template, method, status, seconds) of each answered request, for the metrics
Observer = Callable[[str, str, int, float], None]


def route_label(scope: dict) -> str:
    """A bounded name for the route that answered: the matched template (`/v1/detect`,
    `/static`), or `unmatched`; never the raw path, which the client chooses."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if scope.get("path", "").startswith("/static/"):
        return "/static"
    return "unmatched"


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class _Body:
    """What has been received of the request body, seen through the wrapped `receive`."""

    def __init__(self, scope: dict, receive):
        headers = dict(scope.get("headers") or [])
        self.receive_raw = receive
        length = headers.get(b"content-length")
        self.length = int(length) if length is not None and length.isdigit() else None
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self.done = not chunked and (self.length is None or self.length == 0)
        self.expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        self.received = 0

    async def receive(self) -> dict:
        message = await self.receive_raw()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.done = True
        elif message["type"] == "http.disconnect":
            self.done = True
        return message

    async def drain(self, limit: int, seconds: float) -> None:
        """Read and drop the rest of the body: at most `limit` bytes, for at most `seconds`."""
        deadline = time.monotonic() + seconds
        start = self.received
        while not self.done and self.received - start <= limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self.receive(), remaining)
            except asyncio.TimeoutError:
                return


class AccessLog:
    """Pure ASGI middleware (outermost): request id, body draining before an early answer,
    the access line and the per-request metrics (`observe`)."""

    def __init__(self, app: Any, observe: Observer | None = None, drain_bytes: int = 64 * 1024 * 1024,
                 drain_s: float = 30.0):
        self.app = app
        self.observe = observe
        self.drain_bytes = drain_bytes
        self.drain_s = drain_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = []
        scope.setdefault("state", {})  # shared with the routes' `request.state`
        headers = dict(scope.get("headers") or [])
        rid = request_id(headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1"))
        token = current_request_id.set(rid)
        body = _Body(scope, receive)
        early: list[bool] = []  # the answer started before the body was complete

        async def send_wrapped(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                extra = [(REQUEST_ID_HEADER.lower().encode(), rid.encode())]
                if not body.done:
                    early.append(True)
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif (message["type"] == "http.response.body" and not message.get("more_body", False)
                  and early and not body.done):
                # A client waiting for 100 Continue sends nothing more: there is nothing to drain;
                # one too slow to send its body in time (408) is not waited for a second time.
                if not (body.expects_continue and body.received == 0) and status[0] != 408:
                    too_long = body.length is not None and body.length - body.received > self.drain_bytes
                    if not too_long:
                        await body.drain(self.drain_bytes, self.drain_s)
            await send(message)

        try:
            await self.app(scope, body.receive, send_wrapped)
        finally:
            current_request_id.reset(token)
            # An exception that escaped every handler becomes a 500 in the server.
            code = status[0] if status else 500
            seconds = time.perf_counter() - start
            route, method = route_label(scope), method_label(scope.get("method", ""))
            if self.observe is not None:
                self.observe(route, method, code, seconds)
            if logger.isEnabledFor(logging.INFO):
                self._log(scope, rid, route, code, seconds)

    @staticmethod
    def _log(scope: dict, rid: str, route: str, code: int, seconds: float) -> None:
        n = scope["state"].get(N_IMAGES)
        images = "" if n is None else f" {n} image{'' if n == 1 else 's'}"
        client = scope.get("client")
        host = escape(str(client[0]), 64) if client else "-"
        method, path = escape(scope.get("method", "-"), 16), escape(scope.get("path", ""))
        ms = round(1000 * seconds, 1)
        logger.info("%s %s %s %d%s %.1f ms", host, method, path, code, images, ms,
                    extra={"request_id": rid, "method": method, "route": route, "path": path, "status": code,
                           "images": n, "ms": ms, "client": host})
