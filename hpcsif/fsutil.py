"""File helpers: atomic publication (write beside, fsync, rename, fsync the directory), fast copies,
a short exclusive ``flock`` around read-modify-write updates, and bounded reads of files that
an image or a user controls."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def flocked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for a short critical section."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes
        yield
    finally:
        os.close(fd)


def read_regular(path: str | os.PathLike[str], limit: int, *, follow: bool = True) -> bytes | None:
    """At most ``limit + 1`` bytes of the regular file ``path`` (more than ``limit``: too large).

    None when ``path`` is not a regular file: a FIFO or a device is never read (it would block,
    or never end), nor, without ``follow``, a symbolic link. OSError (missing …) propagates.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            return None  # the link itself
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before open(), which refuses a directory
        os.close(fd)
        return None
    with open(fd, "rb") as f:
        return f.read(limit + 1)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(dest: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """A temp file beside ``dest``; on success it is fsynced and renamed to ``dest``, else removed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(dest: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_output(dest, mode) as f:
        f.write(data)


# copy_file_range cannot serve this pair of files (old kernel, cross-device, special file system)
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy the contents of ``src`` to ``dst`` (created or truncated) as ``cp`` does.

    ``copy_file_range`` keeps the data in the kernel and lets file systems that can share
    extents (XFS, Btrfs, NFS 4.2 server-side copy) do so; where it cannot serve the pair of
    files, :func:`shutil.copyfile` does the copy. Nothing is fsynced.
    """
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        copied = 0
        try:
            while n := os.copy_file_range(fin.fileno(), fout.fileno(), 1 << 30):
                copied += n
        except OSError as exc:
            if copied or exc.errno not in _NO_COPY_RANGE:
                raise
        if copied:  # else some file systems (procfs …) report 0 bytes instead of an error
            return
    shutil.copyfile(src, dst)
