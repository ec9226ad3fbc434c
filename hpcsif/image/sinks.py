"""Where the merged root filesystem goes: one PAX tar stream (:class:`TarSink`, the input of
``tar2sqfs``) or a directory (:class:`DirSink`, ``build --sandbox``).

:mod:`hpcsif.image.layers` decides what the image holds; a sink writes each entry it is
given, once: regular files stream from their layer (sparse ones keep their holes), hard
links come after their targets and directories after their children. The tar sink bounds
what a hostile image can make ``tar2sqfs`` do (holes, entries in one directory); the
directory sink never follows a symlink while it writes (``O_NOFOLLOW`` and directory file
descriptors), so nothing lands outside its destination.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from hpcsif.errors import LayerError, WideDirectoryError
from hpcsif.image.decode import CHUNK
from hpcsif.image.tar_members import BLOCK, SparseContent, fix_mode

# holes of sparse files in one image: tar2sqfs reads them as zeros (about 8 GiB/s; a 1 TiB
# hole, a 300-byte layer, took it 4 minutes and then crashed); Apptainer writes them to disk
MAX_HOLES = 256 << 30

#: set by the consumer of :func:`~hpcsif.image.layers.flatten`'s stream: the most entries one
#: directory may get before :class:`WideDirectoryError` (``tar2sqfs`` slows down quadratically)
WIDE_DIRECTORY: contextvars.ContextVar[int | None] = contextvars.ContextVar("wide_directory", default=None)


@dataclass
class FlattenStats:
    """What :func:`~hpcsif.image.layers.flatten` or :func:`~hpcsif.image.layers.extract_tree`
    wrote and skipped."""

    entries: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, count: int = 1) -> None:
        """Count ``count`` entries left out for ``reason``."""
        self.skipped[reason] = self.skipped.get(reason, 0) + count


_TYPEFLAG = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "fifo": tarfile.FIFOTYPE}
_USTAR_TAIL = b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)
_MAX_OCTAL_7 = 0o7777777
_MAX_OCTAL_11 = 0o77777777777


def _header(
    name: str, typeflag: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, link: str
) -> bytes:
    """A tar header: plain ustar when everything fits (the common case, and 5x faster
    than :meth:`tarfile.TarInfo.tobuf`), else tarfile's PAX encoding."""
    bname = name.encode("utf-8", "surrogateescape")
    blink = link.encode("utf-8", "surrogateescape")
    if (
        len(bname) <= 100
        and len(blink) <= 100
        and bname.isascii()
        and blink.isascii()
        and 0 <= uid <= _MAX_OCTAL_7
        and 0 <= gid <= _MAX_OCTAL_7
        and 0 <= mtime <= _MAX_OCTAL_11
        and size <= _MAX_OCTAL_11
    ):
        head = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0" % (bname.ljust(100, b"\0"), mode, uid, gid, size, mtime)
        rest = typeflag + blink.ljust(100, b"\0") + _USTAR_TAIL
        chksum = sum(head) + sum(rest) + 8 * 0x20  # the checksum field counts as eight blanks
        return head + b"%06o\0 " % chksum + rest
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.size, ti.mtime, ti.linkname = (
        typeflag,
        mode,
        uid,
        gid,
        size,
        mtime,
        link,
    )
    ti.uname = ti.gname = ""
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _sparse_header(name: str, src: tarfile.TarInfo, regions: list[tuple[int, int]]) -> bytes:
    """The headers and map of a sparse file in GNU tar's PAX format 1.0, which tar2sqfs and
    GNU tar read: the data that follows is the regions' bytes, one after the other."""
    entries = [*regions, (src.size, 0)]  # GNU tar ends the map so (tar2sqfs needs an entry)
    sparse_map = b"%d\n" % len(entries) + b"".join(b"%d\n%d\n" % r for r in entries)
    sparse_map += bytes(-len(sparse_map) % BLOCK)
    ti = tarfile.TarInfo("GNUSparseFile.0/data")  # readers take the name from GNU.sparse.name
    ti.mode, ti.uid, ti.gid, ti.mtime = fix_mode(src.mode, False), src.uid, src.gid, int(src.mtime)
    ti.size = len(sparse_map) + sum(length for _, length in regions)
    ti.uname = ti.gname = ""
    ti.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(src.size),
    }
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + sparse_map


class TarSink:
    """Writes the merged entries as one PAX tar archive."""

    def __init__(self, out: BinaryIO, stats: FlattenStats) -> None:
        self._out = out
        self._stats = stats
        self._buf = bytearray()
        self._wide = WIDE_DIRECTORY.get()
        self._children: dict[str, int] = {}  # directory -> entries written in it, with a limit
        self._holes = 0  # bytes of holes in the sparse files written so far

    def _write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._out.write(self._buf)  # written before the clear below: no copy needed
            self._stats.bytes_out += len(self._buf)
            self._buf.clear()

    def _count(self, name: str) -> None:
        """Count ``name`` in its directory; past the ``WIDE_DIRECTORY`` limit, give up."""
        if self._wide is None or not name:
            return
        parent = name.rpartition("/")[0]
        n = self._children[parent] = self._children.get(parent, 0) + 1
        if n > self._wide:
            raise WideDirectoryError(f"directory /{parent} has more than {self._wide} entries")

    def _header(self, name: str, src: tarfile.TarInfo, kind: str) -> None:
        self._count(name)
        mode = 0o777 if kind == "sym" else fix_mode(src.mode, kind == "dir")
        size = src.size if kind == "reg" else 0
        linkname = src.linkname if kind == "sym" else ""
        self._write(
            _header(name or ".", _TYPEFLAG[kind], mode, src.uid, src.gid, size, int(src.mtime), linkname)
        )
        self._stats.entries += 1

    def emit(self, name: str, src: tarfile.TarInfo, kind: str, data: BinaryIO | None, layer: str) -> None:
        """Write one entry (``data`` holds ``src.size`` bytes for regular files, or the
        stored regions of a sparse one, which stays sparse)."""
        if isinstance(data, SparseContent):
            self._holes += src.size - data.stored
            if self._holes > MAX_HOLES:
                raise LayerError(
                    f"layer {layer}: sparse file {name!r} of {src.size} bytes takes the holes of the "
                    f"image's sparse files over {MAX_HOLES >> 30} GiB"
                )
            self._count(name)
            self._write(_sparse_header(name, src, data.regions))
            self._stats.entries += 1
            size = data.stored
        else:
            self._header(name, src, kind)
            if kind != "reg" or not src.size:
                return
            size = src.size
        remaining = size
        while remaining:
            chunk = data.read(min(CHUNK, remaining))
            if not chunk:
                raise LayerError(f"layer {layer}: tar data of {name!r} is truncated")
            remaining -= len(chunk)
            if len(chunk) >= BLOCK * 64:
                self._flush()
                self._out.write(chunk)
                self._stats.bytes_out += len(chunk)
            else:
                self._write(chunk)
        if size % BLOCK:
            self._write(bytes(BLOCK - size % BLOCK))

    def link(self, name: str, target: str) -> None:
        """Write a hard link ``name`` -> ``target`` (both root-relative)."""
        self._count(name)
        self._write(_header(name, tarfile.LNKTYPE, 0o644, 0, 0, 0, 0, target))
        self._stats.entries += 1

    def close(self) -> None:
        """End the archive (two zero blocks) and flush."""
        self._write(bytes(BLOCK * 2))
        self._flush()
        self._out.flush()


class DirSink:
    """Writes the merged entries below ``dest`` without ever following a symlink."""

    _DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(self, dest: Path, stats: FlattenStats) -> None:
        self._stats = stats
        self._root = os.open(dest, self._DIR_FLAGS)
        self._cached: tuple[str, int] | None = None
        self._chown = os.geteuid() == 0

    def _dir_fd(self, path: str, create: bool) -> int:
        """An fd of directory ``path`` (root-relative), created 0700 where missing."""
        if not path:
            return self._root
        if self._cached and self._cached[0] == path:
            return self._cached[1]
        fd = self._root
        for comp in path.split("/"):
            try:
                nfd = os.open(comp, self._DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(comp, 0o700, dir_fd=fd)
                nfd = os.open(comp, self._DIR_FLAGS, dir_fd=fd)
            if fd != self._root:
                os.close(fd)
            fd = nfd
        if self._cached:
            os.close(self._cached[1])
        self._cached = (path, fd)
        return fd

    def _owner_time(self, base: str, fd: int, src: tarfile.TarInfo) -> None:
        if self._chown:
            os.chown(base, src.uid, src.gid, dir_fd=fd, follow_symlinks=False)
        mtime_ns = int(src.mtime) * 1_000_000_000
        os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)

    def emit(self, name: str, src: tarfile.TarInfo, kind: str, data: BinaryIO | None, layer: str) -> None:
        """Create one entry; directories come last, after all their children."""
        try:
            self._emit(name, src, kind, data, layer)
        except OSError as e:  # a full disk, a file too large for the file system …
            where = f"layer {layer}: " if layer else ""
            raise LayerError(f"{where}cannot write /{name} in the sandbox: {e.strerror or e}") from e

    def _emit(self, name: str, src: tarfile.TarInfo, kind: str, data: BinaryIO | None, layer: str) -> None:
        parent, base = posixpath.split(name)
        pfd = self._dir_fd(parent, create=True)
        # sandboxes stay writable by their owner, as Apptainer's do
        mode = fix_mode(src.mode, kind == "dir") | (0o700 if kind == "dir" else 0o600)
        if kind == "dir":
            if name:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base or ".", self._DIR_FLAGS, dir_fd=pfd)
            try:
                os.fchmod(fd, mode)
                if self._chown:
                    os.fchown(fd, src.uid, src.gid)
                mtime_ns = int(src.mtime) * 1_000_000_000
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
        elif kind == "reg":
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(base, flags, 0o600, dir_fd=pfd)
            try:
                # a sparse member keeps its holes: only its stored regions are written
                regions = data.regions if isinstance(data, SparseContent) else [(0, src.size)]
                for offset, length in regions:
                    os.lseek(fd, offset, os.SEEK_SET)
                    self._copy(fd, data, length, name, layer)
                os.ftruncate(fd, src.size)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            self._owner_time(base, pfd, src)
        elif kind == "sym":
            os.symlink(src.linkname, base, dir_fd=pfd)
            self._owner_time(base, pfd, src)
        else:
            os.mkfifo(base, mode, dir_fd=pfd)
            self._owner_time(base, pfd, src)
        self._stats.entries += 1

    def _copy(self, fd: int, data: BinaryIO, size: int, name: str, layer: str) -> None:
        while size:
            chunk = data.read(min(CHUNK, size))
            if not chunk:
                raise LayerError(f"layer {layer}: tar data of {name!r} is truncated")
            os.write(fd, chunk)
            size -= len(chunk)
            self._stats.bytes_out += len(chunk)

    def link(self, name: str, target: str) -> None:
        """Hard-link ``name`` to the already written ``target``."""
        tparent, tbase = posixpath.split(target)
        tfd = os.dup(self._dir_fd(tparent, create=False))
        try:
            parent, base = posixpath.split(name)
            os.link(
                tbase,
                base,
                src_dir_fd=tfd,
                dst_dir_fd=self._dir_fd(parent, create=True),
                follow_symlinks=False,
            )
        finally:
            os.close(tfd)
        self._stats.entries += 1

    def close(self) -> None:
        """Release the directory descriptors."""
        if self._cached:
            os.close(self._cached[1])
            self._cached = None
        if self._root >= 0:
            os.close(self._root)
            self._root = -1


Sink = TarSink | DirSink
