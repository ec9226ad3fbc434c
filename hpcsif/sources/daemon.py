"""``docker-daemon://NAME:TAG``: images held by a Docker Engine API daemon (Docker, Podman).

The daemon is reached on ``$DOCKER_HOST`` (``unix:///PATH`` or ``tcp://HOST:PORT``, default
``unix:///var/run/docker.sock``). ``GET /images/NAME/json`` names the image (its ID, the
config digest) and ``GET /images/NAME/get`` streams it as a ``docker save`` archive, which
is ingested in one pass by :func:`hpcsif.sources.dockerarchive.fetch_stream`.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse

from hpcsif.errors import NotFoundError, SourceError
from hpcsif.image.model import Image
from hpcsif.image.store import OCIStore
from hpcsif.refs import DOCKER_HUB, Reference
from hpcsif.sources import Source

DEFAULT_HOST = "unix:///var/run/docker.sock"


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def docker_host() -> str:
    """``$DOCKER_HOST`` or the default unix socket."""
    return os.environ.get("DOCKER_HOST") or DEFAULT_HOST


def connect(host: str | None = None, timeout: float = 300.0) -> http.client.HTTPConnection:
    """A connection to the Docker Engine API at ``host`` (``unix://`` or ``tcp://``)."""
    host = host or docker_host()
    url = urllib.parse.urlsplit(host)
    if url.scheme == "unix":
        return _UnixConnection(url.path, timeout)
    if url.scheme in ("tcp", "http"):
        return http.client.HTTPConnection(url.hostname or "localhost", url.port or 2375, timeout=timeout)
    raise SourceError(f"DOCKER_HOST={host!r}: only unix:// and tcp:// daemons are supported")


def image_name(ref: Reference) -> str:
    """The name the daemon knows the image by (``busybox:latest``, ``team/app:1.2``)."""
    repo = ref.repository or ""
    repo = repo.removeprefix("library/") if ref.registry == DOCKER_HUB else f"{ref.registry}/{repo}"
    return repo + (f"@{ref.digest}" if ref.digest else f":{ref.tag or 'latest'}")


class DockerDaemonSource(Source):
    """Exports an image from a Docker-compatible daemon."""

    def _get(self, ref: Reference, what: str) -> http.client.HTTPResponse:
        host = str(self.options.get("docker_host") or docker_host())
        conn = connect(host)
        path = f"/images/{urllib.parse.quote(image_name(ref), safe='')}/{what}"
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            why = (exc.strerror or str(exc)).lower()  # "no such file or directory", not "[Errno 2] …"
            raise SourceError(f"{ref.raw}: cannot reach the Docker daemon at {host}: {why}") from None
        if resp.status == 404:
            conn.close()
            raise NotFoundError(f"{ref.raw}: the Docker daemon at {host} has no image {image_name(ref)}")
        if resp.status >= 400:
            body = resp.read(2000).decode(errors="replace")
            conn.close()
            try:
                message = json.loads(body).get("message") or body
            except (ValueError, AttributeError):
                message = body
            raise SourceError(f"{ref.raw}: the Docker daemon answered HTTP {resp.status}: {message.strip()}")
        return resp

    def resolve(self, ref: Reference) -> str:
        """The image ID (the digest of its config) as the daemon reports it."""
        resp = self._get(ref, "json")
        try:
            image_id = json.loads(resp.read())["Id"]
        except (ValueError, KeyError, TypeError):
            raise SourceError(f"{ref.raw}: the Docker daemon sent an unreadable image description") from None
        finally:
            resp.close()
        return image_id if image_id.startswith("sha256:") else f"sha256:{image_id}"

    def fetch(self, ref: Reference, store: OCIStore) -> Image:
        """Stream ``docker save`` output from the daemon into ``store``."""
        from hpcsif.sources.dockerarchive import fetch_stream

        resp = self._get(ref, "get")
        try:
            return fetch_stream(resp, store, None, ref.raw)
        finally:
            resp.close()
