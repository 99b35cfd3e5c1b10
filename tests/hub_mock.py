"""A local stand-in for the Hugging Face Hub's HTTP API (the parts huggingface_hub's client uses to list a
repository and download files), served on 127.0.0.1 for from_pretrained tests."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse


class MockHub:
    def __init__(self) -> None:
        # repo_id -> revision -> path -> bytes
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.private: dict[str, str] = {}  # repo_id -> the token it needs
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_file(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        self.repos.setdefault(repo_id, {}).setdefault(revision, {})[path] = data

    def __enter__(self) -> MockHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(
                self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False
            ) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, code: int, error_code: str, head: bool) -> None:
                body = json.dumps({"error": error_code}).encode()
                self._send(code, body, {"X-Error-Code": error_code, "Content-Type": "application/json"}, head)

            def _repo(self, repo_id: str, revision: str, head: bool) -> dict[str, bytes] | None:
                auth = self.headers.get("Authorization")
                if repo_id not in hub.repos or (repo_id in hub.private and auth != f"Bearer {hub.private[repo_id]}"):
                    self._error(401, "RepoNotFound", head)
                    return None
                if revision not in hub.repos[repo_id]:
                    self._error(404, "RevisionNotFound", head)
                    return None
                return hub.repos[repo_id][revision]

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                u = urlparse(self.path)
                hub.requests.append((self.command, unquote(u.path), self.headers.get("Authorization")))
                parts = [unquote(p) for p in u.path.strip("/").split("/")]
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    files = self._repo(f"{parts[2]}/{parts[3]}", parts[5], head)
                    if files is None:
                        return
                    prefix = "/".join(parts[6:])
                    recursive = parse_qs(u.query).get("recursive", ["False"])[0].lower() == "true"
                    entries, dirs = [], set()
                    for path, data in sorted(files.items()):
                        if prefix and not path.startswith(prefix + "/"):
                            continue
                        rest = path[len(prefix) + 1 :] if prefix else path
                        if "/" in rest and not recursive:
                            dirs.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                            continue
                        for i in range(1, rest.count("/") + 1):
                            dirs.add((prefix + "/" if prefix else "") + "/".join(rest.split("/")[:i]))
                        entries.append(
                            {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        )
                    entries += [{"type": "directory", "path": d, "oid": "0" * 40} for d in sorted(dirs)]
                    self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
                    return
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, revision, path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
                    files = self._repo(repo_id, revision, head)
                    if files is None:
                        return
                    if path not in files:
                        self._error(404, "EntryNotFound", head)
                        return
                    data = files[path]
                    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
                    headers = {
                        "X-Repo-Commit": commit,
                        "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                        "Content-Type": "application/octet-stream",
                    }
                    rng = self.headers.get("Range")
                    if rng and rng.startswith("bytes=") and not head:
                        start = int(rng[6:].split("-")[0] or 0)
                        self._send(
                            206,
                            data[start:],
                            {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
                        )
                        return
                    self._send(200, data, headers, head)
                    return
                self._error(404, "NotFound", head)

        return Handler
