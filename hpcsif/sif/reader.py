"""Read SIF files: header, descriptor table and data objects.

:class:`SIFImage` opens a file read-only, validates the header and every used descriptor
against the file size, and reads objects with ``pread`` so that large partitions are never
loaded whole.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from hpcsif.errors import SIFError
from hpcsif.sif.format import (
    DESCRIPTOR_SIZE,
    HEADER_SIZE,
    DataType,
    Descriptor,
    FSType,
    Header,
    PartType,
    label_of,
)
from hpcsif.sif.superblock import SQUASHFS_MAGIC, SUPERBLOCK_SIZE, squashfs_bytes_used

_CHUNK = 1 << 20
#: most bytes :meth:`SIFImage.read_object` loads into memory: metadata objects (JSON, def file,
#: signatures) are a few KiB; a larger one is refused rather than read whole
SMALL_OBJECT_LIMIT = 16 << 20
#: where an ext2/3/4 file system keeps its magic number (superblock at 1024, s_magic at 56)
_EXT_MAGIC_AT, _EXT_MAGIC = 1080, b"\x53\xef"
#: the superblock's compat, incompat and ro_compat feature words
_EXT_FEATURES_AT = 1116
#: what Apptainer accepts of an ext3 image: a journal; file types in directories, a journal to
#: replay, meta block groups; sparse superblocks, large files, hashed directories (nothing of ext4)
_EXT3_JOURNAL, _EXT3_INCOMPAT, _EXT3_ROCOMPAT = 0x4, 0x2 | 0x4 | 0x10, 0x1 | 0x2 | 0x4


def bare_filesystem(path: str | os.PathLike) -> str | None:
    """``"squashfs"`` or ``"ext3"`` when *path* is a file system image file, not a SIF.

    Apptainer runs such files as images (``mksquashfs ROOT img.sqfs``, an ext3 image made with
    ``mkfs.ext3 -d``): the magic number at the start of the file, or the ext superblock's,
    tells them apart from a SIF. None for anything else (a SIF, a directory, an unreadable file).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        if os.pread(fd, len(SQUASHFS_MAGIC), 0) == SQUASHFS_MAGIC:
            return "squashfs"
        if os.pread(fd, len(_EXT_MAGIC), _EXT_MAGIC_AT) == _EXT_MAGIC:
            return "ext3"
        return None
    finally:
        os.close(fd)


def ext3_compatible(path: str | os.PathLike, offset: int = 0) -> bool:
    """True if an ext file system starts at *offset* in *path* with only the features Apptainer
    allows in an ext3 image (an ext2 one without a journal and an ext4 one are refused, as there)."""
    with open(path, "rb") as f:
        raw = os.pread(f.fileno(), _EXT_FEATURES_AT + 12 - _EXT_MAGIC_AT, offset + _EXT_MAGIC_AT)
    features = raw[_EXT_FEATURES_AT - _EXT_MAGIC_AT :]
    if not raw.startswith(_EXT_MAGIC) or len(features) < 12:
        return False
    compat, incompat, rocompat = (int.from_bytes(features[i : i + 4], "little") for i in (0, 4, 8))
    return bool(compat & _EXT3_JOURNAL) and not incompat & ~_EXT3_INCOMPAT and not rocompat & ~_EXT3_ROCOMPAT


class SIFImage:
    """An open SIF file. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path, fd: int, header: Header, slots: list[Descriptor], size: int) -> None:
        self.path = path
        self.header = header
        #: every descriptor slot of the table, used or not, in table order
        self.slots = slots
        #: the used descriptors, in table order
        self.descriptors = [d for d in slots if d.used]
        #: file size when opened
        self.file_size = size
        self._fd: int | None = fd

    @classmethod
    def open(cls, path: str | os.PathLike) -> SIFImage:
        """Open *path* read-only and validate it; raises :class:`SIFError` naming the problem."""
        shown, path = os.fspath(path), Path(path)  # named as given: Path makes docker://x docker:/x
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SIFError(f"{shown}: cannot open: {exc.strerror}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SIFError(f"{path}: not a SIF file (not a regular file)")
            size = info.st_size
            header, slots = _load(fd, size, path)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, header, slots, size)

    def __enter__(self) -> SIFImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def fd(self) -> int:
        """The open read-only file descriptor."""
        if self._fd is None:
            raise SIFError(f"{self.path}: image is closed")
        return self._fd

    def get(self, object_id: int) -> Descriptor:
        """The used descriptor with id *object_id*."""
        for desc in self.descriptors:
            if desc.id == object_id:
                return desc
        raise SIFError(f"{self.path}: no data object with id {object_id}")

    def find(self, datatype: DataType, name: str | None = None) -> list[Descriptor]:
        """Used descriptors of *datatype* (and with *name*, when given), in table order."""
        return [d for d in self.descriptors if d.datatype == datatype and (name is None or d.name == name)]

    def primary_partition(self, check: bool = True) -> Descriptor:
        """The primary system partition (the root file system the image runs).

        Raises :class:`SIFError` when there is none or more than one and, with *check*, when it
        is empty, encrypted or not squashfs (an ext3 one, which Apptainer mounts as root), or
        when it holds no valid squashfs file system or a truncated one (its superblock's size
        exceeds the object), so that no mount or unpack is tried.
        """
        found = [d for d in self.find(DataType.PARTITION) if d.parttype == PartType.PRIMSYS]
        if not found:
            raise SIFError(f"{self.path}: no primary system partition")
        if len(found) > 1:
            ids = " and ".join(str(d.id) for d in found)
            raise SIFError(f"{self.path}: corrupt SIF (several primary system partitions: objects {ids})")
        part = found[0]
        if not check:
            return part
        if part.size == 0:
            raise SIFError(f"{self.path}: the primary system partition (object {part.id}) is empty")
        if part.fstype == FSType.ENCRYPTED_SQUASHFS:
            raise SIFError(
                f"{self.path}: encrypted SIF images are not supported by hpcsif "
                "(decrypt with --engine apptainer and --passphrase or --pem-path)"
            )
        if part.fstype != FSType.SQUASHFS:
            raise SIFError(
                f"{self.path}: the primary partition (object {part.id}) has file system type "
                f"{label_of(part.fstype)}: hpcsif reads only squashfs root file systems (convert the "
                "image with 'apptainer build NEW.sif OLD.sif', or run it with --engine apptainer)"
            )
        used = squashfs_bytes_used(os.pread(self.fd, SUPERBLOCK_SIZE, part.offset))
        if used is None:
            raise SIFError(
                f"{self.path}: the primary partition (object {part.id}) holds no valid squashfs file system"
            )
        if used > part.size:
            raise SIFError(
                f"{self.path}: the primary partition (object {part.id}) is truncated: its squashfs "
                f"file system has {used} bytes, the object {part.size}"
            )
        return part

    def overlay_partition(self) -> Descriptor | None:
        """The ext3 overlay partition Apptainer stacks on the root file system, if any.

        ``apptainer overlay create IMAGE.sif`` adds it; Apptainer mounts it read-only over the
        primary partition (writable with ``--writable``): its ``upper/`` directory holds the
        changes, with overlayfs whiteouts. As in Apptainer, an overlay partition of another
        object group than the primary partition's does not count; nor does a non-ext3 one.
        """
        partitions = self.find(DataType.PARTITION)
        primary = [d for d in partitions if d.parttype == PartType.PRIMSYS]
        group = primary[0].group_id if len(primary) == 1 else 0
        overlays = [d for d in partitions if d.parttype == PartType.OVERLAY and d.fstype == FSType.EXT3]
        return next((d for d in overlays if not group or d.group_id == group), None)

    def read_object(self, desc: Descriptor, limit: int = SMALL_OBJECT_LIMIT) -> bytes:
        """The whole content of a small data object; :class:`SIFError` if over *limit* bytes."""
        if desc.size > limit:
            what = f"{desc.name} ({desc.size} bytes)" if desc.name else f"{desc.size} bytes"
            raise SIFError(
                f"{self.path}: object {desc.id} is too large to load: {what}, hpcsif reads at most "
                f"{limit >> 20} MiB of such metadata"
            )
        return b"".join(self.iter_object(desc))

    def iter_object(self, desc: Descriptor, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """Yield the content of *desc* in chunks of at most *chunk_size* bytes."""
        pos, end = desc.offset, desc.offset + desc.size
        while pos < end:
            chunk = os.pread(self.fd, min(chunk_size, end - pos), pos)
            if not chunk:
                raise SIFError(f"{self.path}: object {desc.id} truncated at byte {pos - desc.offset}")
            pos += len(chunk)
            yield chunk

    def copy_object(self, desc: Descriptor, out: BinaryIO) -> None:
        """Write the content of *desc* to the binary stream *out*, chunk by chunk."""
        for chunk in self.iter_object(desc):
            out.write(chunk)


def _load(fd: int, size: int, path: Path) -> tuple[Header, list[Descriptor]]:
    """Read and validate the header and descriptor table of the open file *fd*."""
    if size < HEADER_SIZE:
        raise SIFError(f"{path}: not a SIF file (only {size} bytes, a SIF header has {HEADER_SIZE})")
    try:
        header = Header.unpack(os.pread(fd, HEADER_SIZE, 0))
    except SIFError as exc:
        raise SIFError(f"{path}: {exc}") from None
    total, offset = header.descriptors_total, header.descriptors_offset
    if total < 0 or offset < HEADER_SIZE or header.descriptors_size < total * DESCRIPTOR_SIZE:
        raise SIFError(
            f"{path}: corrupt SIF header (descriptor table: {total} entries, "
            f"offset {offset}, size {header.descriptors_size})"
        )
    table_end = offset + total * DESCRIPTOR_SIZE
    if table_end > size:
        raise SIFError(
            f"{path}: truncated descriptor table (needs bytes {offset}-{table_end}, file has {size})"
        )
    raw = os.pread(fd, total * DESCRIPTOR_SIZE, offset)
    slots = [Descriptor.unpack(raw, i * DESCRIPTOR_SIZE) for i in range(total)]
    seen: set[int] = set()
    for desc in slots:
        if not desc.used:
            continue
        if desc.id in seen:
            raise SIFError(f"{path}: corrupt descriptor table (object id {desc.id} appears twice)")
        seen.add(desc.id)
        if desc.offset < 0 or desc.size < 0 or desc.offset + desc.size > size:
            raise SIFError(
                f"{path}: object {desc.id} ({desc.offset}+{desc.size} bytes) extends past the end "
                f"of the file ({size} bytes): truncated SIF"
            )
    return header, slots
