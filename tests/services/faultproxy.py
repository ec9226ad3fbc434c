"""A fault-injecting HTTP proxy in front of a registry, and a second "blob storage" host.

:class:`FaultProxy` forwards every request to the upstream registry and, for the first N
matching requests of each armed fault, misbehaves instead:

* ``reset``: send a large (> 64 KiB) blob's headers and half its body, then reset the connection
  (TCP RST: the client may lose what it had not read yet);
* ``cut``: the same, but close the connection normally (FIN: the half sent stays readable);
* ``short``: send a blob body that is 100 bytes short with a matching Content-Length;
* ``wrong``: send a blob body of the right length with flipped bytes;
* ``error500``: answer 500 to any request;
* ``throttle``: answer 429 with ``Retry-After: 1`` to any request;
* ``schema1``: answer manifest GETs with a Docker schema 1 manifest;
* ``huge_manifest``: answer manifest GETs with an endless body (no Content-Length, 1 MiB
  blocks of JSON whitespace until the client hangs up or 1 GiB is sent);
* ``redirect``: redirect blob GETs to :class:`BlobHost` on another loopback address.

Faults are bounded (a count each), so a client with retries must eventually succeed, and
``fired`` records what happened for the assertions. Requests with a ``Range`` header are
listed in ``ranges``.
"""

from __future__ import annotations

import collections
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True


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
        return self

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
                if proxy._take("error500"):
                    self._reply(500, {}, b'{"errors":[{"code":"UNKNOWN","message":"injected"}]}')
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
                if self.command == "GET" and _MANIFEST.match(self.path) and proxy._take("schema1"):
                    doc = {"schemaVersion": 1, "name": "x", "tag": "1", "fsLayers": [], "history": []}
                    ctype = "application/vnd.docker.distribution.manifest.v1+prettyjws"
                    self._reply(200, {"Content-Type": ctype}, json.dumps(doc).encode())
                    return
                if self.command == "GET" and _MANIFEST.match(self.path) and proxy._take("huge_manifest"):
                    self._endless(b" " * (1 << 20), 1024)
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
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

            def _endless(self, block: bytes, blocks: int) -> None:
                self.send_response(200)
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
