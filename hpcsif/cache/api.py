"""``ensure_image`` and ``leased_image``: a cached SIF for any reference, converted once.

A warm hit parses the reference, finds its digest (for tags: a record younger than
``cache.tag_ttl``; for archives: a record keyed on the file's identity), stats the entry and
checks it is trusted, with no network request. ``HPCSIF_OFFLINE=1`` (or ``offline=True``)
never touches the network; ``cache_first`` uses a remembered tag at any age when there is one;
``refresh`` asks the registry what a tag names now, at any age (``pull``, as Apptainer's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcsif.cache.layout import CacheLayout, CacheRoot, cache_layout
from hpcsif.cache.leases import acquire_lease
from hpcsif.cache.locking import key_lock
from hpcsif.cache.store import Entry, Producer, SIFStore
from hpcsif.cache.trust import check_trusted_path
from hpcsif.config import env_flag, get_config
from hpcsif.convert import ConvertOptions
from hpcsif.errors import CacheError, OfflineError
from hpcsif.image.store import atomic_write_bytes
from hpcsif.refs import Reference, parse

log = logging.getLogger(__name__)

_LOCAL_FILES = ("docker-archive", "oci-archive")  # keyed on the input file's bytes
_NO_NETWORK = ("oci", *_LOCAL_FILES)  # resolving these reads only local files


@dataclass(frozen=True)
class Request:
    """One resolved request: what to build and under which key."""

    ref: Reference
    options: ConvertOptions
    source_options: dict[str, Any]
    digest: str
    key: str
    name: str

    @property
    def what(self) -> str:
        """How messages name the image."""
        return str(self.ref)


def _record_path(root: CacheRoot, ident: str) -> Path:
    return root.tags / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json")


def _read_record(layout: CacheLayout, ident: str) -> dict[str, Any] | None:
    for root in (layout.user, *([layout.system] if layout.system else [])):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(_record_path(root, ident).read_text())
            if record.get("ident") == ident:
                return record
    return None


def _write_record(root: CacheRoot, ident: str, digest: str) -> None:
    record = {"ident": ident, "digest": digest, "resolved": time.time()}
    with contextlib.suppress(OSError):
        atomic_write_bytes(_record_path(root, ident), json.dumps(record).encode())


def _identity(ref: Reference, options: ConvertOptions) -> str:
    """What a tag record is keyed on: the reference, platform, and for local files their identity."""
    # source options (credentials …) do not change what a tag names, and must never be written
    ident: dict[str, Any] = {"ref": str(ref), "platform": str(options.platform)}
    if ref.transport == "oras":  # records of its SIF's digest, not (as before) its manifest's
        ident["names"] = "sif-layer"
    if ref.transport in _LOCAL_FILES:
        st = os.stat(ref.path or "")
        ident["file"] = [os.path.realpath(ref.path or ""), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    return json.dumps(ident, sort_keys=True)


def _resolve_digest(
    layout: CacheLayout,
    ref: Reference,
    options: ConvertOptions,
    source_options: dict[str, Any],
    *,
    offline: bool,
    max_age: float,
) -> str:
    """The content digest of ``ref``, from a record younger than ``max_age`` seconds (local
    files: any record of the unchanged file; offline: any record), else from its source.

    Concurrent cold requests resolve once: the first asks the source under a lock, the
    others wait for its record (so 64 ranks make one registry request, or hash an archive once).
    """
    if ref.is_registry and ref.digest and ref.transport != "oras":  # oras: keyed on the SIF layer
        return ref.digest
    if ref.transport == "oci":  # reading the layout's index is as cheap as a record
        return _source_digest(ref, options, source_options)
    try:
        ident = _identity(ref, options)
    except FileNotFoundError:
        raise CacheError(f"{ref.raw}: no such file {ref.path}") from None

    def usable(record: dict[str, Any] | None) -> bool:
        # local files: valid as long as the file is unchanged (its identity is in the ident);
        # what a manifest digest names never changes
        if not record:
            return False
        age = time.time() - float(record.get("resolved", 0))
        return ref.transport in _LOCAL_FILES or bool(ref.digest) or offline or age <= max_age

    if usable(record := _read_record(layout, ident)):
        return str(record["digest"])
    if offline and ref.transport not in _NO_NETWORK:
        raise OfflineError(f"{ref}: not in the cache, and offline mode forbids asking the registry")
    path = _record_path(layout.user, ident)
    lock = key_lock(path.with_suffix(".lock"), f"resolution of {ref}")
    started = time.time()

    def fresh_digest() -> str | None:
        record = _read_record(layout, ident)
        return str(record["digest"]) if record and float(record.get("resolved", 0)) >= started else None

    taken = lock.acquire(done=lambda: fresh_digest() is not None)
    try:
        if digest := fresh_digest():
            return digest
        if not taken:  # the record vanished again (cache clean): resolve ourselves
            lock.acquire()
        log.info("resolving %s", ref)
        digest = _source_digest(ref, options, source_options)
        _write_record(layout.user, ident, digest)
        return digest
    finally:
        lock.release()


def _source_digest(ref: Reference, options: ConvertOptions, source_options: dict[str, Any]) -> str:
    """What ``ref``'s source says its content digest is (a registry or file request)."""
    from hpcsif.sources import SIF_TRANSPORTS, get_source, sif_digest

    if ref.transport in SIF_TRANSPORTS:  # oras://, http(s)://: as Apptainer's oras and net caches
        return sif_digest(ref, source_options)
    return get_source(ref, platform=options.platform, **source_options).resolve(ref)


def _request(
    layout: CacheLayout,
    ref: Reference,
    options: ConvertOptions | None,
    source_options: dict[str, Any] | None,
    offline: bool,
    max_age: float,
) -> Request:
    options = options or ConvertOptions.from_config()
    source_options = dict(source_options or {})
    digest = _resolve_digest(layout, ref, options, source_options, offline=offline, max_age=max_age)
    from hpcsif.sources import SIF_TRANSPORTS

    # a downloaded SIF is the same file whatever the conversion options (Apptainer's oras and net caches)
    key = digest.split(":", 1)[-1]
    if ref.transport not in SIF_TRANSPORTS:
        key = f"{key}-{options.key()}"
    return Request(ref, options, source_options, digest, key, f"{ref.cache_name()}.sif")


def _converter(layout: CacheLayout, req: Request) -> Producer:
    """Fetch into the blob cache and convert; the producer the store calls under the key's lock."""
    # a registry tag is pinned to the digest it resolved to, so the key names what is built (an
    # oras:// one names the SIF's own digest, which the download is given instead)
    ref = req.ref.with_digest(req.digest) if req.ref.transport == "docker" else req.ref

    def convert(dest: Path) -> dict[str, Any]:
        from hpcsif.cache.blobs import blobs_in_use
        from hpcsif.convert import fetch_image, image_to_sif
        from hpcsif.image.store import OCIStore

        log.info("converting %s (%s)", req.what, req.digest)
        with blobs_in_use(layout.user):
            image = fetch_image(ref, OCIStore(layout.user.oci), req.options, req.source_options)
            image_to_sif(image, dest, req.options, ref=req.ref)
        return {
            "via": "convert",
            "ref": str(req.ref),
            "digest": req.digest,
            "options": req.options.key(),
            "transport": req.ref.transport,
        }

    def download(dest: Path) -> dict[str, Any]:
        from hpcsif.sources import download_sif

        log.info("downloading %s (%s)", req.what, req.digest)
        download_sif(ref, dest, req.source_options, req.digest)
        return {"via": "download", "ref": str(req.ref), "digest": req.digest, "transport": req.ref.transport}

    from hpcsif.sources import SIF_TRANSPORTS

    produce = download if req.ref.transport in SIF_TRANSPORTS else convert
    if layout.shared:
        from hpcsif.cache.shared import tiered_producer

        return tiered_producer(layout.shared, req.key, req.name, produce, req.what)
    return produce


def _lookup(layout: CacheLayout, key: str) -> Entry | None:
    for root in layout.lookup_roots:
        if entry := SIFStore(root).lookup(key):
            return entry
    return None


def _obtain(layout: CacheLayout, req: Request, offline: bool) -> Entry:
    """The entry for ``req``: a hit in any root, else built once in the user root."""
    entry = _lookup(layout, req.key)
    if entry is None:
        if offline:
            raise OfflineError(f"{req.what}: not in the cache, and offline mode forbids fetching it")
        store = SIFStore(layout.user)
        entry, built = store.get_or_create(req.key, req.name, _converter(layout, req), what=req.what)
        if built:
            _collect_after_publish(layout.user, req.key)
    check_trusted_path(entry.path)
    SIFStore(entry.root).touch(entry)
    return entry


def _collect_after_publish(root: CacheRoot, key: str) -> None:
    """Keep the user cache within its quota; a failure here must not fail the request."""
    from hpcsif.cache.eviction import collect_garbage

    try:
        collect_garbage(root, protect={key})
    except CacheError as exc:
        log.warning("cache garbage collection failed: %s", exc)


def _prepare(
    ref: str,
    options: ConvertOptions | None,
    offline: bool | None,
    cache_first: bool,
    source_options: dict | None,
    refresh: bool = False,
) -> tuple[CacheLayout, Request, bool] | Path:
    parsed = parse(ref)
    if parsed.transport in ("sif", "sandbox"):
        return check_trusted_path(parsed.path or ref)
    offline = env_flag("HPCSIF_OFFLINE") if offline is None else offline
    layout = cache_layout()
    # how old a remembered tag resolution may be
    max_age = -math.inf if refresh else math.inf if cache_first else float(get_config().get("cache.tag_ttl"))
    return layout, _request(layout, parsed, options, source_options, offline, max_age), offline


def ensure_image(
    ref: str,
    *,
    options: ConvertOptions | None = None,
    offline: bool | None = None,
    cache_first: bool = False,
    refresh: bool = False,
    source_options: dict[str, Any] | None = None,
) -> Path:
    """The path of a cached, trusted SIF for ``ref``, converting it exactly once across processes.

    Local SIF files (and sandbox directories) are returned as they are, after the trust check.
    ``offline`` (default: ``HPCSIF_OFFLINE``) forbids network access and raises
    :class:`OfflineError` when the image is not cached; ``cache_first`` reuses a remembered
    tag resolution regardless of its age; ``refresh`` asks the registry what the tag names now
    even within ``cache.tag_ttl`` (one manifest request: what ``pull`` wants, as a user who
    has just pushed a new image under the tag expects it). ``source_options`` go to the
    source (credentials …).
    """
    prepared = _prepare(ref, options, offline, cache_first, source_options, refresh)
    if isinstance(prepared, Path):
        return prepared
    layout, req, off = prepared
    return _obtain(layout, req, off).path


@contextlib.contextmanager
def leased_image(
    ref: str,
    *,
    holder: str | None = None,
    options: ConvertOptions | None = None,
    offline: bool | None = None,
    cache_first: bool = False,
    refresh: bool = False,
    source_options: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """Like :func:`ensure_image`, holding a lease (this process, or ``holder="job:ID"``) meanwhile.

    While the lease is held, eviction leaves the image alone.
    """
    prepared = _prepare(ref, options, offline, cache_first, source_options, refresh)
    if isinstance(prepared, Path):
        yield prepared
        return
    layout, req, off = prepared
    entry = _obtain(layout, req, off)
    root = entry.root if os.access(entry.root.lease_dir(req.key).parent, os.W_OK) else layout.user
    with acquire_lease(root, req.key, holder=holder, ref=req.what):
        # eviction may have run between finding the entry and taking the lease
        entry = _obtain(layout, req, off)
        yield entry.path


@contextlib.contextmanager
def downloaded_sif(
    ref: str,
    source_options: dict[str, Any],
    *,
    aside: Path | None = None,
    options: ConvertOptions | None = None,
) -> Iterator[Path]:
    """The SIF an ``oras://`` (or ``http(s)://``) reference names, while it is read: in the SIF
    cache, leased, the source asked which SIF a tag names now (as Apptainer's ``pull`` and
    ``build`` ask), or, with *aside* (the cache disabled), downloaded to that file."""
    if aside is not None:
        from hpcsif.sources import download_sif

        yield download_sif(parse(ref), aside, source_options)
        return
    with leased_image(ref, options=options, source_options=source_options, refresh=True) as path:
        yield path
