"""check_trusted_path: refuse images that another user could replace."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcsif.cache.trust import check_trusted_path
from hpcsif.errors import TrustError


@pytest.fixture
def sif(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    f = d / "app.sif"
    f.write_bytes(b"x")
    os.chmod(f, 0o644)
    return f


def test_private_path_is_trusted(sif: Path) -> None:
    assert check_trusted_path(sif) == sif.resolve()


def test_other_writable_directory_is_refused(sif: Path) -> None:
    os.chmod(sif.parent, 0o777)
    with pytest.raises(TrustError, match="writable by every user"):
        check_trusted_path(sif)


def test_sticky_other_writable_directory_is_trusted(sif: Path) -> None:
    os.chmod(sif.parent, 0o1777)
    check_trusted_path(sif)


def test_other_writable_file_is_refused_even_in_a_sticky_dir(sif: Path) -> None:
    os.chmod(sif.parent, 0o1777)
    os.chmod(sif, 0o666)
    with pytest.raises(TrustError, match="writable by every user"):
        check_trusted_path(sif)


def test_group_writable_shared_group_is_refused(sif: Path) -> None:
    if not shutil.which("groupadd"):
        pytest.skip("groupadd not available")
    if os.geteuid() != 0:
        pytest.skip("needs root to create a group")
    subprocess.run(["groupadd", "-f", "hpcsiftrust"], check=True)
    import grp

    os.chown(sif.parent, -1, grp.getgrnam("hpcsiftrust").gr_gid)
    os.chmod(sif.parent, 0o775)
    with pytest.raises(TrustError, match="writable by group"):
        check_trusted_path(sif)


def test_symlink_is_judged_by_its_target(sif: Path, tmp_path: Path) -> None:
    os.chmod(sif.parent, 0o777)
    link = tmp_path / "link.sif"
    link.symlink_to(sif)
    with pytest.raises(TrustError, match=str(sif.parent)):
        check_trusted_path(link)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_root_refuses_a_directory_owned_by_an_unprivileged_user(sif: Path) -> None:
    os.chown(sif.parent, 65534, 65534)
    with pytest.raises(TrustError, match="owned by"):
        check_trusted_path(sif)
    os.chown(sif.parent, 0, 0)
    os.chown(sif, 65534, 65534)
    with pytest.raises(TrustError, match="owned by"):
        check_trusted_path(sif)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="no such file"):
        check_trusted_path(tmp_path / "nope.sif")
