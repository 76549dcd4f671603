"""A stand-in for the two remote sources the tool downloads from, served on 127.0.0.1.

* Hugging Face Hub: `HEAD|GET /{owner}/{name}/resolve/{revision}/{file}` with the headers
  huggingface_hub reads (`X-Repo-Commit`, `ETag`), 404 + `X-Error-Code: EntryNotFound`
  for absent files, and `/api/models/{owner}/{name}[/revision/{rev}]` metadata.
* GitHub raw files: `GET /raw/{path}` for the official head checkpoints.

Real HTTP on loopback: the download code runs unmodified against it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LoopbackHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.raw: dict[str, bytes] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_repo_folder(self, repo_id: str, folder: Path) -> str:
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
        self.repos[repo_id] = files
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        self.commits[repo_id] = commit
        return commit

    def __enter__(self) -> LoopbackHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(f"{h.command} {h.path}")
        path = h.path.split("?")[0]
        if path.startswith("/raw/"):
            data = self.raw.get(path[len("/raw/") :])
            return self._send(h, 200, data, body) if data is not None else self._send(h, 404, b"", body)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m and m.group(1) in self.repos:
            repo = m.group(1)
            info = {
                "id": repo,
                "modelId": repo,
                "sha": self.commits[repo],
                "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])],
            }
            return self._send(h, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m or m.group(1) not in self.repos:
            return self._send(h, 404, b"", body, {"X-Error-Code": "RepoNotFound"})
        repo, revision, filename = m.groups()
        if revision not in ("main", self.commits[repo]):
            return self._send(h, 404, b"", body, {"X-Error-Code": "RevisionNotFound"})
        data = self.repos[repo].get(filename)
        headers = {"X-Repo-Commit": self.commits[repo]}
        if data is None:
            return self._send(h, 404, b"", body, {**headers, "X-Error-Code": "EntryNotFound"})
        headers["ETag"] = '"' + hashlib.sha256(data).hexdigest() + '"'
        return self._send(h, 200, data, body, headers)

    @staticmethod
    def _send(h, status: int, data: bytes | None, body: bool, headers: dict | None = None) -> None:
        data = data or b""
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
