"""A fault-injecting HTTP proxy in front of a registry, and a second "blob storage" host.

:class:`FaultProxy` forwards every request to the upstream registry and, for the first N
matching requests of each armed fault, misbehaves instead:

* ``reset``: send a large (> 64 KiB) blob's headers and half its body, then reset the connection
  (TCP RST: the client may lose what it had not read yet);
* ``cut``: the same, but close the connection normally (FIN: the half sent stays readable);
* ``short``: send a blob body that is 100 bytes short with a matching Content-Length;
* ``wrong``: send a blob body of the right length with flipped bytes;
* ``error500``: answer 500 to any request;
* ``evil_error``: answer manifest GETs 400 with an error message holding a terminal escape
  sequence and a newline;
* ``endless_error``: answer 500 to any request, with a body that never ends (1 GiB at most);
* ``throttle``: answer 429 with ``Retry-After: 1`` to any request;
* ``schema1``: answer manifest GETs with a Docker schema 1 manifest;
* ``huge_manifest``: answer manifest GETs with an endless body (no Content-Length, 1 MiB
  blocks of JSON whitespace until the client hangs up or 1 GiB is sent);
* ``redirect``: redirect blob GETs to :class:`BlobHost` on another loopback address;
* ``redirect_loop``, ``redirect_file``: redirect blob GETs to themselves, or to ``file:///etc/passwd``;
* ``endless_blob``: a blob body without Content-Length that never ends (1 GiB at most);
* ``long_blob``: the blob, then 1 MiB more, with a Content-Length that says so;
* ``trickle``: a blob (with its right Content-Length) sent at one byte a second;
* ``http10``: a blob as an HTTP/1.0 answer whose body ends when the connection closes;
* ``notfound``: answer 404 to blob GETs;
* ``upload_elsewhere``: start blob uploads at a location on :class:`BlobHost`;
* Bearer faults: while one is armed, any request is answered 401 with a Bearer challenge and
  ``GET /token`` answers as the fault says: ``token_html`` (not JSON), ``token_list`` (a JSON
  list), ``token_number`` (``{"token": 5}``), ``token_empty`` (``{"token": ""}``), ``token_huge``
  (an endless JSON string), ``auth_loop`` (a token the registry keeps refusing);
  ``challenge_junk`` sends a challenge without a realm, ``realm_other_host`` names a realm on
  :class:`BlobHost`, ``realm_file`` a ``file://`` realm.

``documents`` maps a manifest reference (tag or digest) to ``(body, Content-Type)`` served in
place of the registry's, for hand-made manifests and indexes; ``blobs`` maps a digest to the
bytes served for it, for hand-made layers.

Faults are bounded (a count each), so a client with retries must eventually succeed, and
``fired`` records what happened for the assertions. Requests with a ``Range`` header are
listed in ``ranges``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from tests.services.registry import free_port

_BLOB = re.compile(r"^/v2/(.+)/blobs/(sha256:[a-f0-9]{64})$")
_MANIFEST = re.compile(r"^/v2/(.+)/manifests/([^/]+)$")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "proxy-authenticate", "upgrade"}


_BLOB_FAULTS = {
    "redirect_loop",
    "redirect_file",
    "endless_blob",
    "long_blob",
    "trickle",
    "http10",
    "notfound",
}
_TOKEN_BODIES = {
    "token_html": b"<html><body>Service Unavailable</body></html>",
    "token_list": b'["token", "x"]',
    "token_number": b'{"token": 5}',
    "token_empty": b'{"token": ""}',
}
_BEARER = {*_TOKEN_BODIES, "token_huge", "auth_loop", "challenge_junk", "realm_other_host", "realm_file"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up on a fault is the point, not news


class _Base:
    """A threaded HTTP server on ``host`` serving ``Handler``."""

    def __init__(self, host: str) -> None:
        self.port = free_port() if host == "127.0.0.1" else _free_port_on(host)
        self.url = f"http://{host}:{self.port}"
        self._server = _Server((host, self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def _free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BlobHost(_Base):
    """Serves blobs by digest on another loopback address (127.0.0.2) and records request headers."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.seen: list[dict[str, str]] = []
        super().__init__("127.0.0.2")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                host.seen.append(dict(self.headers))
                self.send_error(403)  # an upload there: refused, after recording who came

            def do_GET(self) -> None:
                host.seen.append(dict(self.headers))
                data = host.blobs.get(self.path.rsplit("/", 1)[-1])
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


class FaultProxy(_Base):
    """Forwards to ``upstream`` (``http://127.0.0.1:PORT``) and injects armed faults."""

    def __init__(self, upstream: str, blob_host: BlobHost | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.blob_host = blob_host
        self.armed: dict[str, int] = {}
        self.fired: collections.Counter[str] = collections.Counter()
        self.ranges: list[str] = []
        self.documents: dict[str, tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.token_requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._session = requests.Session()
        super().__init__("127.0.0.1")

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` for references."""
        return f"127.0.0.1:{self.port}"

    def arm(self, **counts: int) -> FaultProxy:
        """Arm faults, e.g. ``arm(reset=1, error500=2)``; returns self."""
        with self._lock:
            self.armed = dict(counts)
            self.fired.clear()
            self.ranges.clear()
            self.token_requests.clear()
        return self

    def _armed(self) -> set[str]:
        with self._lock:
            return {k for k, v in self.armed.items() if v > 0}

    def _take(self, fault: str) -> bool:
        with self._lock:
            if self.armed.get(fault, 0) > 0:
                self.armed[fault] -= 1
                self.fired[fault] += 1
                return True
        return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.headers.get("Range"):
                    proxy.ranges.append(self.headers["Range"])
                if self._bearer_fault():
                    return
                doc = _MANIFEST.match(self.path)
                if doc and doc.group(2) in proxy.documents:
                    data, ctype = proxy.documents[doc.group(2)]
                    digest = "sha256:" + hashlib.sha256(data).hexdigest()
                    self._reply(200, {"Content-Type": ctype, "Docker-Content-Digest": digest}, data)
                    return
                blob = _BLOB.match(self.path)
                if blob and blob.group(2) in proxy.blobs:
                    self._reply(200, {"Docker-Content-Digest": blob.group(2)}, proxy.blobs[blob.group(2)])
                    return
                if proxy._take("error500"):
                    self._reply(500, {}, b'{"errors":[{"code":"UNKNOWN","message":"injected"}]}')
                    return
                if proxy._take("endless_error"):
                    self._endless(b"x" * (1 << 20), 1024, status=500)
                    return
                if proxy._take("throttle"):
                    self._reply(429, {"Retry-After": "1"}, b'{"errors":[{"code":"TOOMANYREQUESTS"}]}')
                    return
                blob = _BLOB.match(self.path) if self.command == "GET" else None
                if blob and proxy.blob_host and proxy._take("redirect"):
                    self.send_response(307)
                    self.send_header("Location", f"{proxy.blob_host.url}/blobs/{blob.group(2)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if blob and self._blob_fault():
                    return
                upload = self.command == "POST" and self.path.endswith("/blobs/uploads/")
                if upload and proxy.blob_host and proxy._take("upload_elsewhere"):
                    self._reply(202, {"Location": f"{proxy.blob_host.url}/upload/1"}, b"")
                    return
                if self.command == "GET" and _MANIFEST.match(self.path) and proxy._take("evil_error"):
                    error = {"code": "DENIED", "message": "\x1b[31mred\nFATAL:   fake"}
                    self._reply(
                        400, {"Content-Type": "application/json"}, json.dumps({"errors": [error]}).encode()
                    )
                    return
                if self.command == "GET" and _MANIFEST.match(self.path) and proxy._take("schema1"):
                    doc = {"schemaVersion": 1, "name": "x", "tag": "1", "fsLayers": [], "history": []}
                    ctype = "application/vnd.docker.distribution.manifest.v1+prettyjws"
                    self._reply(200, {"Content-Type": ctype}, json.dumps(doc).encode())
                    return
                if self.command == "GET" and _MANIFEST.match(self.path) and proxy._take("huge_manifest"):
                    self._endless(b" " * (1 << 20), 1024)
                    return
                headers: dict[str, str] = {}
                for k, v in self.headers.items():  # repeated headers (Accept) are one list
                    if k.lower() not in ("host", "content-length"):
                        headers[k] = f"{headers[k]}, {v}" if k in headers else v
                resp = proxy._session.request(
                    self.command,
                    proxy.upstream + self.path,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    stream=True,
                )
                data = resp.raw.read(decode_content=False) if self.command != "HEAD" else b""
                out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP | {"content-length"}}
                if blob and resp.status_code in (200, 206) and len(data) > 200:
                    if len(data) > 65536 and proxy._take("reset"):
                        self._cut(resp.status_code, out, data, reset=True)
                        return
                    if len(data) > 65536 and proxy._take("cut"):
                        self._cut(resp.status_code, out, data, reset=False)
                        return
                    if proxy._take("short"):
                        data = data[:-100]
                    elif proxy._take("wrong"):
                        data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
                if self.command == "HEAD":
                    out["Content-Length"] = resp.headers.get("Content-Length", "0")
                    self.send_response(resp.status_code)
                    for k, v in out.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return
                self._reply(resp.status_code, out, data)

            def _bearer_fault(self) -> bool:
                """Play a broken token server (see the module docstring); True if it answered."""
                faults = proxy._armed() & _BEARER
                if not faults:
                    return False
                fault = faults.pop()
                if self.path.startswith("/token"):
                    proxy.token_requests.append(dict(self.headers))
                    proxy.fired[fault] += 1  # stays armed until the next arm(): every answer is broken
                    if fault == "token_huge":
                        self.wfile.write(
                            b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"token": "'
                        )
                        self._endless(b"a" * (1 << 20), 1024, status=None)
                        return True
                    self._reply(
                        200, {"Content-Type": "application/json"}, _TOKEN_BODIES.get(fault, b'{"token": "x"}')
                    )
                    return True
                realm = {
                    "realm_other_host": f"{proxy.blob_host.url if proxy.blob_host else ''}/token",
                    "realm_file": "file:///etc/passwd",
                }.get(fault, f"{proxy.url}/token")
                challenge = (
                    'Bearer ,,="' if fault == "challenge_junk" else f'Bearer realm="{realm}",service="faulty"'
                )
                self._reply(401, {"WWW-Authenticate": challenge}, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                return True

            def _blob_fault(self) -> bool:
                """Misbehave on a blob GET as an armed fault says; True if it answered."""
                faults = proxy._armed() & _BLOB_FAULTS
                if not faults or not proxy._take(fault := faults.pop()):
                    return False
                if fault.startswith("redirect_"):
                    where = self.path if fault == "redirect_loop" else "file:///etc/passwd"
                    self._reply(302, {"Location": where}, b"")
                elif fault == "notfound":
                    self._reply(404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')
                elif fault == "endless_blob":
                    self._endless(b"\0" * (1 << 20), 1024)
                else:
                    data = proxy._session.get(proxy.upstream + self.path, headers=self._auth()).content
                    if fault == "long_blob":
                        self._reply(200, {}, data + b"\0" * (1 << 20))
                    elif fault == "http10":
                        # an HTTP/1.0 answer: no length, the body ends when the connection closes
                        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
                        self.wfile.write(data)
                        self.close_connection = True
                    else:  # trickle
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        try:
                            for i in range(len(data)):
                                self.wfile.write(data[i : i + 1])
                                self.wfile.flush()
                                time.sleep(1)
                        except OSError:
                            pass  # the client gave up
                        self.close_connection = True
                return True

            def _auth(self) -> dict[str, str]:
                return {k: v for k, v in self.headers.items() if k.lower() == "authorization"}

            def _endless(self, block: bytes, blocks: int, status: int | None = 200) -> None:
                if status:  # else the caller sent the head and the start of the body
                    self.send_response(status)
                    self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                    self.send_header("Connection", "close")
                    self.end_headers()
                self.close_connection = True
                try:
                    for _ in range(blocks):
                        self.wfile.write(block)
                except OSError:
                    pass  # the client stopped reading

            def _cut(self, status: int, headers: dict[str, str], data: bytes, reset: bool) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if reset:
                    time.sleep(0.2)  # give the client a chance to read: a reset discards unread data
                    # SO_LINGER 0: close with a TCP reset, as a dying load balancer would
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    self.connection.shutdown(socket.SHUT_WR)
                self.close_connection = True

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        return Handler


def fault_proxy(upstream: str, blobs: dict[str, bytes] | None = None) -> Iterator[FaultProxy]:
    """Generator for fixtures: a proxy (with a BlobHost when ``blobs`` is given), stopped afterwards."""
    blob_host = BlobHost(blobs) if blobs is not None else None
    proxy = FaultProxy(upstream, blob_host)
    try:
        yield proxy
    finally:
        proxy.stop()
        if blob_host:
            blob_host.stop()
