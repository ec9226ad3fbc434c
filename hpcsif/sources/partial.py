"""Blob downloads that a later process can resume.

A download goes to ``<store>/.partial/<hex>``, owned by one process at a time through a lock
file beside it (removed once the blob is stored). A network failure keeps the partial file, so
the next pull asks the registry for the rest with ``Range``; a download that ends with the
wrong size or digest is deleted. Only a verified blob is renamed into ``blobs/sha256/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from hpcsif.cache.locking import key_lock
from hpcsif.image.store import BlobWriter, OCIStore


@contextlib.contextmanager
def partial_blob(
    store: OCIStore, digest: str, size: int, timeout: float = 3600
) -> Iterator[BlobWriter | None]:
    """Own the partial download of ``digest``; yields None if the blob is (now) in the store.

    Another process downloading the same blob is waited for, up to ``timeout`` seconds.
    """
    hexdigest = digest.split(":", 1)[1]
    (store.root / ".partial").mkdir(exist_ok=True)
    what = f"another process downloading blob {digest}"
    lock = key_lock(store.root / ".partial" / f"{hexdigest}.lock", what)
    lock.acquire(timeout)  # logs "waiting for …"; CacheBusy when the timeout runs out
    stored = False
    try:
        if store.has_blob(digest, size):
            stored = True
            yield None
            return
        part = BlobWriter(store, digest, size, resume_path=store.root / ".partial" / hexdigest)
        try:
            yield part
        finally:
            if not part.closed:
                part.close()
        stored = store.has_blob(digest, size)
    finally:
        # once the blob is stored, any later holder of this lock would only find it there:
        # the lock files can go (a failed download keeps them, beside the part to resume)
        if stored:
            lock.discard()
        else:
            lock.release()
