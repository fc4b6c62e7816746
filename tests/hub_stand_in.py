"""Test helper: a stand-in for the Hugging Face Hub on loopback, for ``huggingface_hub`` pointed at it.

It answers what ``hf_hub_download`` asks (``HEAD``/``GET`` of ``/<owner>/<name>/resolve/<rev>/<file>``
with the commit, ETag and size headers, ``Range`` for resuming) from repositories held in memory,
in the mirrors' layout (the file at the repository's root). It records every request, and can
cut a file's download short (``cut_once``) to test resuming. Anything else is a 404, as on the Hub.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["HubStandIn", "Request", "hub_stand_in"]

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")


@dataclass(frozen=True)
class Request:
    method: str
    repo_id: str
    filename: str
    range: str | None


@dataclass
class HubStandIn:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cut_once: dict[str, int] = field(default_factory=dict)  # filename -> bytes sent before the connection drops
    broken: set[str] = field(default_factory=set)  # filenames whose every later GET is dropped at once
    url: str = ""

    def gets(self, filename: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.filename == filename]


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

        def _not_found(self, code: str) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _answer(self, body: bool) -> None:
            match = _RESOLVE.match(self.path.split("?")[0])
            if match is None:
                self._not_found("EntryNotFound")
                return
            repo_id, filename = match["repo"], match["filename"]
            hub.requests.append(Request(self.command, repo_id, filename, self.headers.get("Range")))
            files = hub.repos.get(repo_id)
            if files is None:
                self._not_found("RepoNotFound")
                return
            if filename not in files:
                self._not_found("EntryNotFound")
                return
            data = files[filename]
            if body and filename in hub.broken:
                self.close_connection = True
                return  # dropped without a word
            start = 0
            ranged = self.headers.get("Range", "")
            if body and ranged.startswith("bytes="):
                start = int(ranged[len("bytes=") :].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", hashlib.sha1(repo_id.encode()).hexdigest())
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            cut = hub.cut_once.pop(filename, None)
            if cut is not None:
                self.wfile.write(data[start:cut])
                self.wfile.flush()
                hub.broken.add(filename)
                self.close_connection = True
                return
            self.wfile.write(data[start:])

        def do_HEAD(self) -> None:  # http.server calls them by these names
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

    return Handler


@contextmanager
def hub_stand_in(repos: dict[str, dict[str, bytes]]) -> Iterator[HubStandIn]:
    """A running stand-in on ``127.0.0.1`` (a free port), stopped afterwards; ``hub.url`` is its endpoint."""
    hub = HubStandIn(repos=repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
