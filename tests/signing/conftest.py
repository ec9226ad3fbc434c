"""Fixtures for signing tests: a small real SIF (squashfs partition + Apptainer's metadata objects)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hpcsif.sif.format import DataType, FSType, PartType
from hpcsif.sif.writer import ObjectSpec, write_sif

DEFFILE = b"bootstrap: docker\nfrom: busybox:latest\n"
LABELS = b'{"org.example.label":"signed"}'
GENERIC = b'{"data":{"attributes":{"labels":{"org.example.label":"signed"}}},"type":"container"}'


@pytest.fixture(scope="session")
def template_sif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unsigned SIF: Def.FILE, JSON.Labels, JSON.Generic and a squashfs system partition."""
    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs (squashfs-tools) is not installed")
    work = tmp_path_factory.mktemp("signing-sif")
    root = work / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hello").write_text("hello, signed world\n" * 50)
    fs = work / "rootfs.sqfs"
    cmd = ["mksquashfs", str(root), str(fs), "-noappend", "-quiet", "-no-progress", "-comp", "gzip"]
    subprocess.run(cmd, check=True)
    return write_sif(
        work / "template.sif",
        [
            ObjectSpec(DataType.DEFFILE, data=DEFFILE),
            ObjectSpec(DataType.LABELS, data=LABELS),
            ObjectSpec(DataType.GENERIC_JSON, data=GENERIC, name="inspect-metadata.json"),
            ObjectSpec(DataType.PARTITION, path=fs, fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS),
        ],
    )


@pytest.fixture
def sif(template_sif: Path, tmp_path: Path) -> Path:
    """A fresh copy of the unsigned test SIF, free to sign and tamper with."""
    return Path(shutil.copy(template_sif, tmp_path / "app.sif"))


@pytest.fixture
def keysdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty keyring directory, selected through HPCSIF_KEYSDIR."""
    path = tmp_path / "keys"
    monkeypatch.setenv("HPCSIF_KEYSDIR", str(path))
    return path


needs_gpg = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg (Debian package gnupg) not installed")
