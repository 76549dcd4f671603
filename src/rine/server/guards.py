"""Request guards of the HTTP service, apart from the app: security headers, the Host
allow-list (DNS rebinding) and the Origin check (cross-site uploads).

Pure functions and pure ASGI middleware: no state, no knowledge of the detector.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

# A browser page may only load what this server itself serves: no CDN, no fonts, no beacons.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


LOOPBACK_HOSTS = ("localhost",)


def host_name(value: str) -> str:
    """The host name of a Host value, an --allowed-host or a URL: lower case, no port, no
    brackets, no trailing dot ("Rine.Example.org.:443" -> "rine.example.org")."""
    value = value.strip()
    if "://" in value:
        value = urlsplit(value).netloc
    return host_port(value)[0].lower()


class AllowedHosts:
    """Pure ASGI: 421 for a request whose `Host` names none of `hosts`, or is no host[:port].

    IP literals always pass (DNS rebinding needs a name that the attacker controls), and
    so does a request without Host (HTTP/1.0, which no browser sends). The header is read as
    the token RFC 9110 allows (`host[:port]`), not as a URL: a URL parser finds `localhost`
    in `evil.example@localhost` or `localhost#x`."""

    def __init__(self, app, hosts: tuple[str, ...], on_refusal=None):
        self.app = app
        self.hosts = {host_name(h) for h in hosts}
        self.on_refusal = on_refusal  # called with the refusal's status (the metrics count it)

    def allowed(self, host_header: str) -> bool:
        if not host_header.strip():
            return True
        host = host_port(host_header)[0].lower()
        if not host:
            return False  # malformed: not a host[:port] token
        if host in self.hosts:
            return True
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not self.allowed(host):
                detail = ("this server does not answer to the host name in the request; start it with "
                          "--allowed-host NAME to add one")
                if self.on_refusal is not None:
                    self.on_refusal(421)
                return await JSONResponse({"detail": detail}, status_code=421)(scope, receive, send)
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Pure ASGI (no body buffering): no MIME sniffing anywhere, a strict CSP on the page."""

    def __init__(self, app, page_csp: str = PAGE_CSP):
        self.app = app
        self.page_csp = page_csp.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        page = path == "/" or path.startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                if page:
                    headers.append((b"content-security-policy", self.page_csp))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 9110 Host = uri-host [":" port]: a DNS name or IPv4 address, or an IPv6 literal in
# brackets. No userinfo, path, query, fragment or space: what is not this is no host at all.
_HOST_TOKEN = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})))"
                         r"(?::(?P<port>[0-9]{1,5}))?")


def host_port(netloc: str) -> tuple[str, int | None]:
    """("host", port or None) of a Host-style value such as `example.org:8443` or `[::1]:80`;
    ("", None) for anything that is not such a token (`evil@localhost`, `localhost#x`, `[bad`)."""
    m = _HOST_TOKEN.fullmatch(netloc.strip())
    if m is None:
        return "", None
    port = int(m["port"]) if m["port"] is not None else None
    if port is not None and port > 65535:
        return "", None
    if m["ip6"] is not None:
        try:
            ipaddress.IPv6Address(m["ip6"])
        except ValueError:
            return "", None
        return m["ip6"].lower(), port
    return m["name"].rstrip(".").lower(), port


def same_site(headers) -> bool:
    """Whether a browser request comes from this server's own site (True without `Origin`).

    A multipart form POST needs no CORS preflight, so without this any web page open in
    a browser on this machine could make a loopback server decode and score what it
    sends (it could not read the answer). Browsers name the sending page in `Origin`;
    clients outside a browser (curl, scripts) send none and are not affected, nor is
    this server's own page. Behind a reverse proxy the site is named by `X-Forwarded-Host`
    (or `Forwarded: host=`), which a page cannot set on a request that skips the
    preflight; a `Host` without a port (nginx's `$host`) matches the site on any port.
    """
    origin = headers.get("origin")
    if origin is None:
        return True
    try:
        o = urlsplit(origin)
        o_host = (o.hostname or "").rstrip(".")
    except ValueError:  # not a URL: no site to match
        o, o_host = None, ""
    try:
        o_port = o.port if o.port is not None else _DEFAULT_PORTS.get(o.scheme)
    except (ValueError, AttributeError):
        o_port = None
    claims = [headers.get("host", ""), headers.get("x-forwarded-host", "").split(",")[0]]
    for part in headers.get("forwarded", "").split(","):
        for pair in part.split(";"):
            key, _, value = pair.strip().partition("=")
            if key.lower() == "host":
                claims.append(value.strip('"'))
    for claim in filter(None, (c.strip() for c in claims)):
        host, port = host_port(claim)
        if host and host == o_host and (port is None or port == o_port):
            return True
    return False
