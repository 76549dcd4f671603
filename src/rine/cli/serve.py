"""`rine serve`: the HTTP API and web page on one machine.

Examples:
  rine serve                                   # http://127.0.0.1:8000, default model
  rine serve --model ./my-checkpoint --port 9000
  RINE_API_KEY=... rine serve --host 0.0.0.0 --api-key-env RINE_API_KEY

The model loads in the background: /healthz answers at once, /readyz once the model
is ready. Beyond loopback, set an API key (read from an environment variable, never
from the command line, where any user could see it with `ps`).
Needs the `serve` extra: pip install 'rine[serve]'.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading

from .common import (
    CLIError,
    add_decision_options,
    add_model_options,
    check_device,
    cli_error,
    fail,
    model_options,
    pixel_count,
    resolve_backend,
)
from .provenance import add_trust_option, resolve_trust

logger = logging.getLogger(__name__)
MB = 1024 * 1024


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP API (POST /v1/detect) and the web page",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    n.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    n.add_argument("--api-key-env", metavar="NAME",
                   help="require the header X-API-Key to equal the value of this environment variable")
    n.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name clients may use in their requests (repeatable), e.g. the public name "
                        "a reverse proxy forwards in Host. Default: any, except that a loopback server "
                        "without an API key answers only to localhost and IP addresses (against DNS "
                        "rebinding). A port or scheme given here is ignored")
    n.add_argument("--no-access-log", action="store_true",
                   help="do not log each request (by default one line each on stderr: client address, method, "
                        "path, status, number of images, time; never headers, file names or image content)")
    ops = p.add_argument_group("operations")
    ops.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="text: one readable line per record, with [request id] inside a request; json: one "
                          "JSON object per line (time, level, logger, message, request_id, and for requests "
                          "route, status, images, ms, client) for a log pipeline (default text)")
    ops.add_argument("--no-metrics", action="store_true", help="do not serve Prometheus metrics at /metrics")
    ops.add_argument("--metrics-open", action="store_true",
                     help="answer /metrics without the API key (by default it needs the key when one is set); "
                          "for a scraper on a trusted network that cannot send headers")
    ops.add_argument("--graceful-timeout", type=float, default=10, metavar="S",
                     help="on SIGTERM: new requests get 503 at once, the ones in flight get up to S seconds "
                          "to finish (default 10)")
    ops.add_argument("--stop-delay", type=float, default=0, metavar="S",
                     help="on SIGTERM, keep listening S seconds before stopping, with /readyz and new requests "
                          "answered 503 (reason stopping), so that a load balancer takes this instance out "
                          "before it stops listening (default 0; a second signal stops at once)")
    add_model_options(p, batch_jobs=False)
    add_decision_options(p.add_argument_group("decision"))
    pv = p.add_argument_group("provenance")
    add_trust_option(pv)
    pv.add_argument("--no-provenance", action="store_true",
                    help="results without what each file declares about its origin (docs/provenance.md)")
    p.add_argument("--client-side", action="store_true",
                   help="let the page score images in the browser, with nothing uploaded: it downloads the "
                        "ONNX export given as --model DIR (at most 400 MB: ViT-B/32 and smaller) and "
                        "onnxruntime-web from this server; the page can still send images to the server "
                        "when the user chooses (docs/deployment.md)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-file-mb", type=float, default=20, help="largest image accepted, MB (default 20)")
    lim.add_argument("--max-request-mb", type=float, default=64, help="largest request body, MB (default 64)")
    lim.add_argument("--max-files", type=int, default=16, help="images per request (default 16)")
    lim.add_argument("--max-pixels", type=pixel_count, default=40_000_000, help="pixels per image (default 40M)")
    lim.add_argument("--max-request-pixels", type=pixel_count, default=200_000_000,
                     help="pixels of all the images of one request together, from their headers (default "
                          "200M: 16 photos of 12.5 MP); bounds the decoding work a small upload can ask for")
    lim.add_argument("--memory-budget-mb", type=float, default=512,
                     help="uploads held in memory by all requests together, MB; beyond it 503 (default 512)")
    lim.add_argument("--max-concurrent", type=int, default=256, help="detect requests in progress; beyond it 503 (default 256)")
    lim.add_argument("--timeout", type=float, default=60, help="seconds to score a request's images before 503 (default 60)")
    b = p.add_argument_group("batching")
    b.add_argument("--max-batch", type=int, default=32, help="views per encoder batch (an image is 1, or 10 with ten-crop; default 32)")
    b.add_argument("--max-wait-ms", type=float, default=10, help="how long an idle encoder waits to fill a batch (default 10)")
    b.add_argument("--max-queue", type=int, default=256, help="images waiting for the encoder; beyond it 503 (default 256)")
    b.add_argument("--decode-workers", type=int, default=None, help="image decoding threads (default: up to 2)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the encoder (default: torch's choice); on a small shared "
                        "machine 1 leaves cores to decoding and HTTP")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    """ServerSettings from the command line; CLIError for values that make no sense."""
    from ..server.guards import LOOPBACK_HOSTS, host_name
    from ..server.limits import ServerSettings

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise CLIError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty")
    # Names only (ports and schemes are dropped): IP literals, this server's own --host
    # among them, are always answered.
    names = [host_name(h) for h in args.allowed_host]
    if any(not n for n in names):
        raise CLIError(f"--allowed-host: give host names such as rine.example.org, not {args.allowed_host}")
    if names:
        own = host_name(args.host)  # `--host myname`: requests may use that name too
        allowed_hosts = (*LOOPBACK_HOSTS, *names, *([own] if own and not _is_ip(own) else []))
    elif _is_loopback(args.host) and api_key is None:
        allowed_hosts = LOOPBACK_HOSTS
    else:
        allowed_hosts = None
    kwargs = dict(
        allowed_hosts=allowed_hosts,
        max_file_bytes=int(args.max_file_mb * MB),
        max_request_bytes=int(args.max_request_mb * MB),
        max_files=args.max_files,
        max_pixels=args.max_pixels,
        max_request_pixels=args.max_request_pixels,
        memory_budget_bytes=int(args.memory_budget_mb * MB),
        max_concurrent_requests=args.max_concurrent,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        score_timeout_s=args.timeout,
        api_key=api_key,
        metrics=not args.no_metrics,
        metrics_open=args.metrics_open,
        trust=None if args.no_provenance else _trust(args),
    )
    if args.decode_workers is not None:
        kwargs["decode_workers"] = args.decode_workers
    try:
        return ServerSettings(**kwargs)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _trust(args: argparse.Namespace):
    try:
        return resolve_trust(args)
    except ValueError as e:
        raise CLIError(f"{e} (--trust-anchors or $RINE_TRUST_ANCHORS)") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server import logs
        from ..server.app import create_app, stop_accepting
    except ImportError as e:
        return fail(f"rine serve needs the serve extra ({e.name} is missing): pip install 'rine[serve]'")
    if not 0 <= args.port <= 65535:
        return fail("--port must be between 0 and 65535")
    if args.graceful_timeout < 0 or args.stop_delay < 0:
        return fail("--graceful-timeout and --stop-delay must not be negative")
    try:
        settings = settings_from_args(args)
        if resolve_backend(args) == "torch":  # ONNX Runtime checks its own providers
            check_device(args.device)  # now, not in the background load after "serving on"
    except CLIError as e:
        return fail(str(e))
    if args.head and args.model:
        return fail("give either --model or --backbone/--head, not both")
    if args.uncertain_band is not None and not 0.0 <= args.uncertain_band < 0.5:
        return fail(f"--uncertain-band must be within [0, 0.5), got {args.uncertain_band}")
    client_side = None
    if args.client_side:
        try:
            client_side = _client_side(args)
        except CLIError as e:
            return fail(str(e))
    if args.threads is not None:
        if args.threads < 1:
            return fail("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    if not _is_loopback(args.host) and settings.api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach it can use it "
                       "(see --api-key-env)", args.host)

    load_failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        load_failure.append(str(cli_error(e)))  # the library's parameters named as flags
        if server is not None:
            server.should_exit = True  # a server that can never be ready should not linger

    # One line per request by default, whatever -v says (uvicorn's own logs stay at warning).
    logging.getLogger("rine.server.access").setLevel(logging.WARNING if args.no_access_log else logging.INFO)
    logs.configure(args.log_format)
    # The server loads through the library's loader (rine.inference.loading) in the background.
    app = create_app(settings=settings, model=model_options(args), threshold=args.threshold,
                     uncertain_band=args.uncertain_band, on_load_error=on_load_error, client_side=client_side)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        access_log=False,  # rine's own line per request (server/access.py) replaces uvicorn's
        log_config=None,  # uvicorn's lines go through rine's handler: one format (--log-format)
        log_level="info" if args.verbose else "warning",
        # A last line of defence against connection floods; the app's own limits answer first.
        limit_concurrency=max(64, 4 * settings.max_concurrent_requests),
        timeout_keep_alive=5,
        server_header=False,
        timeout_graceful_shutdown=args.graceful_timeout,  # in-flight requests finish, then the encoder drains
    )

    class Server(uvicorn.Server):
        delayed: threading.Timer | None = None

        def handle_exit(self, sig, frame) -> None:
            # Before uvicorn stops listening: a request that arrives meanwhile, or on a connection
            # already open, gets 503 "stopping" instead of starting work that may be cut off.
            stop_accepting(app)
            if args.stop_delay > 0 and self.delayed is None:
                self.delayed = threading.Timer(args.stop_delay, super().handle_exit, (sig, frame))
                self.delayed.daemon = True
                self.delayed.start()
                return
            if self.delayed is not None:
                self.delayed.cancel()
            super().handle_exit(sig, frame)

    server = Server(config)
    try:
        sockets = _listen(args.host, args.port)
    except socket.gaierror as e:
        return fail(f"--host {args.host!r}: not an address of this machine ({e.strerror or e})")
    except OSError as e:
        return fail(f"cannot listen on {args.host} port {args.port}: {e.strerror or e}; pick another --port "
                    "(0: any free one) or stop what uses it")
    port = sockets[0].getsockname()[1]
    shown = _url_host(args.host or "0.0.0.0")
    _announce(args.log_format, f"serving on http://{shown}:{port} (model loading in the background)", sys.stdout)
    stopped: list[int] = []
    # SIGTERM is how service managers stop a server: uvicorn answers the requests in flight
    # (up to timeout_graceful_shutdown), then raises the signal again once it is done; this
    # handler takes that second delivery, so that a graceful stop exits with status 0.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append(sig)) if in_main else None
    try:
        server.run(sockets=sockets)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        for sock in sockets:
            sock.close()
    if load_failure:
        return fail(f"model failed to load: {load_failure[0]}")
    if stopped:
        _announce(args.log_format, "stopped by SIGTERM, after answering the requests in flight", sys.stderr)
    return 0


def _announce(log_format: str, message: str, stream) -> None:
    """A line of the server's own (its address, its stop): in the log's format, so that a
    collector reading `--log-format json` gets only JSON lines; the address line goes to
    stdout either way, where scripts read the port of `--port 0` from it."""
    if log_format == "json":
        from ..server.logs import JsonFormatter

        record = logging.LogRecord("rine.serve", logging.INFO, __file__, 0, message, None, None)
        print(JsonFormatter().format(record), file=stream, flush=True)
    else:
        print(f"rine: {message}", file=stream, flush=True)


def _client_side(args: argparse.Namespace):
    """The export the page will score with (`--client-side`), checked before serving; CLIError."""
    from ..config import CONFIG_NAME, RINEConfig
    from ..server.client_side import ClientSideError, check_client_side

    if resolve_backend(args) != "onnxruntime":
        raise CLIError("--client-side needs an ONNX export as --model DIR (the browser runs model.onnx): make "
                       "one with `rine export --format onnx --model NAME --out DIR`")
    try:
        # A calibration in config.json is applied by the page as by the server (client_info).
        config = RINEConfig.load(f"{args.model}/{CONFIG_NAME}")
        return check_client_side(args.model, args.crop or config.preprocess.crop)
    except (ClientSideError, ValueError, OSError) as e:
        raise CLIError(str(e)) from None


def _listen(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for every address of `host` ("" or "0.0.0.0"/"::" as asyncio
    reads them), so that a busy port is reported before "serving on" is. With port 0 they
    all take the port the first one got."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # unique, in order
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: "::" is IPv6 only, 0.0.0.0 has its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
