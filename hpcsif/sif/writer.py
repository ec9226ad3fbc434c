"""Write SIF files atomically: create, append objects, remove objects.

Everything is written to a temp file in the destination's directory (name starting with
``.``), fsynced and renamed into place, so a reader never sees a half-written image and a
failure leaves nothing behind. Object content given as a path is copied by the kernel
(``copy_file_range``, falling back to ``sendfile``) and never read into Python memory.

Object placement follows sylabs/sif: objects follow the descriptor table in order, each
at the next offset satisfying its alignment (4096 for partitions, none otherwise); object
ids are the 1-based index of the descriptor slot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpcsif.errors import SIFError
from hpcsif.fsutil import fsync_dir
from hpcsif.sif.format import (
    DEFAULT_DESCRIPTOR_CAPACITY,
    DEFAULT_GROUP,
    DESCRIPTOR_SIZE,
    DESCRIPTORS_OFFSET,
    PARTITION_ALIGNMENT,
    DataType,
    Descriptor,
    FSType,
    HashType,
    Header,
    PartType,
    arch_code,
    encode_name,
    next_aligned,
    partition_extra,
    retyped_partition_extra,
    signature_extra,
)
from hpcsif.sif.reader import SIFImage

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 30
_FALLOC_FL_INSERT_RANGE = 0x20  # linux/falloc.h
_SIF_MODE = 0o755  # a SIF is executable through its launch line


@dataclass
class ObjectSpec:
    """A data object to write: its content (bytes or a file) and descriptor fields."""

    datatype: DataType
    data: bytes | None = None  # either in-memory bytes …
    path: Path | None = None  # … or a file whose whole content is copied by the kernel
    name: str = ""
    group_id: int = DEFAULT_GROUP  # 0 = no group
    link_id: int = 0  # 0 = no link
    fstype: FSType | None = None  # partitions only; default SQUASHFS
    parttype: PartType | None = None  # partitions only; default PRIMSYS
    arch: str | None = None  # GOARCH name, partitions only; default: the writer's arch
    alignment: int = 0  # 0 → default (4096 for partitions, like Apptainer)
    link_is_group: bool = False  # link_id names a group (a signature over a whole group)
    hashtype: HashType | None = None  # signatures only
    entity: bytes = b""  # signatures only: the signer's key fingerprint (20 bytes for PGP)
    extra: bytes = b""  # other types' descriptor metadata (format.sbom_extra, format.oci_digest_extra)

    @property
    def label(self) -> str:
        """Short description for error messages."""
        kind = self.datatype.label if isinstance(self.datatype, DataType) else hex(self.datatype)
        return f"{kind} object {self.name!r}" if self.name else f"{kind} object"


class SIFWriter:
    """Builds a SIF image in a temp file next to *dest*; :meth:`commit` renames it into place.

    Use :func:`write_sif`, :func:`add_objects` or :func:`remove_objects` for the common cases;
    use this class directly to let an external program write an object in place
    (:meth:`add_external`, e.g. ``mksquashfs -o OFFSET``) or to build the image around a
    squashfs file without copying it (:meth:`adopt`, e.g. after ``tar2sqfs``). As a context
    manager it aborts (removes the temp file) unless :meth:`commit` ran.
    """

    def __init__(
        self,
        dest: str | os.PathLike,
        *,
        arch: str = "amd64",
        uuid: uuidlib.UUID | None = None,
        created: int | None = None,
        capacity: int = DEFAULT_DESCRIPTOR_CAPACITY,
        _base: SIFImage | None = None,
    ) -> None:
        # an edit rewrites the file a link points to, as Apptainer's in-place edits do, not the link
        self.dest = Path(os.path.realpath(dest)) if _base is not None else Path(dest)
        if _base is not None and not os.access(self.dest, os.W_OK):
            # the rename would replace even a read-only image; Apptainer's in-place edit cannot
            raise SIFError(f"cannot write {self.dest}: Permission denied")
        arch_code(arch)  # validate early
        self.arch = arch
        self._committed = False
        self._sealed = False  # set once an object was adopted: nothing may follow it
        now = int(time.time()) if created is None else created
        self._fd, tmp = self._create_temp()
        self.temp_path = Path(tmp)
        try:
            if _base is None:
                self._init_new(uuid, now, capacity)
            else:
                self._init_from(_base, now)
        except BaseException:
            self.abort()
            raise

    # -- setup -------------------------------------------------------------------------------

    def _create_temp(self) -> tuple[int, str]:
        try:
            return tempfile.mkstemp(prefix=f".{self.dest.name}.", suffix=".tmp", dir=self.dest.parent)
        except OSError as exc:
            raise SIFError(f"cannot create {self.dest}: {exc.strerror} ({self.dest.parent})") from exc

    def _init_new(self, uuid: uuidlib.UUID | None, now: int, capacity: int) -> None:
        if capacity < 1:
            raise SIFError(f"descriptor capacity must be positive, not {capacity}")
        table = capacity * DESCRIPTOR_SIZE
        self.header = Header(
            arch="unknown",
            uuid_bytes=(uuid or uuidlib.uuid4()).bytes,
            ctime=now,
            mtime=now,
            descriptors_free=capacity,
            descriptors_total=capacity,
            descriptors_offset=DESCRIPTORS_OFFSET,
            descriptors_size=table,
            data_offset=DESCRIPTORS_OFFSET + table,
            data_size=0,
        )
        self.slots: list[Descriptor | None] = [None] * capacity
        self._raw_slots: list[bytes] = [bytes(DESCRIPTOR_SIZE)] * capacity
        self._time = now
        self._mode = _SIF_MODE
        self._owner: tuple[int, int] | None = None
        self._cursor = self.header.data_offset

    def _init_from(self, base: SIFImage, now: int) -> None:
        """Start from a copy of the existing image *base* (for adding or removing objects)."""
        _copy_into(self._fd, base.fd, 0, base.path)
        self.header = base.header
        self.header.mtime = now
        self.slots = [d if d.used else None for d in base.slots]
        raw = os.pread(base.fd, len(base.slots) * DESCRIPTOR_SIZE, self.header.descriptors_offset)
        # untouched slots are rewritten byte for byte, whatever their quirks
        self._raw_slots = [
            raw[i * DESCRIPTOR_SIZE : (i + 1) * DESCRIPTOR_SIZE] for i in range(len(base.slots))
        ]
        self._time = now
        info = os.fstat(base.fd)
        self._mode = info.st_mode & 0o7777
        self._owner = (info.st_uid, info.st_gid)
        self._cursor = self._data_end()
        primary = [d for d in base.descriptors if d.parttype == PartType.PRIMSYS]
        if primary and primary[0].arch and primary[0].arch != "unknown":
            self.arch = primary[0].arch

    def _data_end(self) -> int:
        ends = [d.offset + d.size for d in self.slots if d is not None]
        return max([self.header.data_offset, *ends])

    # -- objects -----------------------------------------------------------------------------

    def add(self, spec: ObjectSpec) -> Descriptor:
        """Write the object *spec* (its ``data`` or ``path``) and record its descriptor."""
        if (spec.data is None) == (spec.path is None):
            raise SIFError(f"{spec.label}: give exactly one of data or path")
        return self._place(spec, self._write_content)

    def add_external(self, spec: ObjectSpec, fill: Callable[[Path, int], None]) -> Descriptor:
        """Let ``fill(temp_path, offset)`` write the object's content into the temp file.

        *fill* must write the whole object starting at byte *offset* and nothing after it
        (for example ``mksquashfs DIR temp_path -noappend -o offset``); the object's size is
        whatever lies between *offset* and the end of the file afterwards. Nothing else may be
        written to the image between this call and :meth:`commit` except further objects.
        """
        if spec.data is not None or spec.path is not None:
            raise SIFError(f"{spec.label}: an external object takes neither data nor path")

        def run_fill(_spec: ObjectSpec, offset: int) -> int:
            fill(self.temp_path, offset)
            end = os.fstat(self._fd).st_size
            if end <= offset:
                raise SIFError(f"{spec.label}: the external writer wrote nothing at offset {offset}")
            return end - offset

        return self._place(spec, run_fill)

    def adopt(self, spec: ObjectSpec) -> Descriptor:
        """Turn the file ``spec.path`` itself into the image, as its last object, without copying it.

        Meant for a squashfs a tool (e.g. ``tar2sqfs``, which cannot write at an offset) has
        just written next to *dest*: everything written so far is inserted in front of the
        file's data with ``fallocate(FALLOC_FL_INSERT_RANGE)`` (ext4, XFS), so the partition's
        bytes never move. The file is consumed: it becomes *dest* on :meth:`commit` and is
        removed on :meth:`abort`. Where the file system cannot insert ranges, or the file lies
        on another file system than *dest*, the content is copied instead and the file removed.
        No object may be added after this one.
        """
        if spec.path is None or spec.data is not None:
            raise SIFError(f"{spec.label}: adopt takes a path and no data")
        src = Path(spec.path)
        try:
            src_fd = os.open(src, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SIFError(f"{spec.label}: cannot open {src}: {exc.strerror}") from exc
        st = os.fstat(src_fd)
        default = PARTITION_ALIGNMENT if spec.datatype == DataType.PARTITION else 0
        # an inserted range must be a whole number of file-system blocks
        alignment = math.lcm(spec.alignment or default or 1, st.st_blksize)

        def insert_in_front(_spec: ObjectSpec, offset: int) -> int:
            try:
                if st.st_size == 0 or st.st_dev != os.stat(self.dest.parent).st_dev:
                    raise OSError(errno.EXDEV, "not on the destination's file system")
                _insert_range(src_fd, offset)
            except OSError as exc:
                raise _NoInsertRange(exc.strerror) from exc
            # the file now starts with a hole of *offset* bytes: fill in what precedes the object
            _copy_into(src_fd, self._fd, 0, self.temp_path, length=self._cursor)
            return st.st_size

        try:
            desc = self._place(dataclasses.replace(spec, alignment=alignment), insert_in_front)
        except _NoInsertRange as exc:
            os.close(src_fd)
            log.debug("%s: cannot insert in front of %s (%s); copying it", self.dest, src, exc)
            try:
                desc = self.add(spec)
            finally:
                src.unlink(missing_ok=True)
        except BaseException:
            os.close(src_fd)
            src.unlink(missing_ok=True)
            raise
        else:
            # from now on the adopted file is the image under construction
            os.close(self._fd)
            self.temp_path.unlink()
            self._fd, self.temp_path = src_fd, src
        self._sealed = True
        return desc

    def _write_content(self, spec: ObjectSpec, offset: int) -> int:
        if spec.data is not None:
            _pwrite_all(self._fd, spec.data, offset)
            return len(spec.data)
        try:
            src = os.open(spec.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SIFError(f"{spec.label}: cannot read {spec.path}: {exc.strerror}") from exc
        try:
            return _copy_into(self._fd, src, offset, Path(spec.path))
        finally:
            os.close(src)

    def _place(self, spec: ObjectSpec, write: Callable[[ObjectSpec, int], int]) -> Descriptor:
        """Check *spec*, pick its slot and offset, have *write* store the content, record it."""
        if self._sealed:
            raise SIFError(f"{spec.label}: no object can follow an adopted one")
        extra = self._extra(spec)
        slot = next((i for i, d in enumerate(self.slots) if d is None), None)
        if slot is None:
            raise SIFError(f"{spec.label}: no free descriptor slot left ({len(self.slots)} in the table)")
        alignment = spec.alignment or (PARTITION_ALIGNMENT if spec.datatype == DataType.PARTITION else 0)
        offset = next_aligned(self._cursor, alignment)
        size = write(spec, offset)
        desc = Descriptor(
            datatype=spec.datatype,
            id=slot + 1,
            group_id=spec.group_id,
            link_id=spec.link_id,
            link_is_group=spec.link_is_group,
            offset=offset,
            size=size,
            size_with_padding=offset - self._cursor + size,
            ctime=self._time,
            mtime=self._time,
            name=spec.name,
            extra=extra,
        )
        self._raw_slots[slot] = desc.pack()
        self.slots[slot] = desc
        self._cursor = offset + size
        self.header.descriptors_free -= 1
        self.header.data_size = self._cursor - self.header.data_offset
        if desc.parttype == PartType.PRIMSYS:
            self.header.arch = desc.arch or "unknown"
        log.debug("%s: %s at %d, %d bytes", self.dest, spec.label, offset, size)
        return desc

    def _extra(self, spec: ObjectSpec) -> bytes:
        """Validate the type-specific fields of *spec* and encode its descriptor extra bytes."""
        is_part = spec.datatype == DataType.PARTITION
        if not is_part and (spec.fstype or spec.parttype or spec.arch):
            raise SIFError(f"{spec.label}: fstype, parttype and arch apply to partitions only")
        if spec.datatype != DataType.SIGNATURE and (spec.hashtype or spec.entity):
            raise SIFError(f"{spec.label}: hashtype and entity apply to signatures only")
        if spec.extra and spec.datatype in (DataType.PARTITION, DataType.SIGNATURE):
            raise SIFError(f"{spec.label}: give partition and signature metadata in their own fields")
        encode_name(spec.name)
        if is_part:
            parttype = spec.parttype or PartType.PRIMSYS
            if parttype == PartType.PRIMSYS and any(
                d is not None and d.parttype == PartType.PRIMSYS for d in self.slots
            ):
                raise SIFError(f"{spec.label}: the image already has a primary system partition")
            return partition_extra(spec.fstype or FSType.SQUASHFS, parttype, spec.arch or self.arch)
        if spec.datatype == DataType.SIGNATURE:
            if spec.hashtype is None:
                raise SIFError(f"{spec.label}: a signature needs a hashtype")
            return signature_extra(spec.hashtype, spec.entity)
        return spec.extra

    def remove(self, ids: Sequence[int]) -> None:
        """Drop the objects with *ids* from the table; their bytes stay unless at the end."""
        wanted = set(ids)
        for i, desc in enumerate(self.slots):
            if desc is not None and desc.id in wanted:
                wanted.discard(desc.id)
                if desc.parttype == PartType.PRIMSYS:
                    self.header.arch = "unknown"
                self.slots[i] = None
                self._raw_slots[i] = bytes(DESCRIPTOR_SIZE)
                self.header.descriptors_free += 1
        if wanted:
            raise SIFError(f"{self.dest}: no data object with id {', '.join(map(str, sorted(wanted)))}")
        # drop trailing dead space, as sylabs/sif does when compacting
        self._cursor = self._data_end()
        self.header.data_size = self._cursor - self.header.data_offset
        os.ftruncate(self._fd, self._cursor)

    def set_primary(self, object_id: int) -> None:
        """Make system partition *object_id* the primary one (the former primary becomes a system
        partition) and take its architecture into the header, as sylabs/sif's ``SetPrimPart``."""
        index = next((i for i, d in enumerate(self.slots) if d is not None and d.id == object_id), None)
        if index is None:
            raise SIFError(f"{self.dest}: no data object with id {object_id}")
        desc = self.slots[index]
        assert desc is not None  # found above
        if desc.datatype != DataType.PARTITION:
            raise SIFError(f"{self.dest}: data object {object_id} is not a partition")
        if desc.parttype == PartType.PRIMSYS:
            return
        if desc.parttype != PartType.SYSTEM:
            raise SIFError(f"{self.dest}: data object {object_id} is not a system partition")
        for i, other in enumerate(self.slots):
            if other is not None and (i == index or other.parttype == PartType.PRIMSYS):
                parttype = PartType.PRIMSYS if i == index else PartType.SYSTEM
                extra = retyped_partition_extra(other.extra, parttype)
                self.slots[i] = dataclasses.replace(other, extra=extra, mtime=self._time)
                self._raw_slots[i] = self.slots[i].pack()
        self.header.arch = desc.arch or "unknown"

    # -- finishing ---------------------------------------------------------------------------

    def commit(self) -> Path:
        """Write header and table, fsync, and atomically rename the image to *dest*."""
        try:
            _pwrite_all(self._fd, b"".join(self._raw_slots), self.header.descriptors_offset)
            _pwrite_all(self._fd, self.header.pack(), 0)
            if os.fstat(self._fd).st_size < self._cursor:  # an empty last object still ends here
                os.ftruncate(self._fd, self._cursor)
            if self._owner is not None:
                # root signing a user's image must leave it the user's (Apptainer edits in place)
                with contextlib.suppress(PermissionError):
                    os.fchown(self._fd, *self._owner)
            os.fchmod(self._fd, self._mode)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self.temp_path, self.dest)
            fsync_dir(self.dest.parent)
        except OSError as exc:
            self.abort()
            raise SIFError(f"cannot write {self.dest}: {exc.strerror}") from exc
        except BaseException:
            self.abort()
            raise
        self._committed = True
        return self.dest

    def abort(self) -> None:
        """Close and remove the temp file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._committed:
            self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> SIFWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()


def write_sif(
    dest: str | os.PathLike,
    objects: Sequence[ObjectSpec],
    *,
    arch: str = "amd64",
    uuid: uuidlib.UUID | None = None,
    created: int | None = None,
) -> Path:
    """Write a new SIF at *dest* holding *objects* in order; returns *dest* as a Path.

    *arch* is the GOARCH of partitions that name none; the header's architecture is that of
    the primary partition, as in sylabs/sif. *uuid* defaults to a random one and *created*
    (Unix seconds) to now. Atomic: on error nothing appears at *dest*.
    """
    capacity = max(DEFAULT_DESCRIPTOR_CAPACITY, len(objects))
    with SIFWriter(dest, arch=arch, uuid=uuid, created=created, capacity=capacity) as writer:
        for spec in objects:
            writer.add(spec)
        return writer.commit()


def add_objects(path: str | os.PathLike, objects: Sequence[ObjectSpec]) -> list[Descriptor]:
    """Append *objects* to the existing SIF at *path* (atomically: copy, modify, rename).

    Returns the new descriptors. Raises :class:`SIFError` when the table has no free slot.
    """
    with SIFImage.open(path) as base, SIFWriter(path, _base=base) as writer:
        added = [writer.add(spec) for spec in objects]
        writer.commit()
    return added


def remove_objects(path: str | os.PathLike, ids: Sequence[int]) -> None:
    """Remove the objects with *ids* from the SIF at *path* (atomically), e.g. old signatures."""
    with SIFImage.open(path) as base, SIFWriter(path, _base=base) as writer:
        writer.remove(ids)
        writer.commit()


def set_primary(path: str | os.PathLike, object_id: int) -> None:
    """Make partition *object_id* of the SIF at *path* its primary system partition (atomically)."""
    with SIFImage.open(path) as base, SIFWriter(path, _base=base) as writer:
        writer.set_primary(object_id)
        writer.commit()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_into(dst: int, src: int, offset: int, src_path: Path, length: int | None = None) -> int:
    """Copy *src* (all of it, or its first *length* bytes) into *dst* at *offset*, in the kernel."""
    copied = 0

    def count() -> int:
        return _COPY_CHUNK if length is None else min(_COPY_CHUNK, length - copied)

    try:
        try:
            while count() and (n := os.copy_file_range(src, dst, count(), copied, offset + copied)):
                copied += n
            return copied
        except OSError as exc:
            # cross-device on old kernels, special files, or file systems without support
            if copied or exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        os.lseek(dst, offset, os.SEEK_SET)
        while count() and (n := os.sendfile(dst, src, copied, count())):
            copied += n
        return copied
    except OSError as exc:
        raise SIFError(f"cannot copy {src_path} into the image: {exc.strerror}") from exc


class _NoInsertRange(Exception):
    """The file system cannot insert a range into the file (nothing was changed)."""


def _insert_range(fd: int, length: int) -> None:
    """Shift all data of *fd* up by *length* bytes, leaving a hole at the start (no copy)."""
    import ctypes  # only the in-place conversion needs it

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, _FALLOC_FL_INSERT_RANGE, 0, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
