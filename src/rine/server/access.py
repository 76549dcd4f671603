"""One log line per request, on the logger `rine.server.access` (INFO):

    INFO rine.server.access: 127.0.0.1 POST /v1/detect 200 3 images 41.2 ms

The client address, method, path (never the query string), status, number of images
(detect requests) and the time to the end of the answer. Never a header (the API key is
one), a file name or any image content. `rine serve` turns it on by default
(`--no-access-log` turns it off); an app built with `create_app` logs through the
logging configuration of its host.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("rine.server.access")

N_IMAGES = "n_images"  # the key a route sets in the request's state (`request.state.n_images`)


class AccessLog:
    """Pure ASGI middleware: logs each HTTP request once it is answered (or has failed)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = []
        scope.setdefault("state", {})  # shared with the routes' `request.state`

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # An exception that escaped every handler becomes a 500 in the server.
            code = status[0] if status else 500
            n = scope["state"].get(N_IMAGES)
            images = "" if n is None else f" {n} image{'' if n == 1 else 's'}"
            client = scope.get("client")
            logger.info("%s %s %s %d%s %.1f ms", client[0] if client else "-", scope.get("method", "-"),
                        scope.get("path", ""), code, images, 1000 * (time.perf_counter() - start))  # fmt: skip
