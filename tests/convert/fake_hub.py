"""A fake Hugging Face hub on 127.0.0.1 for the download tests.

It implements the three requests huggingface-hub makes for a verified download: the model info listing
with LFS metadata (`GET /api/models/{repo}/revision/{rev}?blobs=true`), and `HEAD`/`GET` of
`/{repo}/resolve/{rev}/{file}` with the headers the real hub sends (X-Repo-Commit, ETag, X-Linked-Etag,
X-Linked-Size, Content-Length) and byte ranges (206 + Content-Range). Faults are switched on per test:
serve different bytes than advertised, cut a response after some bytes, or answer 503; a throttle makes a
download slow enough to watch.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/?]+))?$")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = COMMIT
    corrupt: set[str] = field(default_factory=set)  # served with one byte flipped
    cut_after: dict[str, int] = field(default_factory=dict)  # GET body stops after n bytes, then 503s
    unavailable: set[str] = field(default_factory=set)  # listed, but resolve answers 404
    throttle_bytes_per_s: float | None = None  # file bodies trickle out at this rate

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[LoggedRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, file_name: str) -> list[LoggedRequest]:
        return [r for r in self.log if r.method == "GET" and r.path.endswith("/" + file_name)]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, *, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            hub.log.append(LoggedRequest(self.command, path, self.headers.get("Range")))
            if (info := _INFO.match(path)) is not None:
                self._model_info(info["repo"])
            elif (resolve := _RESOLVE.match(path)) is not None:
                self._resolve(resolve["repo"], resolve["path"], head=head)
            else:
                self._error(404, "Not found", "EntryNotFound", None)

        def _model_info(self, repo_id: str) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, f"Repository {repo_id} not found", "RepoNotFound", None)
                return
            siblings = [
                {
                    "rfilename": name,
                    "size": len(data),
                    "blobId": hashlib.sha1(data).hexdigest(),
                    "lfs": {"size": len(data), "sha256": repo.sha256(name), "pointerSize": 134},
                }
                for name, data in sorted(repo.files.items())
            ]
            body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "siblings": siblings})
            self._send(200, body.encode(), {"Content-Type": "application/json"}, head=False)

        def _resolve(self, repo_id: str, file_path: str, *, head: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, f"Repository {repo_id} not found", "RepoNotFound", None)
                return
            if file_path not in repo.files or file_path in repo.unavailable:
                self._error(404, f"Entry {file_path} not found", "EntryNotFound", repo.commit)
                return
            data = repo.files[file_path]
            if file_path in repo.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            sha = repo.sha256(file_path)
            headers = {
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{sha}"',
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "Accept-Ranges": "bytes",
            }
            start = 0
            status = 200
            if (wanted := self.headers.get("Range")) and not head:
                start = int(re.match(r"bytes=(\d+)-", wanted)[1])  # type: ignore[index]
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            cut = repo.cut_after.get(file_path)
            if cut is not None and not head:
                if cut < 0:  # the cut already happened once: the hub is now down
                    self._error(503, "Service unavailable", None, None)
                    return
                repo.cut_after[file_path] = -1
                headers["Content-Length"] = str(len(body))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(status, body, headers, head=head, length=len(body), throttle=repo.throttle_bytes_per_s)

        def _error(self, status: int, message: str, code: str | None, commit: str | None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": message}).encode(), headers, head=self.command == "HEAD")

        def _send(
            self,
            status: int,
            body: bytes,
            headers: dict[str, str],
            *,
            head: bool,
            length: int | None = None,
            throttle: float | None = None,
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if head:
                return
            if throttle is None:
                self.wfile.write(body)
                return
            block = 1 << 20
            for start in range(0, len(body), block):
                self.wfile.write(body[start : start + block])
                time.sleep(min(block, len(body) - start) / throttle)

    return Handler
