"""Digest parsing and hashing helpers (only sha256 is accepted for content we store)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import BinaryIO

from hpcsif.errors import IntegrityError

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
CHUNK = 1 << 20


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed ``sha256:<64 hex>``, else raise IntegrityError."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise IntegrityError(f"invalid or unsupported digest {digest!r} (expected sha256:<64 hex digits>)")
    return digest


def sha256_bytes(data: bytes) -> str:
    """The ``sha256:…`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk: int = CHUNK) -> str:
    """The ``sha256:…`` digest of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def sha256_stream(stream: BinaryIO | Iterable[bytes], chunk: int = CHUNK) -> tuple[str, int]:
    """Digest and length of a stream or iterable of byte chunks."""
    h = hashlib.sha256()
    n = 0
    blocks = iter(lambda: stream.read(chunk), b"") if hasattr(stream, "read") else stream
    for block in blocks:
        h.update(block)
        n += len(block)
    return "sha256:" + h.hexdigest(), n
