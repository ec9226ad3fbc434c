"""SIFs that Apptainer 1.4 makes with its less common features, through our CLI.

* ``apptainer overlay create``: an ext3 overlay partition next to the squashfs one;
* ``apptainer sif new/add --partfs 2``: an ext3 primary partition (Apptainer mounts it as root);
* ``apptainer sif add/setprim``: a second system partition made the primary one.

Skipped where neither ``apptainer`` nor ``peer-apptainer`` is on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcsif.sif.listing import format_list
from hpcsif.sif.reader import SIFImage
from hpcsif.signing.keys import Keyring
from tests.conftest import run_cli
from tests.sif.test_interop_format import APPTAINER, OCI_ARCHIVE, apptainer
from tests.sif.test_interop_format import pytestmark as pytestmark  # the peer's, skipped without it


def _fatal(proc: subprocess.CompletedProcess) -> str:
    """The one FATAL line of a failed hpcsif run."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("FATAL:")]
    return line


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SIF Apptainer built from the busybox OCI archive."""
    if not OCI_ARCHIVE.exists():
        pytest.skip(f"{OCI_ARCHIVE} not built yet")
    work = tmp_path_factory.mktemp("peer-features")
    archive = shutil.copy(OCI_ARCHIVE, work / OCI_ARCHIVE.name)  # the peer sees /tmp, not /work
    apptainer("build", "-F", work / "base.sif", f"oci-archive://{archive}")
    return work / "base.sif"


def test_overlay_partition(base: Path, tmp_path: Path) -> None:
    """We list it as Apptainer does, run the image, write into it with --writable, and sign it whole."""
    sif = Path(shutil.copy(base, tmp_path / "overlay.sif"))
    apptainer("overlay", "create", "--size", "64", sif)
    with SIFImage.open(sif) as img:
        assert apptainer("sif", "list", sif).stdout == format_list(img)
        assert "FS (Ext3/Overlay/amd64)" in format_list(img)
        overlay = img.overlay_partition()
        assert overlay is not None and overlay.id == 5
        assert os.pread(img.fd, 2, overlay.offset + 1080) == b"\x53\xef"  # the ext3 superblock's magic
    assert run_cli("exec", str(sif), "cat", "/etc/passwd").stdout.startswith("root:")
    # --writable writes into the partition Apptainer made, and Apptainer sees it there
    run_cli("exec", "--writable", str(sif), "touch", "/x")
    assert apptainer("exec", sif, "ls", "/x").stdout == "/x\n"
    key = Keyring(tmp_path / "keys").newpair("k")
    run_cli("sign", "--key", str(key.private_path), str(sif))
    apptainer("verify", "--key", key.public_path, sif)
    apptainer("exec", "--writable", sif, "touch", "/written-by-apptainer")  # changes the overlay
    for tool in ([sys.executable, "-m", "hpcsif.cli.main"], [str(APPTAINER)]):
        proc = subprocess.run(
            [*tool, "verify", "--key", str(key.public_path), str(sif)], capture_output=True, text=True
        )
        assert proc.returncode == 255 and "data object integrity compromised" in proc.stderr, proc.stderr
        assert "5" in proc.stderr.splitlines()[-1]


def test_ext3_primary_partition(base: Path, tmp_path: Path) -> None:
    """Apptainer runs it as root, and so do we (fuse2fs), and builds from it; inspect says in one
    line that we read only squashfs ones."""
    if shutil.which("mkfs.ext3") is None:
        pytest.skip("mkfs.ext3 (e2fsprogs) not installed")
    root = tmp_path / "root"
    apptainer("build", "--sandbox", root, base)
    (root / "marker").write_text("ext3 root\n")
    fs = tmp_path / "root.ext3"
    subprocess.run(["mkfs.ext3", "-q", "-d", str(root), str(fs), "16M"], check=True)
    sif = tmp_path / "ext3.sif"
    apptainer("sif", "new", sif)
    add_partition(sif, fs, parttype=2, partfs=2)  # a system partition, ext3
    assert apptainer("exec", sif, "cat", "/marker").stdout == "ext3 root\n"
    if shutil.which("fuse2fs"):
        assert run_cli("exec", str(sif), "cat", "/marker").stdout == "ext3 root\n"
    expect = "the primary partition (object 1) has file system type Ext3: hpcsif reads only squashfs"
    assert expect in _fatal(run_cli("inspect", str(sif), check=False))
    if shutil.which("fuse2fs"):  # build copies its tree out, as Apptainer does
        run_cli("build", str(tmp_path / "new.sif"), str(sif))
        assert run_cli("exec", str(tmp_path / "new.sif"), "cat", "/marker").stdout == "ext3 root\n"


def add_partition(sif: Path, fs: Path, *, parttype: int, partfs: int) -> None:
    """``apptainer sif add`` of the file system *fs* as an amd64 partition in object group 1."""
    apptainer(
        "sif", "add", "--datatype", 4, "--parttype", parttype, "--partfs", partfs,
        "--partarch", 2, "--groupid", 1, sif, fs,
    )  # fmt: skip


def test_setprim_by_apptainer(base: Path, tmp_path: Path) -> None:
    root = tmp_path / "second"
    (root / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    (root / "marker").write_text("second partition\n")
    fs = tmp_path / "second.sqfs"
    subprocess.run(["mksquashfs", str(root), str(fs), "-noappend", "-quiet", "-no-progress"], check=True)
    sif = Path(shutil.copy(base, tmp_path / "two.sif"))
    add_partition(sif, fs, parttype=1, partfs=1)  # a primary system partition, squashfs
    apptainer("sif", "setprim", 5, sif)
    assert run_cli("exec", str(sif), "/bin/busybox", "cat", "/marker").stdout == "second partition\n"
    run_cli("sif", "setprim", "4", str(sif))
    assert apptainer("exec", sif, "cat", "/etc/passwd").stdout.startswith("root:")
