"""Paths inside an image's root directory, with its symbolic links followed inside the image."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Container


def walk(root: str, path: str, *, follow_last: bool) -> tuple[str, list[str]] | None:
    """Follow the image's *path* as far as it exists, its symbolic links followed inside the image.

    Returns the image path reached and the components left (none when all of *path* exists);
    the last component's own link is followed only with *follow_last*. None on a link loop
    or a non-directory before the last component.
    """
    # '..' in *path* itself stops at the image's root too (a link's target is treated so below)
    parts = [p for p in os.path.normpath("/" + path).split("/") if p]
    cur, hops = "/", 0
    while parts:
        cand = os.path.join(cur, parts[0])
        try:
            st = os.lstat(root + cand)
        except OSError:
            return cur, parts
        if stat.S_ISLNK(st.st_mode) and (follow_last or len(parts) > 1):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(root + cand)
            base = "/" if target.startswith("/") else cur
            parts = [p for p in os.path.normpath(os.path.join(base, target)).split("/") if p] + parts[1:]
            cur = "/"
            continue
        parts.pop(0)
        if parts and not stat.S_ISDIR(st.st_mode):
            return None
        cur = cand
    return cur, []


def missing_parent(root: str, dest: str) -> str | None:
    """The deepest directory of *dest*'s path that exists in the image when *dest* itself does not.

    Symbolic links in the image are followed inside the image (as bwrap will); None when
    *dest* exists (a mount point is already there).
    """
    walked = walk(root, dest, follow_last=False)
    if walked is None:
        return None
    cur, left = walked
    if left:
        return cur
    # the destination itself is a link (/etc/localtime -> a zoneinfo file the image may lack):
    # bwrap would create the mount point at the link's target, so the parent is underlaid and
    # the link left out of it (see underlay_entries)
    return os.path.dirname(cur) if cur != "/" and os.path.islink(root + cur) else None


def is_file(path: str) -> bool:
    """True when *path* is a regular file itself (not a symbolic link to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_executable(path: str | None) -> bool:
    """True when *path* (a host path, or None) is an executable regular file."""
    return path is not None and os.path.isfile(path) and os.access(path, os.X_OK)


def in_image(root: str, path: str) -> str | None:
    """The host path of the image's *path* with its symbolic links followed inside the image.

    *root* is the image's root directory on the host; None when *path* is not there (or on
    a link loop). An absolute link or a ``..`` chain never leads out of *root*.
    """
    walked = walk(root, path, follow_last=True)
    return root + walked[0] if walked is not None and not walked[1] else None


def runs_as_is(root: str, path: str) -> bool:
    """Whether the image's program at *path* (a host path below *root*) is an ELF file that needs
    no loader, or whose loader (its ``PT_INTERP``) the image has; False when it cannot be told.

    The launcher checks this itself (reading the file in the image's shell, a millisecond or two
    for a static program): a program found runnable here is not checked again there.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] not in (1, 2):
                return False
            wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
            (table,) = struct.unpack_from(order + ("Q" if wide else "I"), head, 32 if wide else 28)
            size, count = struct.unpack_from(order + "HH", head, 54 if wide else 42)
            if count > 512 or size < (56 if wide else 32):
                return False
            f.seek(table)
            headers = f.read(size * count)
            for i in range(count):
                if struct.unpack_from(order + "I", headers, i * size)[0] != 3:  # PT_INTERP
                    continue
                word = order + ("Q" if wide else "I")
                (offset,) = struct.unpack_from(word, headers, i * size + (8 if wide else 4))
                (length,) = struct.unpack_from(word, headers, i * size + (32 if wide else 16))
                f.seek(offset)
                loader = f.read(min(length, 4096)).split(b"\0")[0]
                return loader.startswith(b"/") and in_image(root, os.fsdecode(loader)) is not None
            return True  # (static: no loader)
    except (OSError, struct.error):
        return False


def underlay_entries(host_dir: str, d: str, bind: str, skip: Container[str]) -> list[str]:
    """bwrap arguments re-creating the entries of *host_dir* inside a tmpfs at *d*.

    Entries that are mount destinations of another kind (*skip*: a symbolic link, a file where
    a directory is mounted) are left out: the mount creates its own mount point in their place.
    """
    args = []
    for name in sorted(os.listdir(host_dir)):
        host = os.path.join(host_dir, name)
        dest = os.path.join(d, name)
        try:
            st = os.lstat(host)
            if dest in skip:
                continue
            if stat.S_ISLNK(st.st_mode):
                args += ["--symlink", os.readlink(host), dest]
            else:  # (a host directory may hold sockets and fifos too)
                args += [bind, host, dest]
        except FileNotFoundError:
            continue  # gone meanwhile (a host directory in use)
    return args
