"""Writable ext3 overlay images, as Apptainer's persistent overlays.

``hpcsif overlay create [--size MiB] IMG`` makes an ext3 file system holding Apptainer's overlay
layout (``upper/`` for the changes, ``work/`` for fuse-overlayfs), or adds one to a SIF as its
overlay partition. ``--overlay IMG`` (an ext3 file without ``:ro``) and ``--writable`` on a SIF
with an overlay partition then keep what a container writes there, for later containers and
for Apptainer alike (overlayfs whiteouts, as Apptainer's kernel overlay writes them).

One writer at a time: as Apptainer, a writer takes an open-file-description write lock over the
ext3 partition's bytes, and a reader (``:ro``, a SIF's overlay partition stacked read-only) a
read lock, so that neither tool ever mounts a file system another process is writing. The lock
lives as long as the process that launched the container, and as long as the ``fuse2fs`` it
started, which inherits it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hpcsif.engine.base import which
from hpcsif.errors import EngineError, MissingToolError

if TYPE_CHECKING:
    from hpcsif.sif.format import Descriptor

log = logging.getLogger(__name__)

#: Apptainer's smallest overlay (MiB)
MIN_SIZE_MIB = 64


def lock_partition(image: Path, offset: int, size: int, *, write: bool) -> int:
    """Lock bytes [*offset*, *offset* + *size*) of *image* as Apptainer does (F_OFD_SETLK: a
    write lock for a writer, a read lock for a reader). The descriptor returned is never closed:
    the lock lasts until this process exits, and longer in whoever inherits it (the file
    system's mount daemon)."""
    try:
        fd = os.open(image, os.O_RDWR if write else os.O_RDONLY)
    except OSError as exc:
        raise EngineError(
            f"while loading overlay images: failed to open overlay image {image}: {exc.strerror.lower()}"
        ) from None
    kind = fcntl.F_WRLCK if write else fcntl.F_RDLCK
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for an OFD lock)
    request = struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, offset, size, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError:
        os.close(fd)
        how = (
            "writing, currently in use by another process"
            if write
            else "reading, currently in use for writing by another process"
        )
        raise EngineError(
            f"while loading overlay images: failed to open overlay image {image}: while locking ext3 "
            f"partition from {image}: can't open {image} for {how}"
        ) from None
    return fd


def writable_ext3_mount(image: Path, offset: int, size: int, mounts: list) -> Path:
    """Lock the ext3 file system at *offset* in *image* for writing and mount it read-write;
    returns its root (where ``upper/`` and ``work/`` are). The mount is appended to *mounts*."""
    from hpcsif.engine.data_images import ext3_data_mount

    lock = lock_partition(image, offset, size, write=True)
    mount = ext3_data_mount(image, offset, writable=True)
    mount.pass_fds = (lock,)  # (no reader may mount the file system while it is mounted writable)
    if os.getuid() == 0:  # (a user may not make device nodes or trusted.* attributes)
        mount.before_unmount = _kernel_whiteouts_of
    mounts.append(mount)
    return mount.acquire()


def _kernel_whiteouts_of(mnt: Path) -> None:
    """:func:`kernel_whiteouts` of the overlay mounted at *mnt*; a failure is only a warning
    (fuse-overlayfs, hpcsif and Apptainer's unprivileged mode read the changes all the same)."""
    try:
        kernel_whiteouts(mnt / "upper")
    except OSError as exc:
        log.warning("deletions in the overlay %s stay fuse-overlayfs's .wh. files: %s", mnt, exc)


def kernel_whiteouts(upper: Path) -> None:
    """Turn fuse-overlayfs's whiteout files in *upper* into the kernel's, as Apptainer's
    overlay writes them: over a FUSE upper (fuse2fs) fuse-overlayfs marks a deleted NAME with
    an empty ``.wh.NAME`` file and an opaque directory with ``.wh..wh..opq``, which Apptainer
    run as root (kernel overlayfs) shows as files. The kernel's forms are a 0/0 character
    device NAME and the ``trusted.overlay.opaque`` attribute, and no whiteouts at all in an
    opaque directory (the kernel lists them there). fuse-overlayfs reads both forms.
    """
    for top, names in _directories(str(upper)):
        marks = [n for n in names if n.startswith(".wh.") and _empty_file(os.path.join(top, n))]
        opaque = ".wh..wh..opq" in marks or "trusted.overlay.opaque" in os.listxattr(top)
        if opaque:
            os.setxattr(top, "trusted.overlay.opaque", b"y")
            # nothing in an opaque directory needs hiding: fuse-overlayfs's own whiteout there
            # (.wh..opq) goes too
            for name in names:
                if name.startswith(".wh.") and name not in marks:
                    st = os.lstat(os.path.join(top, name))
                    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                        os.unlink(os.path.join(top, name))
        for name in marks:
            hidden = os.path.join(top, name[4:])
            if not opaque and name != ".wh..wh..opq" and not os.path.lexists(hidden):
                os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            os.unlink(os.path.join(top, name))


def _empty_file(path: str) -> bool:
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and not st.st_size


def _directories(top: str) -> Iterator[tuple[str, list[str]]]:
    """(directory, its entries' names) for *top* and every directory below it.

    Through FUSE a stat costs a round trip and fuse2fs's listings carry no file types, so the
    entries are looked at only until the directory's link count (2 + its subdirectories, on
    ext3) says that all its subdirectories were found: a directory of files costs one listing.
    """
    names = os.listdir(top)
    links = os.lstat(top).st_nlink
    left = links - 2 if links >= 2 else len(names)  # (1: too many to count, as ext4's dir_nlink)
    below = []
    for name in names:
        if left <= 0:
            break
        if stat.S_ISDIR(os.lstat(os.path.join(top, name)).st_mode):
            below.append(os.path.join(top, name))
            left -= 1
    yield top, names  # (the caller may remove entries that are not directories)
    for path in below:
        yield from _directories(path)


def create_overlay(
    path: Path,
    size_mib: int = MIN_SIZE_MIB,
    *,
    sparse: bool = False,
    create_dirs: list[str] | None = None,
    fakeroot: bool = False,
) -> None:
    """``overlay create``: a new ext3 overlay image at *path*, or, where *path* is a SIF, its
    overlay partition. Nothing appears (or changes) at *path* unless all of it was made."""
    if size_mib < MIN_SIZE_MIB:
        raise EngineError(f"image size must be equal or greater than {MIN_SIZE_MIB} MiB")
    if not which("mkfs.ext3"):
        raise MissingToolError("mkfs.ext3", "e2fsprogs", "needed to create overlay images")
    exists = os.path.lexists(path)
    if exists:
        _overlay_partition_free(path)
    target = Path(os.path.abspath(path)).parent
    try:
        tmp = tempfile.mkdtemp(prefix=".hpcsif-overlay-", dir=target)
    except OSError as exc:
        raise EngineError(f"cannot create the overlay image {path}: {target}: {exc.strerror}") from None
    try:
        _create(path, exists, Path(tmp), size_mib, sparse, create_dirs or [], fakeroot)
    except OSError as exc:  # (a full disk, a file system without fallocate …)
        raise EngineError(f"cannot create the overlay image {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _create(
    path: Path, exists: bool, tmp: Path, size_mib: int, sparse: bool, create_dirs: list[str], fakeroot: bool
) -> None:
    """:func:`create_overlay`'s work, in the scratch directory *tmp* beside *path*."""
    layout = tmp / "layout"
    for d in ["upper", "work", *(f"upper/{d.strip('/')}" for d in create_dirs)]:
        (layout / d).mkdir(mode=0o755, parents=True, exist_ok=True)
    fs = tmp / "fs.img"
    with open(fs, "wb") as f:
        if sparse:
            f.truncate(size_mib << 20)
        else:
            os.posix_fallocate(f.fileno(), 0, size_mib << 20)
    owner = "0:0" if fakeroot else f"{os.getuid()}:{os.getgid()}"
    cmd = ["mkfs.ext3", "-q", "-F", "-d", str(layout), "-E", f"root_owner={owner}", str(fs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise EngineError(
            f"while creating the overlay image {path}: {lines[-1] if lines else proc.returncode}"
        )
    if exists:
        _add_partition(path, fs)
    else:
        os.chmod(fs, 0o600)
        try:
            os.link(fs, path)  # (never over a file that appeared meanwhile)
        except FileExistsError:
            raise EngineError(f"EXT3 overlay image {path} already exists") from None


def _overlay_partition_free(path: Path) -> Descriptor:
    """The primary partition of the SIF at *path*, which has no overlay partition yet; the
    error Apptainer gives for any other existing file."""
    from hpcsif.errors import SIFError
    from hpcsif.sif.reader import SIFImage

    try:
        with SIFImage.open(path) as image:
            overlay = image.overlay_partition()
            if overlay is None:
                return image.primary_partition()
    except SIFError:
        raise EngineError(f"EXT3 overlay image {path} already exists") from None
    raise EngineError(
        f"a writable overlay partition already exists in {path} (ID: {overlay.id}), "
        f'delete it first with "hpcsif sif del {overlay.id} {path}"'
    )


def _add_partition(sif: Path, fs: Path) -> None:
    """Add *fs* to the SIF *sif* as its ext3 overlay partition."""
    from hpcsif.sif.format import FSType, PartType
    from hpcsif.sif.writer import ObjectSpec, add_objects

    primary = _overlay_partition_free(sif)  # (again: it may have changed meanwhile)
    spec = ObjectSpec(
        primary.datatype,
        path=fs,
        group_id=primary.group_id,
        fstype=FSType.EXT3,
        parttype=PartType.OVERLAY,
        arch=primary.arch,
    )
    add_objects(sif, [spec])
