"""The root file system of an image file, as the bwrap engine mounts it.

Apptainer runs more than a SIF's squashfs partition, and so does this engine:

* a SIF with an ext3 overlay partition (``apptainer overlay create IMG.sif``): what
  ``apptainer exec --writable`` wrote there is part of the image on every later start. Its
  ``upper/`` directory (overlayfs whiteouts and opaque directories included) becomes the top
  read-only layer of a ``fuse-overlayfs`` over the squashfs mount, the ext3 file system being
  mounted read-only with ``fuse2fs``;
* a bare squashfs file (``mksquashfs ROOT img.sqfs``), mounted as a SIF's partition at offset 0;
* a bare ext3 image file, mounted read-only with ``fuse2fs``.

Every mount is a :class:`~hpcsif.engine.mounts.SharedMount`, one per node and image, shared
by concurrent containers and removed by the last one (or its watchdog after a SIGKILL).
A SIF whose primary partition is built for an architecture this host cannot run is refused
here, in Apptainer's words, before anything is mounted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from hpcsif.engine.base import which
from hpcsif.engine.mounts import SharedMount, image_key, squashfs_mount
from hpcsif.errors import EngineError, MissingToolError, SIFError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RootImage:
    """Where an image file keeps its root file system and the changes stacked on it."""

    path: Path
    #: ``"squashfs"`` or ``"ext3"``
    fstype: str
    #: byte offset of the root file system in the file
    offset: int = 0
    #: byte offset of a SIF's ext3 overlay partition, None without one
    overlay: int | None = None
    #: its size in bytes
    overlay_size: int = 0
    #: False for a bare file system image (no SIF around it)
    sif: bool = True


def root_image(image: Path) -> RootImage:
    """What *image* (a SIF, or a bare squashfs or ext3 file) runs; :class:`SIFError` if nothing.

    A SIF's primary partition must be a valid squashfs file system for an architecture this
    host runs (:func:`hpcsif.sif.arch.require_runnable`).
    """
    from hpcsif.sif.reader import SIFImage, bare_filesystem, ext3_compatible
    from hpcsif.sif.superblock import superblock_ok

    bare = bare_filesystem(image)
    if bare == "squashfs":
        if not superblock_ok(image):
            raise SIFError(f"{image}: not a valid squashfs file system (damaged or truncated)")
        return RootImage(image, "squashfs", sif=False)
    if bare == "ext3":
        if not ext3_compatible(image):
            raise SIFError(f"could not open image {image}: file is not a valid ext3 image")
        return RootImage(image, "ext3", sif=False)
    from hpcsif.sif.arch import require_runnable
    from hpcsif.sif.format import FSType

    with SIFImage.open(image) as sif:
        part = sif.primary_partition(check=False)
        if part.fstype != FSType.EXT3 or not part.size:
            part = sif.primary_partition()  # squashfs, checked
        overlay = sif.overlay_partition()
    require_runnable(image, part.arch or "unknown")
    if part.fstype == FSType.EXT3:  # (Apptainer mounts it as the root file system too)
        if not ext3_compatible(image, part.offset):
            raise SIFError(
                f"{image}: the primary partition (object {part.id}) is not a valid ext3 file system"
            )
        return RootImage(image, "ext3", part.offset)
    if overlay is not None and not ext3_compatible(image, overlay.offset):
        # as Apptainer, which skips it silently; a user who wrote there is told
        log.warning("ignoring the overlay partition of %s: not a valid ext3 file system", image)
        overlay = None
    if overlay is None:
        return RootImage(image, "squashfs", part.offset)
    return RootImage(image, "squashfs", part.offset, overlay.offset, overlay.size)


def writable_overlay(image: Path) -> tuple[int, int]:
    """(offset, size) of the SIF overlay partition that ``--writable`` on *image* writes into.

    As in Apptainer, a bare squashfs file is read-only and a SIF needs an overlay partition
    (``hpcsif overlay create IMAGE.sif``); an ext3 image file (Singularity 2's writable images)
    is not written into here.
    """
    info = root_image(image)
    if not info.sif and info.fstype == "squashfs":
        raise EngineError(f"could not set {image} image writable: squashfs is a read-only filesystem")
    if not info.sif:
        raise UsageError(
            "--writable with an ext3 image file is not supported by hpcsif: use it as --overlay "
            "IMG over a SIF, --writable-tmpfs, a sandbox or --engine apptainer"
        )
    if info.overlay is None:
        raise EngineError(f"no SIF writable overlay partition found in {image}")
    return info.overlay, info.overlay_size


def mount_root(image: Path, mounts: list[SharedMount], *, with_overlay: bool = True) -> Path:
    """Mount *image*'s root file system (read-only) and return where it is.

    Each mount is appended to *mounts* as soon as it is held, so that the caller releases
    (in reverse order) whatever was mounted even when a later step fails. A SIF's overlay
    partition is stacked on it read-only (locked for reading, as Apptainer does) unless not
    *with_overlay* (``--writable`` stacks it writable itself); it is left out, with one
    warning, where ``fuse2fs`` or ``fuse-overlayfs`` is missing.
    """
    info = root_image(image)
    if info.fstype == "squashfs":
        base = squashfs_mount(str(image), info.offset)
    else:
        base = ext3_mount(image, info.offset)
    mounts.append(base)
    root = _readable(base.acquire(), image, f"its {info.fstype} file system")
    if info.fstype == "ext3" or info.overlay is None or not with_overlay:
        return root
    missing = next((t for t in ("fuse2fs", "fuse-overlayfs") if not which(t)), None)
    if missing:
        log.warning(
            "ignoring the overlay partition of %s (what apptainer --writable wrote there is missing): "
            "%s not found, install the Debian package '%s'",
            image,
            missing,
            missing,
        )
        return root
    from hpcsif.engine.overlay_images import lock_partition

    lock = lock_partition(image, info.overlay, info.overlay_size, write=False)
    changes = ext3_mount(image, info.overlay)
    changes.pass_fds = (lock,)
    mounts.append(changes)
    upper = _readable(changes.acquire(), image, "its overlay partition") / "upper"
    if not upper.is_dir():
        return root  # nothing was ever written into it
    top = SharedMount(
        image_key("sifov", image, info.overlay),
        lambda mnt: ["fuse-overlayfs", "-o", f"lowerdir={upper}:{root}", str(mnt)],
    )
    mounts.append(top)
    return top.acquire()


def mounted_until_exit(image: Path) -> Path:
    """*image*'s root file system (see :func:`mount_root`), held until this process exits.

    For reading an image that only a mount makes readable (inspect of an ext3 image file):
    the mounts are released at exit, or by their watchdogs should the process be killed.
    """
    import atexit

    mounts: list[SharedMount] = []
    atexit.register(lambda: [m.release() for m in reversed(mounts)])
    return mount_root(image, mounts)


def ext3_mount(image: Path, offset: int) -> SharedMount:
    """The shared read-only ``fuse2fs`` mount of the ext3 file system at *offset* in *image*."""
    prog = which("fuse2fs")
    if not prog:
        raise MissingToolError("fuse2fs", "fuse2fs", "needed for ext3 images")
    # fakeroot: fuse2fs's own access checks let a user read what the image's root owns, as
    # squashfuse does; norecovery: a journal left unreplayed (apptainer --writable killed) is
    # ignored rather than refusing the mount, the file system being read only
    options = f"ro,norecovery,fakeroot,offset={offset}"
    key = image_key("ext3", image, offset)
    return SharedMount(key, lambda mnt: [prog, str(image), str(mnt), "-o", options])


def _readable(mnt: Path, image: Path, what: str) -> Path:
    """*mnt*, after checking that its root directory can be listed (a damaged file system
    mounts but fails on the first read)."""
    try:
        os.listdir(mnt)
    except OSError as exc:
        raise EngineError(f"{image}: {what} cannot be read ({exc.strerror})") from None
    return mnt
