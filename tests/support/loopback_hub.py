"""A stand-in for the two remote sources the tool downloads from, served on 127.0.0.1.

* Hugging Face Hub: `HEAD|GET /{owner}/{name}/resolve/{revision}/{file}` with the headers
  huggingface_hub reads (`X-Repo-Commit`, `ETag`), 404 + `X-Error-Code: EntryNotFound`
  for absent files, and `/api/models/{owner}/{name}[/revision/{rev}]` metadata.
* Dataset repos (`add_dataset_folder`, any depth): `/api/datasets/{repo}[/revision/{rev}]`,
  `/api/datasets/{repo}/tree/{rev}` (what `snapshot_download` lists) and
  `/datasets/{repo}/resolve/{rev}/{file}`.
* Uploads: `POST /api/repos/create`, `/api/validate-yaml` (a card's header), `/api/models/{repo}/preupload/{rev}` (every file
  "regular", so contents come inline) and `/api/models/{repo}/commit/{rev}` (NDJSON);
  the committed files are then served like any model repo. `tokens` records the
  Authorization headers of writes.
* GitHub raw files: `GET /raw/{path}` for the official head checkpoints.

Real HTTP on loopback: the download code runs unmodified against it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class LoopbackHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.raw: dict[str, bytes] = {}
        self.datasets: dict[str, dict[str, bytes]] = {}
        self.dataset_commits: dict[str, str] = {}
        self.tokens: list[str | None] = []
        self.commit_messages: list[str] = []
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

            def do_POST(self) -> None:
                hub._post(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_repo_folder(self, repo_id: str, folder: Path) -> str:
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
        self.repos[repo_id] = files
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        self.commits[repo_id] = commit
        return commit

    def add_dataset_folder(self, repo_id: str, folder: Path) -> str:
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.datasets[repo_id] = files
        commit = hashlib.sha1(repo_id.encode() + b"".join(files.values())).hexdigest()
        self.dataset_commits[repo_id] = commit
        return commit

    def _set_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        self.repos[repo_id] = files
        commit = hashlib.sha1(repo_id.encode() + b"".join(files[k] for k in sorted(files))).hexdigest()
        self.commits[repo_id] = commit
        return commit

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        self.requests.append(f"POST {h.path}")
        path = h.path.split("?")[0]
        data = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.tokens.append(h.headers.get("Authorization"))
        if path == "/api/repos/create":
            payload = json.loads(data)
            repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
            if repo in self.repos:
                return self._send(h, 409, b'{"error": "exists"}', True, {"Content-Type": "application/json"})
            self._set_repo(repo, {})
            return self._send(h, 200, json.dumps({"url": f"{self.url}/{repo}", "name": repo}).encode(), True,
                              {"Content-Type": "application/json"})
        if path == "/api/validate-yaml":  # a README's metadata header, checked before a commit
            return self._send(h, 200, b'{"errors": [], "warnings": []}', True, {"Content-Type": "application/json"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if not m or m.group(1) not in self.repos:
            return self._send(h, 404, b"", True, {"X-Error-Code": "RepoNotFound"})
        repo, what = m.group(1), m.group(2)
        if what == "preupload":
            files = json.loads(data)["files"]
            out = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            return self._send(h, 200, json.dumps(out).encode(), True, {"Content-Type": "application/json"})
        files = dict(self.repos[repo])
        summary = ""
        for line in data.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"].get("summary", "")
            elif item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        commit = self._set_repo(repo, files)
        self.commit_messages.append(summary)
        out = {"commitUrl": f"{self.url}/{repo}/commit/{commit}", "commitOid": commit}
        return self._send(h, 200, json.dumps(out).encode(), True, {"Content-Type": "application/json"})

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
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m and m.group(1) in self.datasets:
            repo = m.group(1)
            info = {"id": repo, "sha": self.dataset_commits[repo],
                    "siblings": [{"rfilename": f} for f in sorted(self.datasets[repo])]}
            return self._send(h, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m and m.group(1) in self.datasets:
            files = self.datasets[m.group(1)]
            tree = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for f, d in sorted(files.items()) if not m.group(3) or f.startswith(m.group(3) + "/")]
            return self._send(h, 200, json.dumps(tree).encode(), body, {"Content-Type": "application/json"})
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, revision, filename = m.groups()
            if repo not in self.datasets:
                return self._send(h, 404, b"", body, {"X-Error-Code": "RepoNotFound"})
            if revision not in ("main", self.dataset_commits[repo]):
                return self._send(h, 404, b"", body, {"X-Error-Code": "RevisionNotFound"})
            data = self.datasets[repo].get(unquote(filename))
            headers = {"X-Repo-Commit": self.dataset_commits[repo]}
            if data is None:
                return self._send(h, 404, b"", body, {**headers, "X-Error-Code": "EntryNotFound"})
            headers["ETag"] = '"' + hashlib.sha256(data).hexdigest() + '"'
            return self._send(h, 200, data, body, headers)
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
