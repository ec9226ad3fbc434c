"""An OCI image layout used as a content-addressed blob store.

The layout (``oci-layout``, ``index.json``, ``blobs/sha256/…``) is the blob cache that all
images share, as Singularity's cache does. Blobs are written to a temporary file in the
same directory, verified against their digest while streaming, fsynced and renamed into
place, so a reader never sees a partial or wrong blob. ``index.json`` is only rewritten
under a file lock and atomically, and entries are never duplicated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from hpcsif.errors import IntegrityError, NotFoundError
from hpcsif.fsutil import atomic_write_bytes, flocked, read_regular
from hpcsif.image import mediatypes as mt
from hpcsif.image.digest import CHUNK, check_digest
from hpcsif.image.model import Descriptor


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted JSON bytes, as registries and umoci write them."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


#: the largest JSON document (index, manifest, config) held in memory: containers/image's limit
#: for manifests and configs, which Apptainer inherits (and the registry's for manifests)
MAX_JSON_DOCUMENT = 4 << 20


def document_too_large(what: str) -> IntegrityError:
    """The error for a JSON document over :data:`MAX_JSON_DOCUMENT`, in containers/image's words."""
    return IntegrityError(f"{what}: exceeded maximum allowed size of {MAX_JSON_DOCUMENT} bytes (4 MiB)")


def read_document(path: Path, what: str) -> bytes:
    """The bytes of the JSON document file *path*, never reading more than the limit allows.

    Only a regular file is read (a FIFO would block); FileNotFoundError propagates.
    """
    try:
        data = read_regular(path, MAX_JSON_DOCUMENT)
    except IsADirectoryError:
        data = None
    if data is None:
        raise IntegrityError(f"{what} is not a regular file")
    if len(data) > MAX_JSON_DOCUMENT:
        raise document_too_large(what)
    return data


def load_json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """Parse an OCI JSON document that must be an object; hostile input raises IntegrityError."""
    if len(data) > MAX_JSON_DOCUMENT:
        raise document_too_large(what)
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise IntegrityError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what} is not a JSON object (got {type(obj).__name__})")
    return obj


class BlobWriter:
    """A file-like sink for one blob: hashes while writing, publishes on :meth:`commit`.

    With ``resume_path`` the blob is written there and what an earlier, interrupted writer
    left in it is kept (and hashed): :attr:`resumed_from` bytes are already there.
    """

    def __init__(
        self,
        store: OCIStore,
        expected_digest: str | None,
        expected_size: int | None,
        *,
        resume_path: Path | None = None,
    ) -> None:
        self._store = store
        self.expected_digest = check_digest(expected_digest) if expected_digest else None
        self.expected_size = expected_size
        self._hash = hashlib.sha256()
        self.size = 0
        if resume_path is None:
            fd, self.tmp_path = tempfile.mkstemp(prefix=".ingest-", suffix=".tmp", dir=store.blobs_dir)
            self._file = os.fdopen(fd, "wb")
        else:
            self.tmp_path = str(resume_path)
            self._file = open(resume_path, "a+b")  # noqa: SIM115 - closed by commit/discard/close
            self._file.seek(0)
            while block := self._file.read(CHUNK):
                self._hash.update(block)
                self.size += len(block)
            if expected_size is not None and self.size > expected_size:  # not a prefix of it
                self._file.truncate(0)
                self._hash, self.size = hashlib.sha256(), 0
        self.resumed_from = self.size

    @property
    def closed(self) -> bool:
        """True once committed, discarded or closed."""
        return self._file.closed

    def close(self) -> None:
        """Stop writing but keep what was written (a resumable download)."""
        self._file.close()

    def write(self, data: bytes) -> int:
        """Append ``data`` to the blob being written."""
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    @property
    def digest(self) -> str:
        """The digest of what has been written so far."""
        return "sha256:" + self._hash.hexdigest()

    def commit(self) -> str:
        """Verify digest and size, fsync and rename into ``blobs/``; return the digest."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = self.digest
        try:
            if self.expected_size is not None and self.size != self.expected_size:
                raise IntegrityError(
                    f"blob {self.expected_digest or digest}: size {self.size} does not match "
                    f"the expected {self.expected_size}"
                )
            if self.expected_digest and digest != self.expected_digest:
                raise IntegrityError(f"blob digest mismatch: expected {self.expected_digest}, got {digest}")
            os.chmod(self.tmp_path, 0o644)
            os.replace(self.tmp_path, self._store.blob_path(digest))
        finally:
            self.discard()
        return digest

    def discard(self) -> None:
        """Drop the temporary file (no-op after a successful commit)."""
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)


class OCIStore:
    """A directory holding an OCI image layout; blobs are shared by every image in it."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        layout = self.root / "oci-layout"
        if create:
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            if not layout.exists():
                atomic_write_bytes(layout, json.dumps({"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}).encode())
            if not (self.root / "index.json").exists():
                with flocked(self.root / ".index.json.lock"):  # concurrent pulls into one store
                    if not (self.root / "index.json").exists():
                        self._write_index({"schemaVersion": 2, "manifests": []})
        elif not layout.is_file():
            raise NotFoundError(f"{self.root}: not an OCI image layout (no oci-layout file)")

    # -- blobs -------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        """Where the blob with ``digest`` lives (it may not exist)."""
        return self.blobs_dir / check_digest(digest).split(":", 1)[1]

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """True if the blob is present (and has ``size`` bytes when given)."""
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def read_blob(self, digest: str) -> bytes:
        """Read a JSON document blob (at most :data:`MAX_JSON_DOCUMENT`) whole, verifying its digest."""
        try:
            data = read_document(self.blob_path(digest), f"blob {digest}")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is missing from {self.root}") from None
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise IntegrityError(f"blob {digest} in {self.root} is corrupt (content hashes to {actual})")
        return data

    def read_json(self, digest: str) -> Any:
        """Read and parse a JSON blob (manifest, index, config): it must be a JSON object."""
        return load_json_object(self.read_blob(digest), f"blob {digest}")

    @contextlib.contextmanager
    def blob_writer(self, digest: str | None = None, size: int | None = None) -> Iterator[BlobWriter]:
        """Context manager yielding a :class:`BlobWriter`; commits on success, discards on error."""
        writer = BlobWriter(self, digest, size)
        try:
            yield writer
        except BaseException:
            writer.discard()
            raise
        writer.commit()

    def put_stream(self, stream: BinaryIO, digest: str | None = None, size: int | None = None) -> str:
        """Copy a stream into the store (verified when ``digest``/``size`` are given)."""
        if digest and self.has_blob(digest, size):
            return digest
        with self.blob_writer(digest, size) as w:
            while block := stream.read(CHUNK):
                w.write(block)
        return w.digest

    def put_bytes(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data``; returns its digest."""
        with self.blob_writer(digest, len(data)) as w:
            w.write(data)
        return w.digest

    def put_json(self, obj: Any, media_type: str) -> Descriptor:
        """Store a JSON document canonically and return its descriptor."""
        data = canonical_json(obj)
        digest = self.put_bytes(data)
        return Descriptor(media_type=media_type, digest=digest, size=len(data))

    # -- index.json ----------------------------------------------------------------------------

    def _write_index(self, index: dict[str, Any]) -> None:
        atomic_write_bytes(self.root / "index.json", json.dumps(index, indent=1).encode())

    def index(self) -> dict[str, Any]:
        """The parsed ``index.json``."""
        try:
            data = read_document(self.root / "index.json", f"{self.root}/index.json")
        except FileNotFoundError:
            raise NotFoundError(f"{self.root}: OCI layout has no index.json") from None
        return load_json_object(data, f"{self.root}/index.json")

    def add_to_index(self, desc: Descriptor, ref_name: str | None = None) -> None:
        """Record ``desc`` in ``index.json`` (optionally tagged), replacing an entry with the same tag."""
        annotations = dict(desc.annotations)
        if ref_name:
            annotations[mt.REF_NAME] = ref_name
        entry = Descriptor(desc.media_type, desc.digest, desc.size, annotations, desc.platform).to_json()
        with flocked(self.root / ".index.json.lock"):  # concurrent pulls into one store
            index = self.index()
            kept = []
            for m in index.get("manifests", []):
                same_tag = ref_name and (m.get("annotations") or {}).get(mt.REF_NAME) == ref_name
                if same_tag or m == entry:
                    continue
                kept.append(m)
            kept.append(entry)
            index["manifests"] = kept
            self._write_index(index)

    def blobs(self) -> Iterator[tuple[str, int]]:
        """Every stored blob as (digest, size)."""
        for p in self.blobs_dir.iterdir():
            if not p.name.startswith("."):
                yield "sha256:" + p.name, p.stat().st_size
