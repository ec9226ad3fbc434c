"""Read SIF files: header, descriptor table and data objects.

:class:`SIFImage` opens a file read-only, validates the header and every used descriptor
against the file size, and reads objects with ``pread`` so that large partitions are never
loaded whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from hpcsif.errors import SIFError
from hpcsif.sif.format import (
    DESCRIPTOR_SIZE,
    HEADER_SIZE,
    DataType,
    Descriptor,
    Header,
    PartType,
)

_CHUNK = 1 << 20


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
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SIFError(f"{path}: cannot open: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
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

    def primary_partition(self) -> Descriptor:
        """The primary system partition (the root file system the image runs)."""
        for desc in self.find(DataType.PARTITION):
            if desc.parttype == PartType.PRIMSYS:
                return desc
        raise SIFError(f"{self.path}: no primary system partition")

    def read_object(self, desc: Descriptor) -> bytes:
        """The whole content of a (small) data object."""
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
