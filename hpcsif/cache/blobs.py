"""The blob cache's share of ``cache.quota``: downloaded layers count, and go before any image.

Blobs (``oci/blobs/sha256/*``) only save a download when an image is converted again, while a
converted SIF saves a whole conversion, so eviction drops blobs, oldest first, before it
evicts an image. Fetches and conversions that read a root's blobs hold a shared ``flock`` on
``locks/blobs.lock`` (:func:`blobs_in_use`); eviction takes it exclusively without waiting and,
when someone is using the blobs, leaves them for a later collection rather than remove a layer
from under a conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hpcsif.cache.layout import CacheRoot

log = logging.getLogger(__name__)


def _lock_path(root: CacheRoot) -> Path:
    return root.path / "locks" / "blobs.lock"


def _open_lock(root: CacheRoot) -> int | None:
    """A descriptor on the root's blob lock file; None when it cannot be created (read-only root)."""
    try:
        return os.open(_lock_path(root), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None


@contextlib.contextmanager
def blobs_in_use(root: CacheRoot) -> Iterator[None]:
    """Keep eviction away from ``root``'s blobs while the block fetches or reads them."""
    fd = _open_lock(root)
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)  # only ever waits for an eviction in progress
        yield
    finally:
        if fd is not None:
            os.close(fd)


#: lock descriptors of :func:`pin_blobs`, by lock path; the kernel closes them at exit
_pinned: dict[Path, int] = {}


def pin_blobs(root: CacheRoot) -> None:
    """Keep eviction in other processes away from ``root``'s blobs until this process exits.

    For one-shot commands (``build``, ``pull``); their own collection after a conversion they
    have finished may still remove blobs (:func:`evict_blobs` converts the pin).
    """
    if _lock_path(root) in _pinned:
        return
    fd = _open_lock(root)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)
        _pinned[_lock_path(root)] = fd


@dataclass(frozen=True)
class Blob:
    """One stored blob file."""

    path: Path
    size: int
    mtime: float


def stored_blobs(root: CacheRoot) -> list[Blob]:
    """Every blob file of ``root``'s OCI layout (temporary ``.``-files excluded)."""
    blobs = []
    try:
        names = os.listdir(root.oci / "blobs" / "sha256")
    except OSError:
        return []
    for name in names:
        path = root.oci / "blobs" / "sha256" / name
        if name.startswith("."):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue  # removed meanwhile
        blobs.append(Blob(path, st.st_size, st.st_mtime))
    return blobs


def evict_blobs(
    root: CacheRoot, blobs: list[Blob], excess: int, *, dry_run: bool = False
) -> list[Blob] | None:
    """Remove the oldest of ``blobs`` until ``excess`` bytes are gone (or all are).

    Returns the blobs removed (or, for a dry run, those that would be), None when a fetch or a
    conversion is using the blobs right now and nothing was removed.
    """
    pinned = _pinned.get(_lock_path(root))
    fd = pinned if pinned is not None else _open_lock(root)
    if fd is None:
        return None
    try:
        try:
            # on our own pin this converts it: a second descriptor would conflict with it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.debug("blobs of %s in use: none evicted this time", root.path)
            return None
        removed: list[Blob] = []
        for blob in sorted(blobs, key=lambda b: (b.mtime, b.path.name)):
            if excess <= 0:
                break
            if not dry_run:
                try:
                    os.unlink(blob.path)
                except FileNotFoundError:
                    continue
            removed.append(blob)
            excess -= blob.size
        return removed
    finally:
        if pinned is None:
            os.close(fd)
        else:  # back to a shared pin (a failed conversion may have dropped it)
            fcntl.flock(fd, fcntl.LOCK_SH)
