"""Read image archives (``docker save``, oci-archive) into an OCI blob store.

An uncompressed tar is only indexed: its small documents (manifests, configs, index) go to the
store and every large member (a layer) stays where it is, read in place later as a byte range
of the archive (its digest is verified while it streams). A compressed archive is read
sequentially in one pass, its members copied into the store; nothing but the small JSON
documents is ever held in memory: ``index.json`` and ``manifest.json`` (each at most
:data:`~hpcsif.image.store.MAX_JSON_DOCUMENT`); the other small members go to the store only.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hpcsif.errors import IntegrityError, NotFoundError, SourceError
from hpcsif.image.digest import CHUNK, sha256_file
from hpcsif.image.model import BlobSpan
from hpcsif.image.store import MAX_JSON_DOCUMENT, OCIStore, document_too_large

# members up to this size are copied into the store at once (documents, small layers); larger
# ones are left in place in an uncompressed tar, or streamed into the store
_SMALL = MAX_JSON_DOCUMENT
#: the archive's own top-level documents, the only members kept in memory
_TOP_DOCUMENTS = frozenset({"index.json", "manifest.json"})
_BLOB_NAME = re.compile(r"^blobs/sha256/([a-f0-9]{64})$")
_MAX_LINK_HOPS = 8  # links to links followed to a regular member (a loop ends there)


def member_name(name: str) -> str:
    """An archive member's name (or a name manifest.json gives) as the members are looked up:
    ``./index.json``, ``/index.json`` (``tar -P``, which Apptainer reads) and ``index.json``
    are one name; ``../x`` stays outside and is never found."""
    return posixpath.normpath(name).lstrip("/")


@dataclass
class ArchiveContents:
    """What one pass over an archive found: its top documents by name and stored blobs by name."""

    documents: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, str] = field(default_factory=dict)  # member name -> digest in the store
    spans: dict[str, BlobSpan] = field(default_factory=dict)  # member name -> bytes left in place
    links: dict[str, str] = field(default_factory=dict)  # link member name -> the name it points at

    def add_link(self, member: tarfile.TarInfo) -> None:
        """Record a symlink or hard link member, resolved by :meth:`resolve_links`."""
        name = member_name(member.name)
        if member.issym():  # relative to the link's directory, joined as containers/image joins it
            target = member_name(f"{posixpath.dirname(name)}/{member.linkname}")
        else:
            target = member_name(member.linkname)
        self.links[name] = target

    def resolve_links(self) -> None:
        """Give each link member the content of the regular member it names, as Apptainer does:
        ``docker save`` (before Docker 25) links a layer that the archive holds twice to its first
        copy. Names are only looked up among the members; nothing is read outside the archive."""
        for name, target in self.links.items():
            for _ in range(_MAX_LINK_HOPS):
                if target not in self.links:
                    break
                target = self.links[target]
            if target in self.blobs:
                self.blobs.setdefault(name, self.blobs[target])
            elif target in self.spans:
                self.spans.setdefault(name, self.spans[target])

    def blob_spans(self) -> dict[str, BlobSpan]:
        """Spans of members named ``blobs/sha256/<hex>``, by digest."""
        out = {}
        for name, span in self.spans.items():
            m = _BLOB_NAME.fullmatch(name)
            if m:
                out[f"sha256:{m.group(1)}"] = span
        return out

    def document(self, name: str, where: str) -> bytes:
        """A top document's bytes (``index.json``, ``manifest.json``); NotFoundError if absent."""
        try:
            return self.documents[member_name(name)]
        except KeyError:
            raise NotFoundError(f"{where}: archive has no {name}") from None


def input_digest(path: str | os.PathLike[str]) -> str:
    """The digest of an input file's bytes (the cache key for archives)."""
    if _is_stream(Path(path)):
        raise SourceError(
            f"{path}: a pipe or device can be read once only, and the cache must hash it before "
            "converting: use `hpcsif build OUT.sif` with it, or save it to a file first"
        )
    try:
        return sha256_file(str(path))
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory, expected an archive file") from None


def selection_digest(path: str | os.PathLike[str], name: str | None) -> str:
    """The cache key for the image ``name`` chosen in the archive at ``path`` (None: its only image).

    Without a name it is the file's digest; with one, a digest of both, so that the images of a
    multi-image archive never share a cached SIF.
    """
    digest = input_digest(path)
    if name is None:
        return digest
    return "sha256:" + hashlib.sha256(f"{digest}\n{name}".encode()).hexdigest()


def read_archive(path: str | os.PathLike[str], store: OCIStore, where: str) -> ArchiveContents:
    """Index an uncompressed tar in place, or stream a compressed one (or a pipe) into ``store``."""
    path = Path(path)
    if _is_stream(path):  # `docker save img | hpcsif build out.sif docker-archive:/dev/stdin`
        return ingest_archive(path, store, where)
    try:
        with open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        head = b""  # ingest_archive names the problem
    if len(head) == tarfile.BLOCKSIZE and head[257:262] == b"ustar":
        return index_tar(path, store, where)
    return ingest_archive(path, store, where)


def _is_stream(path: Path) -> bool:
    """True for a FIFO, a pipe or a character device: read once, front to back, no seeking."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


def index_tar(path: Path, store: OCIStore, where: str) -> ArchiveContents:
    """Store an uncompressed tar's small members; record where its large ones are."""
    size = path.stat().st_size
    out = ArchiveContents()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.issym() or member.islnk():
                    out.add_link(member)
                if not member.isfile():
                    continue
                name = member_name(member.name)
                if member.offset_data + member.size > size:
                    raise SourceError(f"{where}: archive is truncated (in {name})")
                if member.size <= _SMALL:
                    src = tar.extractfile(member)
                    assert src is not None  # regular files always have data
                    _keep_small(out, store, name, src.read())
                elif name in _TOP_DOCUMENTS:
                    raise document_too_large(f"{where}: {name}")
                else:
                    out.spans[name] = BlobSpan(path, member.offset_data, member.size)
        out.resolve_links()
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    except (tarfile.TarError, EOFError) as exc:
        raise SourceError(f"{where}: not a readable tar archive, or truncated ({exc})") from None
    except OSError as exc:
        raise SourceError(f"{where}: read error: {exc}") from None
    return out


def ingest_archive(path: str | os.PathLike[str], store: OCIStore, where: str) -> ArchiveContents:
    """Read every regular member of the archive file at ``path`` into ``store``."""
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after streaming
    except FileNotFoundError:
        raise NotFoundError(f"{where}: no such file {path}") from None
    except IsADirectoryError:
        raise SourceError(f"{where}: {path} is a directory, expected an archive file") from None
    except OSError as exc:
        raise SourceError(f"{where}: cannot read {path}: {exc.strerror}") from None
    with f:
        return ingest_fileobj(f, store, where)


def ingest_fileobj(stream: IO[bytes], store: OCIStore, where: str) -> ArchiveContents:
    """Read every regular member of a tar stream (plain, gzip, bzip2 or xz) into ``store``.

    Members named ``blobs/sha256/<hex>`` are verified against their name. Every other
    member is stored under the digest of its content; ``index.json`` and ``manifest.json``
    are also kept in memory.
    """
    out = ArchiveContents()
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    _ingest_member(tar, member, store, out, where)
                elif member.issym() or member.islnk():
                    out.add_link(member)
        out.resolve_links()
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise SourceError(f"{where}: not a readable tar archive, or truncated ({exc})") from None
    except OSError as exc:
        raise SourceError(f"{where}: read error: {exc}") from None
    return out


def _ingest_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, store: OCIStore, out: ArchiveContents, where: str
) -> None:
    name = member_name(member.name)
    src = tar.extractfile(member)
    assert src is not None  # regular files always have data
    m = _BLOB_NAME.fullmatch(name)
    expected = f"sha256:{m.group(1)}" if m else None
    if member.size <= _SMALL:
        data = src.read()
        if len(data) != member.size:
            raise SourceError(f"{where}: archive is truncated (in {name})")
        _keep_small(out, store, name, data)
    elif name in _TOP_DOCUMENTS:
        raise document_too_large(f"{where}: {name}")
    elif expected and store.has_blob(expected, member.size):
        out.blobs[name] = expected  # repeat blob: the tar reader skips its data
    else:
        with store.blob_writer(expected, member.size) as w:
            while block := src.read(CHUNK):
                w.write(block)
        if w.size != member.size:
            raise SourceError(f"{where}: archive is truncated (in {name})")
        out.blobs[name] = w.digest


def _keep_small(out: ArchiveContents, store: OCIStore, name: str, data: bytes) -> None:
    """Put a small member in the store (verified when named by its digest); keep a top document."""
    m = _BLOB_NAME.fullmatch(name)
    expected = f"sha256:{m.group(1)}" if m else None
    if name in _TOP_DOCUMENTS:
        out.documents[name] = data
    have = expected is not None and store.has_blob(expected)
    out.blobs[name] = expected if have else store.put_bytes(data, expected)
