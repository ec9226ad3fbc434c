"""Blob downloads that a later process can resume.

A download goes to ``<store>/.partial/<hex>``, owned by one process at a time through a lock
file beside it. A network failure keeps the partial file, so the next pull asks the registry
for the rest with ``Range``; a download that ends with the wrong size or digest is deleted.
Only a verified blob is renamed into ``blobs/sha256/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator

from hpcsif.cache.locking import key_lock
from hpcsif.errors import IntegrityError
from hpcsif.image.digest import CHUNK
from hpcsif.image.store import OCIStore

log = logging.getLogger(__name__)


class PartialBlob:
    """The (possibly resumed) partial content of one blob; hashes while writing."""

    def __init__(self, store: OCIStore, digest: str, size: int) -> None:
        self.digest, self.expected_size = digest, size
        self.final = store.blob_path(digest)
        self.path = store.root / ".partial" / digest.split(":", 1)[1]
        self._hash = hashlib.sha256()
        self.size = 0
        self._file = open(self.path, "a+b")  # noqa: SIM115 - closed by commit/discard/close
        self._file.seek(0)
        while block := self._file.read(CHUNK):
            self._hash.update(block)
            self.size += len(block)
        if self.size > size:  # cannot be a prefix of this blob
            self._restart()
        self.resumed_from = self.size

    @property
    def closed(self) -> bool:
        """True once committed, discarded or closed."""
        return self._file.closed

    def _restart(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        """Append ``data``."""
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def commit(self) -> None:
        """Verify size and digest, fsync and rename into ``blobs/``; a wrong blob is deleted."""
        digest = "sha256:" + self._hash.hexdigest()
        if self.size != self.expected_size or digest != self.digest:
            self.discard()
            if self.size != self.expected_size:
                raise IntegrityError(
                    f"blob {self.digest}: size {self.size} does not match the expected {self.expected_size}"
                )
            raise IntegrityError(f"blob digest mismatch: expected {self.digest}, got {digest}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.path, 0o644)
        os.replace(self.path, self.final)

    def discard(self) -> None:
        """Delete the partial content."""
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Keep what was downloaded for a later resume."""
        self._file.close()


@contextlib.contextmanager
def partial_blob(
    store: OCIStore, digest: str, size: int, timeout: float = 3600
) -> Iterator[PartialBlob | None]:
    """Own the partial download of ``digest``; yields None if the blob is (now) in the store.

    Another process downloading the same blob is waited for, up to ``timeout`` seconds.
    """
    hexdigest = digest.split(":", 1)[1]
    (store.root / ".partial").mkdir(exist_ok=True)
    what = f"another process downloading blob {digest}"
    lock = key_lock(store.root / ".partial" / f"{hexdigest}.lock", what)
    lock.acquire(timeout)  # logs "waiting for …"; CacheBusy when the timeout runs out
    try:
        if store.has_blob(digest, size):
            yield None
            return
        part = PartialBlob(store, digest, size)
        try:
            yield part
        finally:
            if not part.closed:
                part.close()
    finally:
        lock.release()
