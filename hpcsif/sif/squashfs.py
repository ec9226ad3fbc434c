"""Creating and reading squashfs images with the host's squashfs tools.

The conversion path streams a tar archive into ``tar2sqfs`` (squashfs-tools-ng) through a
pipe, so no root tree is ever unpacked to disk; where ``tar2sqfs`` is missing, the stream
is unpacked into a scratch directory (``tmpdir``) and packed with ``mksquashfs`` (also for
lz4, whose tar2sqfs 1.2 images unsquashfs 4.5 cannot read, and for trees with a directory
of more than 10000 entries, which tar2sqfs packs in quadratic time).
Sandboxes are packed with ``mksquashfs`` (which can write straight into a SIF at an
offset) and SIF partitions are unpacked with ``unsquashfs -o OFFSET``.

Defaults: zstd level 3 (ten times faster to pack than gzip for the same size; squashfuse
and kernels >= 4.14 read it), every core, no extended attributes (file capabilities are
dropped like setuid bits, see :mod:`hpcsif.image.layers`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hpcsif.errors import MissingToolError, SquashfsError, WideDirectoryError
from hpcsif.sif.superblock import superblock_ok

log = logging.getLogger(__name__)

COMPRESSIONS = ("gzip", "zstd", "lz4", "xz")
DEFAULT_LEVELS = {"zstd": 3}
_LEVEL_RANGE = {"gzip": (1, 9), "zstd": (1, 22), "xz": (0, 9)}
_PIPE_SIZE = 1 << 20
_STDERR_TAIL = 2000
_MAX_PREFIX = 64 << 20
# tar2sqfs 1.2 compares each new name with all its siblings: 10000 entries in one directory
# cost it about 1 s, 60000 about 35 s; past this many, unpacking and mksquashfs are faster
_TAR2SQFS_WIDE = 10000


def _tool(name: str) -> str:
    """Absolute path of a squashfs tool, or MissingToolError naming its Debian package."""
    path = shutil.which(name)
    if path is None:
        package = "squashfs-tools-ng" if name in ("tar2sqfs", "sqfs2tar") else "squashfs-tools"
        raise MissingToolError(name, package)
    return path


def _level(compression: str, level: int | None) -> int | None:
    """The compression level to ask for (None: the tool's default)."""
    if compression not in COMPRESSIONS:
        raise SquashfsError(
            f"unknown squashfs compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}"
        )
    if level is None:
        return DEFAULT_LEVELS.get(compression)
    if compression not in _LEVEL_RANGE:
        raise SquashfsError(f"squashfs compression {compression} takes no level (got {level})")
    low, high = _LEVEL_RANGE[compression]
    if not low <= level <= high:
        raise SquashfsError(f"{compression} compression level must be {low}..{high}, got {level}")
    return level


def _jobs(jobs: int | None) -> int:
    return max(1, jobs or os.cpu_count() or 1)


def _tail(stream: BinaryIO) -> str:
    stream.seek(0)
    text = stream.read().decode(errors="replace").strip()
    return " ".join(text[-_STDERR_TAIL:].split()) or "no message"


def _first_line(stream: BinaryIO) -> str:
    """The first line a tool wrote to ``stream``: GNU tar names every entry it could not
    extract, the same cause thousands of times, and ends with a summary that names none."""
    stream.seek(0)
    head = stream.read(_STDERR_TAIL).decode(errors="replace").strip()
    return head.splitlines()[0].strip() if head else "no message"


def _discard(pipe: BinaryIO) -> None:
    """Close a pipe whose reader is gone, dropping what is still buffered."""
    with contextlib.suppress(OSError):
        pipe.close()


def _publish(tmp: Path, dest: Path) -> None:
    """fsync ``tmp`` and rename it to ``dest`` (same directory), then fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.tmp")


def squashfs_from_tar(
    tar_stream_writer: Callable[[BinaryIO], object],
    dest: Path,
    *,
    compression: str = "zstd",
    level: int | None = None,
    jobs: int | None = None,
    tmpdir: Path | None = None,
) -> Path:
    """Pack the tar archive that ``tar_stream_writer(pipe)`` writes into squashfs ``dest``.

    ``tar2sqfs`` reads the pipe while the writer produces it, using ``jobs`` compressor
    threads (default: all cores). ``dest`` appears atomically, complete or not at all.
    Without ``tar2sqfs`` the stream is unpacked below ``tmpdir`` and packed with mksquashfs.
    Raises :class:`SquashfsError` with the tool's last words when packing fails; errors
    the writer raises propagate unchanged, except that a :class:`MergeAgainError` makes it
    start over (the flattener then knows the layer's repeated names or lower symlinks).
    """
    dest = Path(dest)
    lvl = _level(compression, level)
    from hpcsif.image.layers import merge_passes

    return merge_passes(lambda: _from_tar(tar_stream_writer, dest, compression, lvl, jobs, tmpdir))


def _from_tar(
    tar_stream_writer: Callable[[BinaryIO], object],
    dest: Path,
    compression: str,
    lvl: int | None,
    jobs: int | None,
    tmpdir: Path | None,
) -> Path:
    try:
        tool = _tool("tar2sqfs")
        if compression == "lz4":  # tar2sqfs 1.2's lz4 images are unreadable by unsquashfs 4.5
            raise MissingToolError("tar2sqfs (lz4)", "squashfs-tools")
    except MissingToolError as e:
        log.info("%s: unpacking below %s and packing with mksquashfs", e, tmpdir or "TMPDIR")
        return _from_tar_via_dir(tar_stream_writer, dest, compression, lvl, jobs, tmpdir)
    from hpcsif.image.layers import WIDE_DIRECTORY

    wide = WIDE_DIRECTORY.set(_TAR2SQFS_WIDE)
    try:
        return _tar2sqfs(tool, tar_stream_writer, dest, compression, lvl, jobs)
    except WideDirectoryError as e:
        log.info("%s: unpacking below %s and packing with mksquashfs", e, tmpdir or "TMPDIR")
    finally:
        WIDE_DIRECTORY.reset(wide)
    return _from_tar_via_dir(tar_stream_writer, dest, compression, lvl, jobs, tmpdir)


def _tar2sqfs(
    tool: str,
    tar_stream_writer: Callable[[BinaryIO], object],
    dest: Path,
    compression: str,
    lvl: int | None,
    jobs: int | None,
) -> Path:
    tmp = _temp_name(dest)
    # --no-skip: a record tar2sqfs cannot read is an error, never a silently missing file
    cmd = [tool, "--quiet", "--force", "--no-skip", "-c", compression, "-j", str(_jobs(jobs))]
    cmd += ["-d", "mode=0755"]
    if lvl is not None:
        cmd += ["-X", f"level={lvl}"]
    cmd.append(str(tmp))
    log.debug("running %s", " ".join(cmd))
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # a bigger pipe means fewer wake-ups of both sides
            fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        try:
            try:
                tar_stream_writer(proc.stdin)
                proc.stdin.close()
            except BrokenPipeError:  # tar2sqfs stopped reading: its exit status and stderr say why
                _discard(proc.stdin)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            tmp.unlink(missing_ok=True)
            raise
        if rc != 0:
            tmp.unlink(missing_ok=True)
            raise SquashfsError(f"tar2sqfs failed with exit status {rc} writing {dest}: {_tail(err)}")
    _publish(tmp, dest)
    return dest


def _from_tar_via_dir(
    writer: Callable[[BinaryIO], object],
    dest: Path,
    compression: str,
    level: int | None,
    jobs: int | None,
    tmpdir: Path | None,
) -> Path:
    """The fallback: unpack the stream with tar into scratch space, then mksquashfs."""
    with tempfile.TemporaryDirectory(prefix="hpcsif-rootfs-", dir=tmpdir) as scratch:
        root = Path(scratch) / "root"
        root.mkdir()
        # the stream is hpcsif's own sanitised merge: no "..", nothing below a symlink
        cmd = ["tar", "-x", "--numeric-owner", "-C", str(root), "-f", "-"]
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=err)
            assert proc.stdin is not None
            try:
                try:
                    writer(proc.stdin)
                    proc.stdin.close()
                except BrokenPipeError:
                    _discard(proc.stdin)
                rc = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            if rc != 0:
                raise SquashfsError(f"unpacking the root filesystem failed: {_first_line(err)}")
        return _mksquashfs(root, dest, compression, level, jobs, 0)


def _mksquashfs(
    src: Path, dest: Path, compression: str, level: int | None, jobs: int | None, offset: int
) -> Path:
    cmd = [_tool("mksquashfs"), str(src)]
    target = _temp_name(dest) if offset == 0 else dest
    cmd += [str(target), "-noappend", "-no-xattrs", "-quiet", "-no-progress"]
    cmd += ["-comp", compression, "-processors", str(_jobs(jobs))]
    if level is not None:
        cmd += ["-Xcompression-level", str(level)]
    if offset:
        cmd += ["-o", str(offset)]
    log.debug("running %s", " ".join(cmd))
    prefix = _read_prefix(dest, offset)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if prefix:  # mksquashfs -noappend zeroes what lies before the offset: put it back
        with open(dest, "r+b") as f:
            f.write(prefix)
    if proc.returncode != 0:
        if offset == 0:
            target.unlink(missing_ok=True)
        tail = " ".join(proc.stdout.decode(errors="replace")[-_STDERR_TAIL:].split())
        raise SquashfsError(f"mksquashfs failed with exit status {proc.returncode} for {src}: {tail}")
    if offset == 0:
        _publish(target, dest)
    return dest


def _read_prefix(dest: Path, offset: int) -> bytes:
    """The bytes before ``offset`` in ``dest`` (a SIF header and descriptors: small)."""
    if not offset:
        return b""
    if offset > _MAX_PREFIX:
        raise SquashfsError(
            f"cannot write squashfs into {dest} at offset {offset}: more than {_MAX_PREFIX} bytes"
        )
    with open(dest, "rb") as f:
        return f.read(offset)


def squashfs_from_dir(
    src: Path,
    dest: Path,
    *,
    compression: str = "zstd",
    level: int | None = None,
    jobs: int | None = None,
    offset: int = 0,
) -> Path:
    """Pack directory ``src`` into squashfs ``dest`` with mksquashfs.

    With ``offset`` 0, ``dest`` appears atomically. With ``offset > 0`` the filesystem is
    written into the existing file ``dest`` starting at that byte (e.g. a SIF's data
    area); the bytes before it are left alone.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise SquashfsError(f"cannot pack {src}: not a directory")
    if offset and not dest.is_file():
        raise SquashfsError(f"cannot write squashfs into {dest} at offset {offset}: no such file")
    return _mksquashfs(src, dest, compression, _level(compression, level), jobs, offset)


def _only_device_nodes_left_out(output: bytes) -> bool:
    """Whether everything unsquashfs (run by a user) failed at is a device node it may not make."""
    text = output.decode(errors="replace")
    failures = text.count("create_inode:")
    return 0 < failures == text.count("because you're not superuser!") and "failed" not in text.lower()


def unsquash_to_dir(image: Path, dest: Path, *, offset: int = 0) -> None:
    """Unpack the squashfs at ``offset`` in ``image`` into the new directory ``dest``."""
    image, dest = Path(image), Path(dest)
    if dest.exists():
        raise SquashfsError(f"cannot unpack into {dest}: it already exists")
    if not superblock_ok(image, offset):
        raise SquashfsError(f"{image}: no valid squashfs filesystem at offset {offset}")
    cmd = [_tool("unsquashfs"), "-no-progress", "-no-xattrs", "-d", str(dest)]
    if offset:
        cmd += ["-o", str(offset)]
    cmd.append(str(image))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if proc.returncode == 2 and os.geteuid() != 0 and _only_device_nodes_left_out(proc.stdout):
        log.warning("%s: device nodes in the image were not created (only root can make them)", image)
    elif proc.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        tail = " ".join(proc.stdout.decode(errors="replace")[-_STDERR_TAIL:].split())
        raise SquashfsError(f"unsquashfs failed with exit status {proc.returncode} for {image}: {tail}")
