"""``docker://[registry[:port]/][namespace/]repo[:tag|@digest]``: images from a registry.

Manifests, indexes and config are stored byte-exact in the blob store; layers are fetched in
parallel (``registry.parallel_downloads``, default 4). Plain HTTP is used only for registries
listed in ``registry.insecure``, for loopback registries (as Docker does), or with
``--nohttps`` (``insecure=True``), and never silently: an info line says so. Mirrors come from
the ``registry.mirrors`` table (``"index.docker.io" = ["https://mirror.example"]``); each is
tried in order before the registry itself.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from hpcsif.config import get_config
from hpcsif.errors import IntegrityError, SourceError
from hpcsif.image import mediatypes as mt
from hpcsif.image.digest import check_digest
from hpcsif.image.model import Descriptor, Image
from hpcsif.image.select import load_image, resolve_manifest
from hpcsif.image.store import MAX_JSON_DOCUMENT, OCIStore, document_too_large, load_json_object
from hpcsif.refs import Reference
from hpcsif.sources import Source
from hpcsif.sources.credentials import Credentials, find_credentials, from_docker_config
from hpcsif.sources.distribution import RegistryClient, is_loopback

log = logging.getLogger(__name__)


def make_clients(
    registry: str,
    *,
    credentials: Credentials | None = None,
    insecure: bool = False,
    authfile: str | os.PathLike[str] | None = None,
    repository: str | None = None,
    **kwargs: Any,
) -> list[RegistryClient]:
    """Clients for the configured mirrors of ``registry`` (in order), then the registry itself.

    Mirrors come from the ``registry.mirrors`` table (``"index.docker.io" = ["https://m.example"]``);
    plain HTTP is used for ``registry.insecure`` entries, loopback registries and ``insecure``.
    ``credentials`` and ``authfile`` are looked up with :func:`find_credentials` (for
    ``repository``: auth files may hold credentials per repository or namespace).
    """
    creds = find_credentials(registry, credentials, authfile, repository)
    return _clients_for(registry, creds, insecure, **kwargs)


def _clients_for(
    registry: str, creds: Credentials | None, insecure: bool, **kwargs: Any
) -> list[RegistryClient]:
    cfg = get_config()
    plain = insecure or registry in (cfg.get("registry.insecure") or []) or is_loopback(registry)
    why = "--nohttps" if insecure else ("registry.insecure" if not is_loopback(registry) else "loopback")
    if plain:
        log.info("using plain HTTP for registry %s (%s)", registry, why)
    opts = {
        "retries": int(cfg.get("registry.retries", 5)),
        "timeout": float(cfg.get("registry.timeout", 60)),
        **kwargs,
    }
    clients = [
        RegistryClient(
            registry,
            # a mirror gets only its own config.json entry, never the registry's credentials
            credentials=from_docker_config(mirror.split("://")[-1].rstrip("/")),
            endpoint=mirror,
            **opts,
        )
        for mirror in (cfg.get("registry.mirrors") or {}).get(registry, [])
    ]
    # a loopback registry is spoken to in plain HTTP, or in HTTPS when it asks for it (see tls_fallback)
    fallback = plain and why == "loopback"
    clients.append(RegistryClient(registry, credentials=creds, insecure=plain, tls_fallback=fallback, **opts))
    return clients


_shared: dict[tuple[Any, ...], list[RegistryClient]] = {}
_shared_lock = threading.Lock()


def shared_clients(
    registry: str,
    *,
    credentials: Credentials | None = None,
    insecure: bool = False,
    authfile: str | os.PathLike[str] | None = None,
    repository: str | None = None,
    **kwargs: Any,
) -> list[RegistryClient]:
    """:func:`make_clients`, kept for the process: every source for the same registry,
    credentials and settings shares connections and tokens (a resolve and the fetch after it
    cost one token request, not two)."""
    cfg = get_config()
    settings = json.dumps([cfg.get("registry"), sorted(kwargs.items())], sort_keys=True, default=str)
    # the pid: a forked child must not share its parent's sockets
    creds = find_credentials(registry, credentials, authfile, repository)
    key = (os.getpid(), registry, creds, insecure, settings)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = _clients_for(registry, creds, insecure, **kwargs)
        return _shared[key]


def clear_shared_clients() -> None:
    """Forget the kept clients (their tokens and connections)."""
    with _shared_lock:
        _shared.clear()


def _in_parallel(calls: list[Callable[[], object]], workers: int) -> None:
    """Run ``calls`` on up to ``workers`` threads; raise the first failure (in call order) once
    the running calls have ended, none being started after a failure.

    The threads are daemons and an interrupt (Ctrl-C, SIGTERM) in the waiting thread leaves them
    behind: a download waiting for a silent registry must not hold the process's exit for the
    request's timeout and retries (a thread pool is joined at exit).
    """
    todo = list(enumerate(calls))
    failures: dict[int, BaseException] = {}
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if failures or not todo:
                    return
                i, call = todo.pop(0)
            try:
                call()
            except BaseException as exc:  # handed to the waiting thread
                with lock:
                    failures[i] = exc

    threads = [threading.Thread(target=work, name="hpcsif-blob", daemon=True) for _ in range(max(1, workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # a signal interrupts the wait, not the downloads
    if failures:
        raise failures[min(failures)]


class _Stopped(Exception):
    """A download abandoned because the pull was interrupted (Ctrl-C, SIGTERM)."""


class RegistrySource(Source):
    """Fetches images from a registry through the distribution API.

    Options: ``credentials`` (:class:`Credentials`, e.g. from ``--docker-login``),
    ``authfile`` (``--authfile FILE``), ``insecure`` (``--nohttps``), ``parallel_downloads``,
    ``retries``, ``timeout``.
    """

    def _clients(self, ref: Reference) -> list[RegistryClient]:
        extra = {k: self.options[k] for k in ("retries", "timeout", "backoff") if k in self.options}
        return shared_clients(
            ref.registry or "",
            credentials=self.options.get("credentials"),  # type: ignore[arg-type]
            insecure=bool(self.options.get("insecure")),
            authfile=self.options.get("authfile"),  # type: ignore[arg-type]
            repository=ref.repository,
            **extra,
        )

    def _with_fallback(self, ref: Reference, fn: Any) -> Any:
        """Run ``fn(client)`` on each mirror, then the registry; the first success wins."""
        clients = self._clients(ref)
        for client in clients[:-1]:
            try:
                return fn(client)
            except SourceError as exc:
                log.info("mirror %s failed for %s (%s); trying the next", client.base, ref, exc)
        return fn(clients[-1])

    def _manifest(
        self, client: RegistryClient, ref: Reference, store: OCIStore | None
    ) -> tuple[Descriptor, dict[str, Any]]:
        """The platform's image manifest; manifests and indexes are stored when ``store`` is given.

        The tag is resolved first, so every nested document is fetched and verified by digest.
        """
        repo, where = ref.repository or "", str(ref)
        docs: dict[str, dict[str, Any]] = {}

        def get(reference: str) -> Descriptor:
            data, media_type, digest = client.get_manifest(repo, reference)
            try:  # capped and checked as every document is; a SourceError lets the next mirror try
                doc = load_json_object(data, f"{where}: manifest {digest}")
            except IntegrityError as exc:
                raise SourceError(str(exc)) from None
            if store is not None and not store.has_blob(digest, len(data)):
                store.put_bytes(data, digest)
            docs[digest] = doc
            return Descriptor(media_type=doc.get("mediaType") or media_type, digest=digest, size=len(data))

        def read(desc: Descriptor) -> dict[str, Any]:
            if desc.digest not in docs:
                get(desc.digest)
            return docs[desc.digest]

        return resolve_manifest(get(ref.digest or ref.reference), read, self.platform, where)

    def resolve(self, ref: Reference) -> str:
        """The digest of the image manifest for our platform (indexes are followed)."""
        if ref.digest:
            desc, _ = self._with_fallback(ref, lambda c: self._manifest(c, ref, None))
            return desc.digest

        # a tag that names a single-platform manifest resolves with one HEAD request
        def head_or_get(client: RegistryClient) -> str:
            digest, media_type = client.head_manifest(ref.repository or "", ref.reference)
            if digest and media_type in mt.MANIFEST_TYPES:
                return digest
            return self._manifest(client, ref, None)[0].digest

        return self._with_fallback(ref, head_or_get)

    def fetch(self, ref: Reference, store: OCIStore) -> Image:
        """Fetch manifest, config and layers (in parallel) into ``store``."""
        return self._with_fallback(ref, lambda client: self._fetch(client, ref, store))

    def _progress(self, missing: list[Descriptor]) -> Callable[[int], None] | None:
        """A thread-safe byte counter feeding the ``progress(stage, done, total)`` option, if any."""
        progress = self.options.get("progress")
        if not callable(progress) or not missing:
            return None
        total, done, lock = sum(d.size for d in missing), [0], threading.Lock()

        def on_bytes(n: int) -> None:
            with lock:
                done[0] = min(done[0] + n, total)
                progress("download", done[0], total)

        return on_bytes

    def _fetch(self, client: RegistryClient, ref: Reference, store: OCIStore) -> Image:
        repo = ref.repository or ""
        mdesc, manifest = self._manifest(client, ref, store)
        config = Descriptor.from_json(manifest["config"])
        if config.size > MAX_JSON_DOCUMENT:  # refused before it is downloaded, as containers/image does
            raise document_too_large(f"{ref}: config {config.digest}")
        layers = [Descriptor.from_json(layer) for layer in manifest.get("layers") or []]
        for layer in layers:
            if layer.media_type in (mt.SIF_LAYER,) or config.media_type == mt.SIF_CONFIG:
                raise SourceError(f"{ref}: this is a SIF pushed as an ORAS artifact; pull it with oras://")
        workers = int(
            self.options.get("parallel_downloads") or get_config().get("registry.parallel_downloads", 4)
        )
        # each blob once (an image may repeat a layer), the biggest first: the shortest wall time
        blobs = list({d.digest: d for d in [config, *sorted(layers, key=lambda d: -d.size)]}.values())
        for desc in blobs:  # before any look-up by digest, for a line that names the image
            try:
                check_digest(desc.digest)
            except IntegrityError as exc:
                raise SourceError(f"{ref}: {exc}") from None
        progress = self._progress([d for d in blobs if not store.has_blob(d.digest, d.size)])
        stop = threading.Event()

        def on_bytes(n: int) -> None:
            # Ctrl-C or SIGTERM in the main thread: the downloads stop at their next block (the part
            # is kept for a resume) instead of running to the end while the process waits for them;
            # after a failure they go on, so that a retry finds their blobs stored
            if stop.is_set():
                raise _Stopped
            if progress:
                progress(n)

        try:
            _in_parallel([lambda d=d: client.fetch_blob(repo, d, store, on_bytes) for d in blobs], workers)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                stop.set()
            raise
        name = (
            f"{ref.registry}/{repo}"
            + (f":{ref.tag}" if ref.tag else "")
            + (f"@{ref.digest}" if ref.digest else "")
        )
        store.add_to_index(Descriptor(mdesc.media_type or mt.OCI_MANIFEST, mdesc.digest, mdesc.size), name)
        return load_image(store, mdesc, self.platform, str(ref))
