"""Edits of an existing SIF (``sign``, ``sif add|del|setprim``) change the image a user named, as
Apptainer's in-place edits do: through a symbolic link they rewrite the link's target (the link
stays), the image keeps its owner and mode when root edits a user's image, and a user cannot
edit an image that is read-only to them (a rename would replace it).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from hpcsif.sif.format import DataType, FSType, PartType
from hpcsif.sif.reader import SIFImage
from hpcsif.sif.writer import ObjectSpec, write_sif
from hpcsif.signing.keys import Keyring
from tests.conftest import ROOT, run_cli
from tests.services.users import USER_PYTHON, TestUser


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small SIF (its 'partition' need not be a file system for these edits)."""
    (tmp_path / "images").mkdir()
    return write_sif(
        tmp_path / "images" / "app-v2.sif",
        [
            ObjectSpec(DataType.DEFFILE, data=b"bootstrap: scratch\n"),
            ObjectSpec(
                DataType.PARTITION, data=b"x" * 4096, fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS
            ),
        ],
    )


def _ids(path: Path) -> list[int]:
    with SIFImage.open(path) as img:
        return [d.id for d in img.descriptors]


def test_edits_through_a_link_rewrite_its_target(image: Path, tmp_path: Path) -> None:
    link = tmp_path / "latest.sif"
    link.symlink_to(os.path.relpath(image, tmp_path))
    key = Keyring(tmp_path / "keys").newpair("k")
    run_cli("sign", "--key", str(key.private_path), str(link))
    data = tmp_path / "note.txt"
    data.write_text("note")
    run_cli("sif", "add", "--datatype", "7", "--groupid", "1", str(link), str(data))
    run_cli("sif", "del", "1", str(link))
    assert link.is_symlink() and link.resolve() == image
    assert _ids(image) == [2, 3, 4]
    assert sorted(p.name for p in image.parent.iterdir()) == ["app-v2.sif"]  # no temp file left


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_root_edit_keeps_owner_and_mode(image: Path, tmp_path: Path) -> None:
    os.chown(image, 4321, 4322)
    image.chmod(0o640)
    data = tmp_path / "note.txt"
    data.write_text("note")
    run_cli("sif", "add", "--datatype", "7", "--groupid", "1", str(image), str(data))
    info = image.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (4321, 4322, 0o640)
    assert _ids(image) == [1, 2, 3]


def test_user_cannot_edit_a_read_only_image(unpriv_user: TestUser) -> None:
    with tempfile.TemporaryDirectory(prefix="hpcsif-ro-") as d:
        base = Path(d)  # pytest's tmp_path is root's alone
        os.chown(base, unpriv_user.uid, unpriv_user.gid)
        image = write_sif(base / "ro.sif", [ObjectSpec(DataType.DEFFILE, data=b"bootstrap: scratch\n")])
        (base / "note.txt").write_text("note")
        os.chown(image, unpriv_user.uid, unpriv_user.gid)
        image.chmod(0o444)
        before = image.read_bytes()
        cmd = [USER_PYTHON, "-m", "hpcsif.cli.main", "sif", "add", "--datatype", "7", "ro.sif", "note.txt"]
        proc = unpriv_user.run(cmd, env={"PYTHONPATH": str(ROOT)}, cwd=base, timeout=60)
        assert proc.returncode == 255 and proc.stderr == f"FATAL:   cannot write {image}: Permission denied\n"
        assert image.read_bytes() == before and sorted(os.listdir(base)) == ["note.txt", "ro.sif"]
