"""Image binds and overlay images: file systems in image files, used as Apptainer uses them.

``-B data.sqfs:/data:image-src=/sub`` (or ``--mount src=…,dst=…,image-src=…``) binds ``/sub``
of the squashfs file ``data.sqfs`` at ``/data``; ``id=N`` picks the data partition of a SIF
(the first one by default). The image is mounted with the other image mounts of the launch
(:class:`~hpcsif.engine.mounts.SharedMount`: one per node and image, shared by concurrent
containers, gone with the last one), and its directory is then bound as a host directory.

As in Apptainer, squashfs is read-only (a bind that did not ask for ``ro`` gets its warning),
and an ext3 image (``mkfs.ext3 -d DIR img 64M``) is writable unless the bind says ``ro`` or the
caller may not write the file. An ext3 image is mounted once per file whatever changes it
(its writes change its time), so that no two ``fuse2fs`` ever write the same file.

``--overlay data.sqfs`` (or an ext3 file with ``:ro``) is a read-only layer over the image: the
squashfs file's root, the ext3 file's ``upper/`` directory (Apptainer's overlay layout).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from hpcsif.engine.base import which
from hpcsif.engine.binds import Bind
from hpcsif.engine.mounts import SharedMount, squashfs_mount
from hpcsif.errors import EngineError, MissingToolError, SIFError

log = logging.getLogger(__name__)


def resolve_image_binds(binds: list[Bind], mounts: list[SharedMount]) -> list[Bind]:
    """*binds* with each image bind replaced by a bind of the mounted image's directory.

    Each mount is appended to *mounts* as soon as it is held (the caller releases them).
    """
    return [_resolve(b, mounts) if b.image_src is not None else b for b in binds]


def _resolve(bind: Bind, mounts: list[SharedMount]) -> Bind:
    fstype, offset = _data_filesystem(bind.src, bind.image_id)
    image = Path(bind.src)
    readonly = bind.readonly
    if fstype == "squashfs":
        mount = squashfs_mount(str(image), offset)
        if not readonly and offset == 0:  # (a SIF's squashfs data partition is read-only silently)
            log.warning("Data image %s is not writable, proceeding with read-only", image)
        readonly = True
    else:
        writable = os.access(image, os.W_OK)
        if not readonly and not writable:
            log.warning("Data image %s is not writable, proceeding with read-only", image)
        mount = ext3_data_mount(image, offset, writable)
        readonly = readonly or not writable
    mounts.append(mount)
    root = mount.acquire()
    inside = os.path.normpath(f"{root}/{bind.image_src}")
    if not os.path.lexists(inside):
        raise EngineError(
            "container creation failed: mount hook function failure: hook function for tag prelayer "
            f"returns error: {bind.image_src} doesn't exist in image {image}"
        )
    return dataclasses.replace(bind, src=inside, readonly=readonly, image_src=None, image_id=None)


def _data_filesystem(path: str, image_id: int | None) -> tuple[str, int]:
    """(``"squashfs"`` or ``"ext3"``, byte offset) of the data file system in *path*: a bare
    squashfs or ext3 file, or a SIF's data partition (object *image_id*, else the first)."""
    from hpcsif.sif.format import DataType, FSType, PartType
    from hpcsif.sif.reader import SIFImage, bare_filesystem

    if not os.path.lexists(path):
        raise EngineError(
            f"while loading data bind images: failed to load data image {path}: failed to retrieve "
            f"path for {path}: lstat {path}: no such file or directory"
        )
    if os.path.isdir(path):
        raise EngineError(
            f"container creation failed: could not use {path} for image binding: not supported image format"
        )
    bare = bare_filesystem(path)
    if bare is not None:
        return bare, 0
    try:
        with SIFImage.open(path) as sif:
            data = [
                d
                for d in sif.find(DataType.PARTITION)
                if d.parttype == PartType.DATA and d.fstype in (FSType.SQUASHFS, FSType.EXT3)
            ]
    except SIFError:
        raise EngineError(
            f"while loading data bind images: failed to load data image {path}: image format not recognized"
        ) from None
    found = next((d for d in data if image_id is None or d.id == image_id), None)
    if found is None:
        raise EngineError(f"container creation failed: no data partition found in {path}")
    return ("squashfs" if found.fstype == FSType.SQUASHFS else "ext3"), found.offset


def ext3_data_mount(image: Path, offset: int, writable: bool) -> SharedMount:
    """The shared ``fuse2fs`` mount of an ext3 data image, read-write when *writable*."""
    prog = which("fuse2fs")
    if not prog:
        raise MissingToolError("fuse2fs", "fuse2fs", "needed for ext3 images")
    st = os.stat(image)
    # keyed on the file alone (not its time, which its writes change): one fuse2fs per file
    key = f"ext3data-{st.st_dev:x}-{st.st_ino:x}-{offset:x}-{'rw' if writable else 'ro'}"
    # fakeroot: fuse2fs's own access checks let the user use what the image's root owns, as in
    # the root file system's mount (image_files.ext3_mount)
    options = f"{'rw' if writable else 'ro,norecovery'},fakeroot,offset={offset}"
    return SharedMount(key, lambda mnt: [prog, str(image), str(mnt), "-o", options])


def mount_overlay_image(image: Path, mounts: list[SharedMount]) -> Path:
    """The read-only layer of the overlay image file *image* (a bare squashfs or ext3 file),
    mounted and appended to *mounts*."""
    from hpcsif.engine.image_files import ext3_mount
    from hpcsif.sif.reader import bare_filesystem

    if bare_filesystem(image) == "squashfs":
        mount = squashfs_mount(str(image), 0)
    else:
        from hpcsif.engine.overlay_images import lock_partition

        lock = lock_partition(image, 0, image.stat().st_size, write=False)  # (no writer meanwhile)
        mount = ext3_mount(image, 0)
        mount.pass_fds = (lock,)
    mounts.append(mount)
    root = mount.acquire()
    return root / "upper" if (root / "upper").is_dir() else root
