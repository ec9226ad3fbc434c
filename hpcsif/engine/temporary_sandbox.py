"""Run a SIF from a temporary sandbox: ``--unsquash``, or squashfuse not installed.

As Apptainer does when it cannot mount a SIF (or is asked not to), the image's squashfs root
file system is unpacked with ``unsquashfs`` into ``<tmpdir>/rootfs-XXXXXXXX/root``, run as a
sandbox directory, and removed when the container ends ("Cleaning up image..."). The
temporary directory is ``convert.tmpdir`` (``HPCSIF_TMPDIR``, ``APPTAINER_TMPDIR``,
``SINGULARITY_TMPDIR``), else ``$TMPDIR``, else ``/tmp``. Only squashfs root file systems can be
unpacked this way, as in Apptainer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from hpcsif.errors import EngineError, MissingToolError

log = logging.getLogger(__name__)


def stands_in() -> bool:
    """Whether a temporary sandbox may stand in for a missing squashfuse: none was configured
    (a configured one that is missing stays an error: the admin named it) and ``unsquashfs`` is
    installed."""
    from hpcsif.config import get_config
    from hpcsif.engine.base import which

    return not get_config().get("engine.squashfuse") and bool(which("unsquashfs"))


def needed(unsquash: bool, say: Callable[[str], None]) -> bool:
    """Whether to run from a temporary sandbox: asked for, or no squashfuse to mount with.

    Where none can stand in (:func:`stands_in`), the missing squashfuse is the error, naming
    its Debian package.
    """
    if unsquash:
        return True
    from hpcsif.engine.mounts import squashfuse_program

    try:
        squashfuse_program()
        return False
    except MissingToolError:
        if not stands_in():
            raise
    say("squashfuse not found, will not be able to mount SIF or other squashfs files")
    return True


def extract(image: Path, say: Callable[[str], None]) -> Path:
    """Unpack *image*'s root file system into a new temporary directory; returns its ``root``.

    Nothing is left behind when unpacking fails.
    """
    import tempfile

    from hpcsif.config import get_config
    from hpcsif.engine.image_files import root_image
    from hpcsif.sif.squashfs import unsquash_to_dir

    info = root_image(image)
    say("Converting SIF file to temporary sandbox...")
    if info.fstype != "squashfs":
        log.error('File "%s" is an ext3 format container image.', image)
        log.error("Only SIF and squashfs images can be extracted in unprivileged mode.")
        log.error(
            "Use `apptainer build` to convert this image to a SIF file using a setuid install of Apptainer."
        )
        raise EngineError(f"while extracting {image}: not a squashfs root filesystem")
    parent = str(get_config().get("convert.tmpdir") or "") or None
    try:
        top = Path(tempfile.mkdtemp(prefix="rootfs-", dir=parent))
    except OSError as exc:
        raise EngineError(f"could not create temporary sandbox: {exc.strerror}: {exc.filename}") from None
    try:
        unsquash_to_dir(image, top / "root", offset=info.offset)
    except BaseException:
        remove(top / "root")
        raise
    return top / "root"


def remove(root: Path, say: Callable[[str], None] | None = None) -> None:
    """Remove the temporary sandbox whose ``root`` is *root* (and its ``rootfs-`` directory).

    Directories the image made unwritable (mode 0555, 0500 …) are opened up first, as a user
    cannot otherwise remove what is in them. *say* gets Apptainer's "Cleaning up image...".
    """
    import shutil

    if say is not None:
        say("Cleaning up image...")
    top = root.parent
    for path, dirs, _files in os.walk(top):
        for d in dirs:
            full = os.path.join(path, d)
            if not os.path.islink(full):
                with contextlib.suppress(OSError):
                    os.chmod(full, 0o700)
    shutil.rmtree(top, ignore_errors=True)
    if top.exists():
        log.warning("could not remove the temporary sandbox %s", top)
