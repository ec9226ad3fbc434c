"""Trust between users: never run a SIF that another user could have replaced.

A SIF is trusted when the file and every directory above it (after resolving symlinks) can
be changed only by the caller or root: each is owned by the caller or root, and is not
writable by group or others. Two exceptions keep common setups working: a directory with
the sticky bit (``/tmp``) lets others add entries but not replace ours, and a group made for
one user (the caller's own primary group with no other members, or root's group with no
members) may be writable.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from hpcsif.errors import TrustError


def _private_group(gid: int, uid: int) -> bool:
    """True if nobody but ``uid`` (and root) belongs to group ``gid``."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    if gid == 0:
        return set(group.gr_mem) <= {"root"}
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    if gid != user.pw_gid or group.gr_name != user.pw_name:
        return False  # only user-private groups (named after their one user) count
    return set(group.gr_mem) <= {user.pw_name}


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _check_one(path: Path, st: os.stat_result, uid: int, *, is_target: bool) -> None:
    if st.st_uid not in (0, uid):
        raise TrustError(
            f"refusing to use {path}: owned by {_owner_name(st.st_uid)}, who could replace the image "
            "(use your own cache directory or the system cache)"
        )
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and not is_target
    if st.st_mode & stat.S_IWOTH and not sticky_dir:
        raise TrustError(f"refusing to use {path}: writable by every user (mode {stat.filemode(st.st_mode)})")
    if st.st_mode & stat.S_IWGRP and not sticky_dir and not _private_group(st.st_gid, uid):
        raise TrustError(
            f"refusing to use {path}: writable by group {st.st_gid} (mode {stat.filemode(st.st_mode)}); "
            "remove group write permission"
        )


def check_trusted_path(path: str | os.PathLike[str]) -> Path:
    """Raise :class:`TrustError` unless ``path`` and all its parents are safe from other users.

    Returns the resolved path, which is what should be opened.
    """
    uid = os.geteuid()
    real = Path(os.path.realpath(path))
    try:
        _check_one(real, real.stat(), uid, is_target=True)
        for parent in real.parents:
            _check_one(parent, parent.stat(), uid, is_target=False)
    except FileNotFoundError:
        raise TrustError(f"{path}: no such file") from None
    except PermissionError:
        raise TrustError(f"{path}: cannot inspect its directories (permission denied)") from None
    from hpcsif.signing.policy import require_trusted  # cache.require_signed: signed by a trusted key

    require_trusted(real)
    return real
