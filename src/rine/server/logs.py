"""Logs the service can be trusted with: request ids, escaped request-controlled text, JSON lines.

- `request_id(header)`: the client's `X-Request-ID` when it is a safe token, else a new one.
  The id of the request being answered lives in a context variable (`current_request_id`),
  so that every log line of that request carries it, the decode pool's and the encoder's too
  (they run the request's work inside a copy of its context).
- `escape(text)`: request-controlled text (the decoded path, the method, a proxy-given client
  address) made safe for a line-oriented log: control and non-printable characters as `\\xNN`
  escapes, so that `GET /x%0aINFO ...` cannot forge a line, nor ESC sequences drive a terminal.
- `JsonFormatter`: one JSON object per line (`rine serve --log-format json`) with time, level,
  logger, message, request id and the access line's fields (route, status, images, ms, client).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("rine_request_id", default=None)

REQUEST_ID_HEADER = "X-Request-ID"
# What tracing systems put in X-Request-ID (UUIDs, hex, base64url, dotted/colon ids), bounded:
# anything else is replaced, never echoed, since the id goes into logs and a response header.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+/=-]{0,127}")
MAX_FIELD_CHARS = 512  # an escaped field longer than this is cut (a 64 KB path is no log line)
# the access line's fields, also read by the JSON formatter from a record's `extra`
ACCESS_FIELDS = ("method", "route", "path", "status", "images", "ms", "client")


def request_id(header: str | None) -> str:
    """The id for a request: its `X-Request-ID` when safe (`[A-Za-z0-9._:+/=-]`, at most
    128 characters, starting with a letter or digit), else a new random 32-hex-digit one."""
    if header and _SAFE_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def escape(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`text` with every character that is not printable (newlines, ESC, NUL, DEL, bidi
    controls, ...) and the backslash written as a Python escape, cut to `limit` characters."""
    out = []
    for ch in text[:limit]:
        if ch.isprintable() and ch != "\\":
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    if len(text) > limit:
        out.append("...")
    return "".join(out)


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` (None outside a request) on every record it sees; install it on
    a handler so that records from any logger carry the id of the request they belong to."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`,
    `message`, `request_id`, and for access lines `method`, `route`, `path`, `status`,
    `images`, `ms`, `client`; `exc` holds a traceback when one is logged. JSON escapes
    control characters itself, so no field can break the line."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id.get(),
        }
        for key in ACCESS_FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


def configure(log_format: str, handlers: list[logging.Handler] | None = None) -> None:
    """Give the handlers (default: the root logger's plain stream handlers, as
    `logging.basicConfig` makes them) the request-id filter, and with `log_format="json"` the
    JSON formatter; "text" keeps their format and appends ` [request_id]` to lines logged
    inside a request."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {log_format!r}")
    if handlers is None:  # not a test runner's capture handler (a StreamHandler subclass)
        handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    for handler in handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
        elif not isinstance(handler.formatter, _TextWithId):  # once, however often it is called
            handler.setFormatter(_TextWithId(handler.formatter))


class _TextWithId(logging.Formatter):
    """The handler's own text format, with ` [request_id]` appended inside a request."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter(logging.BASIC_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [{rid}]" if rid else line
