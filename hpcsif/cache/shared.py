"""The shared tier: a cache root on a parallel file system that every node can read.

A node looks in its local root first; on a miss, its one local lock holder (one copier per
node) copies the image from the shared tier, or, when the shared tier lacks it too, takes the
shared tier's lock, converts locally, and publishes the result to the shared tier, so the whole
cluster converts each image once. Locks on the shared tier use ``cache.shared_lock_mode``
(``excl`` by default: ``O_EXCL`` files with a heartbeat, safe on NFS and Lustre).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from hpcsif.cache.layout import CacheRoot
from hpcsif.cache.store import Producer, SIFStore, produce_copy, validate_sif
from hpcsif.config import get_config
from hpcsif.errors import CacheError

log = logging.getLogger(__name__)


def shared_store(location: str) -> SIFStore:
    """The shared tier at ``location`` (a path or ``file://`` URL); read-only if we cannot write it."""
    if "://" in location:
        scheme, path = location.split("://", 1)
        if scheme != "file":
            raise CacheError(
                f"cache.shared_dir {location!r}: use a path on a shared file system (or a file:// URL)"
            )
        location = path
    root = CacheRoot(Path(location).absolute())
    try:
        root.ensure()
    except CacheError:
        root = CacheRoot(root.path, writable=False)
    if root.writable and not os.access(root.path / "sif", os.W_OK):
        root = CacheRoot(root.path, writable=False)
    return SIFStore(root, lock_mode=get_config().get("cache.shared_lock_mode", "excl"))


def tiered_producer(shared: SIFStore, key: str, name: str, convert: Producer, what: str) -> Producer:
    """Wrap ``convert`` so that a local build first tries the shared tier, and feeds it on a miss."""

    def produce(dest: Path) -> dict[str, Any]:
        if not shared.root.writable:
            entry = shared.lookup(key)
            return produce_copy(entry)(dest) if entry else convert(dest)
        converted: dict[str, Any] = {}

        def upload(shared_dest: Path) -> dict[str, Any]:
            converted.update(convert(dest))
            validate_sif(dest)
            log.info("publishing %s to the shared cache %s", what, shared.root.path)
            shutil.copyfile(dest, shared_dest)
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
