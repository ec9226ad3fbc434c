"""A client for the OCI distribution API (``/v2/``) on one :class:`requests.Session`.

* ``/v2/`` ping, then Basic auth or the Bearer token flow from the ``WWW-Authenticate``
  challenge, anonymous or with credentials, one token per repository scope, reused until
  it expires;
* manifests by tag or digest (verified), blobs streamed into an
  :class:`~hpcsif.image.store.OCIStore` and verified while streaming, uploads for ``push``;
* retries with exponential backoff on connection errors, 5xx and 429 (``Retry-After`` is
  honoured), resume of an interrupted blob with ``Range``, and a blob that ends short or
  hashes wrong is discarded and fetched again, never kept;
* redirects (to blob storage) are followed by requests, which drops the ``Authorization``
  header when the host changes; only to http(s) URLs, and at most :data:`MAX_REDIRECTS`;
* a body that arrives slower than :data:`LOW_SPEED` bytes a second, over ``timeout`` seconds,
  counts as a broken connection (the read timeout alone would let a trickle go on for days);
* credentials go to a token realm on another host only over https.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from hpcsif import __version__
from hpcsif.errors import AuthError, IntegrityError, NetworkError, NotFoundError, RegistryError
from hpcsif.image import mediatypes as mt
from hpcsif.image.digest import check_digest
from hpcsif.image.model import Descriptor
from hpcsif.image.store import MAX_JSON_DOCUMENT, BlobWriter, OCIStore, document_too_large
from hpcsif.refs import DOCKER_HUB
from hpcsif.sources.credentials import Credentials, auth_hint
from hpcsif.sources.partial import partial_blob

log = logging.getLogger(__name__)

MANIFEST_ACCEPT = ", ".join(
    [
        mt.OCI_INDEX,
        mt.OCI_MANIFEST,
        mt.DOCKER_MANIFEST_LIST,
        mt.DOCKER_MANIFEST,
        # accepted only so that a schema 1 image is refused with a clear message
        mt.DOCKER_MANIFEST_V1_SIGNED,
        mt.DOCKER_MANIFEST_V1,
    ]
)
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# small enough that little is lost when a connection breaks (urllib3 drops a partial read)
STREAM_CHUNK = 256 << 10
MAX_REDIRECTS = 10
#: the slowest transfer tolerated, in bytes a second averaged over ``timeout`` seconds (curl's
#: --speed-limit idea): a registry trickling a body would otherwise hold a pull for days
LOW_SPEED = 1024
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
#: a request body: bytes, or a callable that opens a fresh file-like body for each try
Body = bytes | Callable[[], Any] | None
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def api_host(registry: str) -> str:
    """The host serving the API for a registry name (Docker Hub's API is on registry-1)."""
    return "registry-1.docker.io" if registry == DOCKER_HUB else registry


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Bearer realm="…",service="…"`` into ("bearer", {realm, service, …})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def retry_after(resp: requests.Response, cap: float = 60.0) -> float | None:
    """The delay a 429/503 ``Retry-After`` header asks for (seconds or an HTTP date), capped."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        delay = float(value)
    except ValueError:
        try:
            delay = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, min(delay, cap))


class _SystemTrustAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose TLS connections trust the system's certificate authorities (OpenSSL's
    default paths, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``) as well as requests' own bundle
    (certifi, or ``REQUESTS_CA_BUNDLE``): a site's registry signed by the site's CA, installed
    with ``update-ca-certificates``, is trusted as Apptainer and curl trust it."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("ssl_context", ssl.create_default_context())
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        kwargs.setdefault("ssl_context", ssl.create_default_context())
        return super().proxy_manager_for(proxy, **kwargs)


def is_loopback(registry: str) -> bool:
    """True for ``localhost[:port]`` (in any case, as host names are), ``127.x.x.x[:port]`` and
    ``[::1]:port``."""
    if registry.startswith("["):
        host = registry[1:].split("]", 1)[0]
    else:
        host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Session(requests.Session):
    """Never through a proxy to this machine, as Go's clients (Apptainer) do: an ``http_proxy``
    set for the site does not know the user's loopback registry."""

    def merge_environment_settings(self, url: str | bytes | None, *args: Any) -> dict[str, Any]:
        settings = super().merge_environment_settings(url, *args)
        host = urllib.parse.urlsplit(url.decode() if isinstance(url, bytes) else url or "").netloc
        if is_loopback(host.rpartition("@")[2]):
            settings["proxies"] = {}
        return settings


def new_session() -> requests.Session:
    """A :class:`requests.Session` for registries and downloads: it trusts the system's
    certificate authorities (:class:`_SystemTrustAdapter`) and reaches loopback hosts directly."""
    session = _Session()
    session.mount("https://", _SystemTrustAdapter())
    return session


class _TooSlow(requests.ConnectionError):
    """A body arriving slower than :data:`LOW_SPEED` (a broken connection, for the retries)."""


def _body(resp: requests.Response, timeout: float) -> Iterator[bytes]:
    """The body of a streamed response in blocks as they arrive, at most :data:`STREAM_CHUNK`.

    Unlike ``iter_content``, which waits for whole blocks, this sees every byte come, so a body
    that trickles in slower than :data:`LOW_SPEED` over ``timeout`` seconds raises
    :class:`_TooSlow`. Read errors are requests' exceptions, as from ``iter_content``.
    """
    start, got = time.monotonic(), 0
    while True:
        try:
            block = resp.raw.read1(STREAM_CHUNK, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise requests.ConnectionError(exc) from exc
        except urllib3.exceptions.ProtocolError as exc:
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        except urllib3.exceptions.DecodeError as exc:
            raise requests.exceptions.ContentDecodingError(exc) from exc
        if not block:
            return
        yield block
        got += len(block)
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            if got < LOW_SPEED * elapsed:
                raise _TooSlow(
                    f"too slow: {got} bytes in {elapsed:.0f} s (at least {LOW_SPEED} bytes/s needed)"
                )
            start, got = time.monotonic(), 0


def _read_capped(resp: requests.Response, limit: int, what: str, timeout: float) -> bytes:
    """The body of a streamed response, refused as soon as it exceeds ``limit`` bytes."""
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise document_too_large(what)
    chunks, size = [], 0
    for chunk in _body(resp, timeout):
        size += len(chunk)
        if size > limit:
            raise document_too_large(what)
        chunks.append(chunk)
    return b"".join(chunks)


def _preload(resp: requests.Response, timeout: float, limit: int = 64 << 10) -> None:
    """Read the start of a streamed body, at most ``limit`` bytes, as ``resp.content``.

    requests reads a body it does not stream to its end, however long: a registry answering
    with an endless error page would take all memory. What is past ``limit`` is dropped with
    the connection; a body that breaks off is kept as far as it came.
    """
    data = b""
    try:
        for block in _body(resp, timeout):
            data += block
            if len(data) >= limit:
                resp.close()
                break
    except _TRANSIENT:
        resp.close()
    # requests' own attributes for a body already read: .json() and .text then use these bytes
    resp._content, resp._content_consumed = data[:limit], True


def _asks_for_https(resp: requests.Response) -> bool:
    """True for the 400 a TLS server gives a plain-HTTP request ("Client sent an HTTP request to
    an HTTPS server.", nginx's "The plain HTTP request was sent to HTTPS port"); its body is
    already read (a bounded start)."""
    return "https" in (resp.content or b"")[:4096].decode("latin-1").lower()


def error_text(resp: requests.Response, timeout: float = 10.0) -> str:
    """The HTTP status and the registry's error message(s) from a JSON error body, else its reason."""
    if resp._content is False:  # streamed and not read yet: read no more than its start
        _preload(resp, timeout)
    try:
        errors = resp.json().get("errors") or []
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
    except (ValueError, AttributeError):
        text = ""
    return _printable(
        f"HTTP {resp.status_code} ({text})" if text else f"HTTP {resp.status_code} {resp.reason}"
    )


@dataclass
class _Token:
    value: str
    expires: float


class _RestartBlob(Exception):
    """The server ignored our Range request; the partial download must start over."""


class RegistryClient:
    """Talks to one registry endpoint. Thread-safe for parallel blob downloads."""

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        insecure: bool = False,
        tls_fallback: bool = False,
        endpoint: str | None = None,
        retries: int = 5,
        timeout: float = 60.0,
        backoff: float = 0.5,
        session: requests.Session | None = None,
    ) -> None:
        self.registry = registry
        self.base = (endpoint or f"{'http' if insecure else 'https'}://{api_host(registry)}").rstrip("/")
        # plain HTTP chosen for a loopback registry, which may turn out to speak only HTTPS
        self.tls_fallback = tls_fallback and self.base.startswith("http://")
        self.credentials = credentials
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.session = session or new_session()
        self.session.headers["User-Agent"] = f"hpcsif/{__version__}"
        self.session.max_redirects = MAX_REDIRECTS
        self.session.hooks["response"].append(_check_redirect)
        self._lock = threading.Lock()
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._pinged = False
        self._tokens: dict[str, _Token] = {}

    # -- low level ---------------------------------------------------------------------------
    def _sleep(self, attempt: int, resp: requests.Response | None = None) -> None:
        delay = retry_after(resp) if resp is not None else None
        if delay is None:
            delay = min(self.backoff * (2**attempt), 30.0)
        log.debug("retrying in %.1f s", delay)
        time.sleep(delay)

    def _send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        data: Body = None,
        auth_header: str | None = None,
    ) -> requests.Response:
        """One request with retries on connection errors, 429 and 5xx.

        ``data`` is bytes or a callable that opens a fresh body (a file) for every try.
        """
        hdrs = dict(headers or {})
        if auth_header:
            hdrs["Authorization"] = auth_header
        for attempt in range(self.retries + 1):
            try:
                body = data() if callable(data) else data
                try:  # always streamed, so that no body is read without a bound
                    resp = self.session.request(
                        method, url, headers=hdrs, stream=True, data=body, timeout=self.timeout
                    )
                finally:
                    if hasattr(body, "close"):
                        body.close()
            except requests.TooManyRedirects:
                raise RegistryError(
                    f"{_redact(url)}: redirect loop (more than {MAX_REDIRECTS} redirects)"
                ) from None
            except _TRANSIENT as exc:
                if attempt >= self.retries or hopeless(exc, answered=self._pinged):
                    hint = " (use --no-https for a registry without TLS)" if plain_http(exc) else ""
                    raise NetworkError(f"cannot reach {_redact(url)}: {reason(exc)}{hint}") from None
                log.warning("%s %s failed (%s); retrying", method, _redact(url), type(exc).__name__)
                self._sleep(attempt)
                continue
            if resp.status_code in RETRY_STATUS and attempt < self.retries:
                log.warning(
                    "%s %s: HTTP %d; retrying (%d/%d)",
                    method,
                    _redact(url),
                    resp.status_code,
                    attempt + 1,
                    self.retries,
                )
                self._sleep(attempt, resp)
                resp.close()
                continue
            if not stream:
                _preload(resp, self.timeout)
            return resp
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _ping(self) -> None:
        """``GET /v2/`` once, to learn how this registry wants to be authenticated."""
        if self._pinged:
            return
        resp = self._send("GET", f"{self.base}/v2/")
        if self.tls_fallback and resp.status_code == 400 and _asks_for_https(resp):
            resp.close()
            log.info("registry %s asks for HTTPS; using it", self.registry)
            self.base = "https://" + self.base.split("://", 1)[1]
            resp = self._send("GET", f"{self.base}/v2/")
        if resp.status_code == 401:
            header = resp.headers.get("WWW-Authenticate", "")
            self._challenge = parse_challenge(header) if header else ("basic", {})
        elif resp.status_code == 404:
            raise RegistryError(f"{self.base}: not a registry (GET /v2/ answered 404)")
        elif resp.status_code >= 400:
            raise RegistryError(f"{self.base}/v2/: {error_text(resp)}")
        resp.close()
        self._pinged = True

    def _auth_header(self, scope: str, *, fresh: bool = False) -> str | None:
        self._ping()
        if self._challenge is None:
            return None
        scheme, params = self._challenge
        if scheme == "basic":
            return self._basic()
        if scheme == "bearer":
            return "Bearer " + self._token(scope, params, fresh=fresh)
        raise RegistryError(f"{self.registry}: unsupported authentication scheme {scheme!r}")

    def _basic(self) -> str | None:
        """The Basic ``Authorization`` value for our credentials (None when anonymous, or when
        they are an identity token, which only a token server takes)."""
        if not self.credentials or self.credentials.identity_token:
            return None
        raw = f"{self.credentials.username}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _token(self, scope: str, params: dict[str, str], *, fresh: bool) -> str:
        with self._lock:
            tok = self._tokens.get(scope)
            if tok and not fresh and tok.expires > time.monotonic():
                return tok.value
        realm = params.get("realm")
        if not realm:
            raise AuthError(f"{self.registry}: Bearer challenge without a realm")
        realm_url = urllib.parse.urlsplit(realm)
        if realm_url.scheme not in ("http", "https") or not realm_url.hostname:
            raise AuthError(f"{self.registry}: token realm {_redact(realm)!r} is not an http(s) URL")
        basic = self._basic()
        refresh = self.credentials.identity_token if self.credentials else ""
        if (
            (basic or refresh)
            and realm_url.scheme == "http"
            and _machine(realm_url.hostname) != _machine(urllib.parse.urlsplit(self.base).hostname)
        ):
            # the password would cross the network in the clear to a host the user never named
            raise AuthError(
                f"{self.registry}: will not send credentials to token realm {_redact(realm)} "
                "on another host over plain http"
            )
        query = {"scope": scope}
        if params.get("service"):
            query["service"] = params["service"]
        log.debug("requesting a token for %s from %s", scope, realm)
        if refresh:
            # an identity token is an OAuth2 refresh token, traded as Docker and containers/image
            # trade it: in a POSTed form (never in the URL, which proxies and logs may keep)
            form = {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": "hpcsif", **query}
            body = urllib.parse.urlencode(form).encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            sent = self._send("POST", realm, headers=headers, data=body, stream=True)
        else:
            sep = "&" if "?" in realm else "?"
            url = f"{realm}{sep}{urllib.parse.urlencode(query)}"
            sent = self._send("GET", url, auth_header=basic, stream=True)
        with sent as resp:
            if resp.status_code in (401, 403):
                raise self._auth_error(scope)
            if resp.status_code >= 400:
                raise RegistryError(f"token request to {_redact(realm)} failed: {error_text(resp)}")
            try:
                data = _read_capped(resp, MAX_JSON_DOCUMENT, f"token server {_redact(realm)}", self.timeout)
            except _TRANSIENT as exc:
                raise NetworkError(f"token server {_redact(realm)}: {reason(exc)}") from None
        try:
            body = json.loads(data)
            value = body.get("token") or body["access_token"]
            lifetime = float(body.get("expires_in") or 60)
            if not isinstance(value, str) or not value.isprintable() or not value.strip():
                raise TypeError(value)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise RegistryError(f"token server {_redact(realm)} sent an unreadable answer") from None
        with self._lock:
            # renew a little before the server's expiry
            self._tokens[scope] = _Token(value, time.monotonic() + max(lifetime - 10, lifetime / 2))
        return value

    def _auth_error(self, scope: str) -> AuthError:
        name = scope.split(":")[1] if scope.count(":") >= 2 else scope
        where = f"{self.registry}/{name}"
        if self.credentials:
            check = (
                "it may have expired or been revoked: log in again; check"
                if self.credentials.identity_token
                else "check the user name and password, and"
            )
            return AuthError(
                f"authentication failed for {where}: the registry refused {self.credentials} "
                f"({check} that the repository exists)"
            )
        return AuthError(f"authentication required for {where}: {auth_hint()}")

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        data: Body = None,
        absolute: bool = False,
    ) -> requests.Response:
        """An authenticated request to ``path`` (under ``/v2/``); renews the auth once on 401.

        An ``absolute`` URL the registry named (an upload location) on another host gets no
        credentials: the registry may send us anywhere, our password stays with it.
        """
        if not absolute:
            self._ping()  # first: it may move the registry from http:// to https://
        url = path if absolute else f"{self.base}/v2/{path}"
        target = urllib.parse.urlsplit(url)
        if target.scheme not in ("http", "https"):
            raise RegistryError(
                f"{self.registry}: the registry sent us to {_redact(url)}, not an http(s) URL"
            )
        ours = target.netloc == urllib.parse.urlsplit(self.base).netloc
        auth = self._auth_header(scope) if ours else None
        resp = self._send(method, url, headers=headers, stream=stream, data=data, auth_header=auth)
        if resp.status_code == 401 and ours:
            resp.close()
            header = resp.headers.get("WWW-Authenticate", "")
            if header:
                # the challenge may differ per repository (a new realm or scope)
                self._challenge = parse_challenge(header)
            if self._challenge and (self.credentials or self._challenge[0] == "bearer"):
                resp = self._send(
                    method,
                    url,
                    headers=headers,
                    stream=stream,
                    data=data,
                    auth_header=self._auth_header(scope, fresh=True),
                )
        if resp.status_code in (401, 403) and ours:
            resp.close()
            raise self._auth_error(scope)
        return resp

    # -- manifests -----------------------------------------------------------------------------
    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest; returns (bytes, media type, digest).

        The body is read no further than :data:`MAX_JSON_DOCUMENT`: a hostile registry cannot
        make us hold more.
        """
        where = f"{self.registry}/{repo}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        for attempt in range(self.retries + 1):
            resp = self._manifest_request("GET", repo, reference, stream=True)
            with resp:
                if resp.status_code == 404:
                    raise NotFoundError(f"{where}: manifest unknown")
                if resp.status_code >= 400:
                    raise RegistryError(f"{where}: {error_text(resp)}")
                try:
                    data = _read_capped(resp, MAX_JSON_DOCUMENT, f"{where}: manifest", self.timeout)
                except _TRANSIENT as exc:  # the connection broke while reading the body
                    if attempt >= self.retries:
                        raise NetworkError(f"{where}: manifest download failed: {reason(exc)}") from None
                    log.warning("%s: manifest download failed (%s); retrying", where, type(exc).__name__)
                    self._sleep(attempt)
                    continue
                break
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(f"{where}: manifest content hashes to {digest}")
        header_digest = resp.headers.get("Docker-Content-Digest")
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise IntegrityError(f"{where}: manifest hashes to {digest}, the registry says {header_digest}")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return data, media_type, digest

    def _manifest_request(self, method: str, repo: str, reference: str, **kw):  # -> requests.Response
        """A GET or HEAD of a manifest, accepting every manifest and index type we read."""
        return self.request(
            method,
            f"{repo}/manifests/{reference}",
            scope=f"repository:{repo}:pull",
            headers={"Accept": MANIFEST_ACCEPT},
            **kw,
        )

    def head_manifest(self, repo: str, reference: str) -> tuple[str | None, str]:
        """(digest the registry reports or None, media type) for a tag or digest, without the body."""
        resp = self._manifest_request("HEAD", repo, reference)
        if resp.status_code == 404:
            raise NotFoundError(f"{self.registry}/{repo}:{reference}: manifest unknown")
        if resp.status_code >= 400:
            raise RegistryError(f"{self.registry}/{repo}:{reference}: HTTP {resp.status_code}")
        digest = resp.headers.get("Docker-Content-Digest")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return (digest if digest and digest.startswith("sha256:") else None), media_type

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """Upload a manifest under a tag (or its digest); returns its digest."""
        resp = self.request(
            "PUT",
            f"{repo}/manifests/{reference}",
            scope=f"repository:{repo}:pull,push",
            headers={"Content-Type": media_type},
            data=data,
        )
        if resp.status_code not in (200, 201, 202):
            at = "@" if ":" in reference else ":"  # a digest, or a tag
            raise RegistryError(
                f"{self.registry}/{repo}{at}{reference}: manifest upload failed: {error_text(resp)}"
            )
        return "sha256:" + hashlib.sha256(data).hexdigest()

    # -- blobs ---------------------------------------------------------------------------------
    def fetch_blob(
        self, repo: str, desc: Descriptor, store: OCIStore, on_bytes: Callable[[int], None] | None = None
    ) -> None:
        """Bring one blob into ``store``, verified; a present blob is skipped.

        ``on_bytes(n)`` is called as data arrives (for progress bars).
        """
        check_digest(desc.digest)
        where = f"{self.registry}/{repo}@{desc.digest}"
        if desc.size < 0:  # it would pass for "size unknown", and a download of any length be taken
            raise RegistryError(f"{where}: the manifest gives the blob a negative size ({desc.size})")
        last: Exception | None = None
        # (size, digest) of complete downloads that did not match; every over-long one counts the same
        wrong: set[tuple[int, str]] = set()
        for attempt in range(self.retries + 1):
            with partial_blob(store, desc.digest, desc.size) as part:
                if part is None:
                    log.info("Skipping fetch of repeat blob %s", desc.digest)
                    return
                if part.resumed_from:
                    log.info("Resuming blob %s at byte %d", desc.digest, part.resumed_from)
                else:
                    log.info("Copying blob %s", desc.digest)
                try:
                    self._download(repo, desc, part, where, on_bytes)
                    part.commit()
                    return
                except _RestartBlob as exc:
                    part.discard()
                    last = exc
                except IntegrityError as exc:
                    last = exc  # commit() already deleted the bad download
                    part.discard()
                    seen = (part.size, part.digest) if part.size <= desc.size else (-1, "")
                    if seen in wrong:
                        # the same wrong bytes again: the registry stores them, no retry will help
                        if part.size == desc.size:
                            raise IntegrityError(
                                f"{where}: the registry serves corrupt content "
                                f"(downloaded twice, both times hashing to {part.digest})"
                            ) from None
                        served = "more than" if part.size > desc.size else f"{part.size} bytes, not"
                        raise IntegrityError(
                            f"{where}: the registry serves {served} the {desc.size} bytes "
                            "the manifest gives (downloaded twice)"
                        ) from None
                    wrong.add(seen)
            log.warning("%s: discarding the download (%s); fetching it again", where, last)
            if attempt < self.retries:
                self._sleep(attempt)
        raise IntegrityError(f"{where}: giving up after {self.retries + 1} downloads: {last}")

    def _download(
        self,
        repo: str,
        desc: Descriptor,
        writer: BlobWriter,
        where: str,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        """Stream the blob into ``writer``, resuming with ``Range`` after a broken connection."""
        failures, broke = 0, ""
        while True:
            if writer.size >= desc.size > 0:
                # a whole part, left by a pull stopped before it could verify it: commit() checks it
                # (a Range from its end is unsatisfiable, and registries answer that inconsistently)
                return
            headers = {"Range": f"bytes={writer.size}-"} if writer.size else {}
            resp = self.request(
                "GET",
                f"{repo}/blobs/{desc.digest}",
                scope=f"repository:{repo}:pull",
                headers=headers,
                stream=True,
            )
            try:
                if resp.status_code == 404:
                    raise NotFoundError(f"{where}: blob unknown to the registry")
                if resp.status_code >= 400:
                    raise RegistryError(f"{where}: {error_text(resp)}")
                if writer.size and resp.status_code != 206:
                    raise _RestartBlob(f"{broke}the server does not support resuming with Range")
                if writer.size and not resp.headers.get("Content-Range", "").startswith(
                    f"bytes {writer.size}-"
                ):
                    offset = _printable(str(resp.headers.get("Content-Range")))
                    raise _RestartBlob(f"{broke}the server resumed at the wrong offset ({offset})")
                for block in _body(resp, self.timeout):
                    writer.write(block)
                    if on_bytes:
                        on_bytes(len(block))
                    if writer.size > desc.size:
                        raise IntegrityError(f"{where}: more than the expected {desc.size} bytes")
                return
            except _TRANSIENT as exc:
                failures += 1
                if failures > self.retries:
                    why = reason(exc)
                    raise NetworkError(f"{where}: download failed after {failures} tries: {why}") from None
                broke = f"{reason(exc)}; "
                log.warning(
                    "%s: connection lost after %d bytes (%s); resuming",
                    where,
                    writer.size,
                    type(exc).__name__,
                )
                self._sleep(failures - 1)
            finally:
                resp.close()

    def has_blob(self, repo: str, digest: str) -> bool:
        """True if the registry already holds ``digest`` in ``repo``."""
        resp = self.request("HEAD", f"{repo}/blobs/{digest}", scope=f"repository:{repo}:pull,push")
        resp.close()
        return resp.status_code == 200

    def push_blob(self, repo: str, digest: str, size: int, data: Body) -> None:
        """Upload one blob (monolithic POST then PUT), unless the registry has it already.

        ``data`` is the bytes, or a callable opening the content afresh (retries re-read it).
        """
        if self.has_blob(repo, digest):
            log.info("Skipping upload of repeat blob %s", digest)
            return
        scope = f"repository:{repo}:pull,push"
        resp = self.request("POST", f"{repo}/blobs/uploads/", scope=scope)
        resp.close()
        if resp.status_code != 202 or not resp.headers.get("Location"):
            raise RegistryError(f"{self.registry}/{repo}: cannot start a blob upload: {error_text(resp)}")
        location = requests.compat.urljoin(f"{self.base}/v2/", resp.headers["Location"])
        sep = "&" if "?" in location else "?"
        resp = self.request(
            "PUT",
            f"{location}{sep}digest={digest}",
            scope=scope,
            absolute=True,
            data=data,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        resp.close()
        if resp.status_code not in (201, 204):
            raise RegistryError(f"{self.registry}/{repo}: upload of {digest} failed: {error_text(resp)}")


def _check_redirect(resp: requests.Response, *args: Any, **kwargs: Any) -> None:
    """A response hook refusing a redirect to anything but an http(s) URL (``file://`` …)."""
    if resp.is_redirect:
        target = urllib.parse.urljoin(resp.url, resp.headers["Location"])
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            raise RegistryError(f"{_redact(resp.url)}: redirected to {_redact(target)}, not an http(s) URL")


def _machine(host: str | None) -> str | None:
    """``host``, with the names of this machine's usual loopback addresses made one."""
    return "localhost" if host in ("localhost", "127.0.0.1", "::1") else host


def _redact(url: str) -> str:
    """A URL without its query string (upload URLs and signed redirects carry secrets there)."""
    return _printable(url.split("?", 1)[0])


def _printable(text: str, limit: int = 300) -> str:
    """Text a server chose, fit for one line on a terminal: control characters (newlines, escape
    sequences) escaped, and cut at ``limit`` characters."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception under a requests/urllib3 connection error (an OSError, usually)."""
    seen: set[int] = set()
    cause: BaseException = exc
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in cause.args if isinstance(a, BaseException)), None)
        inner = inner or cause.__cause__ or cause.__context__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    return cause


def hopeless(exc: BaseException, *, answered: bool) -> bool:
    """True for a connection failure that waiting will not cure.

    An unknown host name, a refused or timed-out connection before the server ever
    ``answered`` (it is down, firewalled, or the port is wrong), or a TLS handshake that cannot
    succeed (a plain-HTTP server, an untrusted certificate) fails at once as Apptainer does,
    instead of after minutes of backoff (six connection timeouts); once the server has
    answered, the same failures (a restart mid-pull) are retried.
    """
    cause = _root_cause(exc)
    unanswered = isinstance(cause, ConnectionRefusedError) or isinstance(exc, requests.Timeout)
    return isinstance(cause, socket.gaierror) or (unanswered and not answered) or _tls_mismatch(cause)


def plain_http(exc: BaseException) -> bool:
    """True when a TLS handshake met a plain-HTTP answer."""
    cause = _root_cause(exc)
    return isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER"


def _tls_mismatch(cause: BaseException) -> bool:
    """True for a TLS failure that a retry cannot cure: a server that does not speak TLS, an
    untrusted certificate, no common protocol. A handshake cut short (EOF, a reset) may be
    transient and is not one of these."""
    transient = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
    return isinstance(cause, ssl.SSLError) and not isinstance(cause, transient)


def reason(exc: BaseException) -> str:
    """The innermost cause of a connection failure, briefly ("connection refused", "timed out")."""
    if isinstance(exc, requests.exceptions.ProxyError):  # the proxy failed, not the server
        pool = getattr(exc.__context__, "pool", None)
        proxy = f" {pool.host}:{pool.port}" if pool is not None else ""
        return f"via the proxy{proxy} ($https_proxy, $http_proxy, $no_proxy): {_cause_text(exc)}"
    return _cause_text(exc)


def _cause_text(exc: BaseException) -> str:
    cause = _root_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {_printable(cause.verify_message or str(cause))}"
    if plain_http(exc):
        return "the server answered in plain HTTP, not HTTPS"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return _printable(str(cause).strip()) or type(cause).__name__
