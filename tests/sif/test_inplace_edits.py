"""Edits of an existing SIF (``sign``, ``sif add|del|setprim``) change the image a user named, as
Apptainer's in-place edits do: through a symbolic link they rewrite the link's target (the link
stays), and the image keeps its owner and mode when root edits a user's image.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hpcsif.sif.format import DataType, FSType, PartType
from hpcsif.sif.reader import SIFImage
from hpcsif.sif.writer import ObjectSpec, write_sif
from hpcsif.signing.keys import Keyring
from tests.conftest import run_cli


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
