"""The shared tier: a cache root that every node can read, on a parallel file system or behind an fsspec URL.

A node looks in its local root first; on a miss, its one local lock holder (one copier per
node) copies the image from the shared tier, or, when the shared tier lacks it too, converts
locally and publishes the result to the shared tier, so the whole cluster converts each image
once.

* A **path** (or ``file://`` URL) is a full cache root. Its conversions are serialised by a
  lock in ``cache.shared_lock_mode`` (``excl`` by default: ``O_EXCL`` files with a heartbeat,
  safe on NFS and Lustre), so only one node converts while the others wait and then copy.
* Any other **fsspec URL** (``s3://bucket/hpcsif``, ``sftp://host/path`` …) holds the same
  ``sif/<key>/`` layout. Object stores offer no locks, so two nodes that miss at the same
  moment may both convert; ``meta.json`` is uploaded last and marks a complete entry.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hpcsif.cache.layout import CacheRoot
from hpcsif.cache.store import META, Producer, SIFStore, produce_copy, validate_sif
from hpcsif.config import get_config
from hpcsif.errors import CacheError, HpcsifError
from hpcsif.fsutil import copy_file

log = logging.getLogger(__name__)

_PROVENANCE = ("ref", "digest", "options", "transport")


def _local_path(location: str) -> Path | None:
    """The directory of a path or ``file://`` location; None for other URLs."""
    if "://" not in location:
        return Path(location)
    scheme, path = location.split("://", 1)
    return Path(path) if scheme == "file" else None


def shared_store(location: str) -> SIFStore:
    """The shared tier at a path; read-only if we cannot write it."""
    path = _local_path(location)
    if path is None:
        raise CacheError(f"cache.shared_dir {location!r} is a URL, not a path")
    root = CacheRoot(path.absolute())
    try:
        root.ensure(private=False)  # other nodes' processes, maybe other users, read it
    except CacheError:
        root = CacheRoot(root.path, writable=False)
    if root.writable and not os.access(root.path / "sif", os.W_OK):
        root = CacheRoot(root.path, writable=False)
    return SIFStore(root, lock_mode=get_config().get("cache.shared_lock_mode", "excl"))


def tiered_producer(location: str, key: str, name: str, convert: Producer, what: str) -> Producer:
    """Wrap ``convert`` so that a local build first tries the shared tier, and feeds it on a miss."""
    if _local_path(location) is None:
        return _url_producer(location, key, name, convert, what)
    return _path_producer(shared_store(location), key, name, convert, what)


def _path_producer(shared: SIFStore, key: str, name: str, convert: Producer, what: str) -> Producer:
    def produce(dest: Path) -> dict[str, Any]:
        if not shared.root.writable:
            entry = shared.lookup(key)
            return produce_copy(entry)(dest) if entry else convert(dest)
        converted: dict[str, Any] = {}

        def upload(shared_dest: Path) -> dict[str, Any]:
            converted.update(convert(dest))
            validate_sif(dest)
            log.info("publishing %s to the shared cache %s", what, shared.root.path)
            copy_file(dest, shared_dest)
            return {**converted, "via": "upload"}

        try:
            entry, _ = shared.get_or_create(key, name, upload, what=what)
        except (CacheError, OSError) as exc:
            if not converted:
                raise
            # the image is built; a full or failing shared tier must not fail this request
            log.warning("could not publish %s to the shared cache %s: %s", what, shared.root.path, exc)
            return converted
        return converted or produce_copy(entry)(dest)

    return produce


def _url_producer(url: str, key: str, name: str, convert: Producer, what: str) -> Producer:
    def produce(dest: Path) -> dict[str, Any]:
        import fsspec

        try:
            fs, base = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise CacheError(f"cache.shared_dir {url!r}: {exc}") from None
        entry = f"{base.rstrip('/')}/sif/{key}"
        try:
            if fs.exists(f"{entry}/{META}"):
                meta = json.loads(fs.cat_file(f"{entry}/{META}"))
                fs.get_file(f"{entry}/{meta['name']}", str(dest))
                validate_sif(dest)
                kept = {k: v for k, v in meta.items() if k in _PROVENANCE}
                return {**kept, "via": "copy", "origin": url}
        except HpcsifError as exc:
            log.warning("ignoring the broken copy of %s in %s: %s", what, url, exc)
        except Exception as exc:  # fsspec back ends raise their own error types
            log.warning("cannot read %s from the shared cache %s: %s", what, url, exc)
        info = convert(dest)
        validate_sif(dest)
        try:
            log.info("publishing %s to the shared cache %s", what, url)
            fs.put_file(str(dest), f"{entry}/{name}")
            fs.pipe_file(f"{entry}/{META}", json.dumps({**info, "name": name, "key": key}).encode())
        except Exception as exc:  # best effort: the image is built either way
            log.warning("could not publish %s to the shared cache %s: %s", what, url, exc)
        return info

    return produce
