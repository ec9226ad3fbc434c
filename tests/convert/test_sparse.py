"""Sparse files in layers (GNU tar's PAX 1.0 and old GNU formats) stay sparse: their holes are
never read, piped or written out, in a SIF or a sandbox, and read back byte for byte."""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from hpcsif.image.compose import ImageSpec, write_oci_layout
from tests.conftest import run_cli

GIB = 1 << 30
# (offset, bytes) of the data in each sparse file: at the start, in the middle, at the end
DATA = [(0, b"head"), (GIB // 2 + 4096, b"middle"), (GIB - 3, b"end")]


def _sparse_layer(tmp_path: Path, name: str, size: int, fmt: str) -> bytes:
    """A layer made by GNU tar --sparse holding ``name``, ``size`` bytes, mostly holes, and
    ``name-hole``, ``size`` bytes of holes only."""
    src = tmp_path / f"src-{fmt}"
    src.mkdir()
    with open(src / name, "wb") as f:
        f.truncate(size)
        for offset, data in DATA:
            f.seek(size - GIB + offset)
            f.write(data)
    with open(src / f"{name}-hole", "wb") as f:
        f.truncate(size)
    tar = tmp_path / f"{fmt}.tar"
    cmd = [
        "tar",
        "--sparse",
        f"--format={fmt}",
        "--owner=0",
        "--group=0",
        "-cf",
        str(tar),
        "-C",
        str(src),
        ".",
    ]
    subprocess.run(cmd, check=True)
    return tar.read_bytes()


def _layout(tmp_path: Path, size: int) -> Path:
    layout = tmp_path / "layout"
    layers = [_sparse_layer(tmp_path, "pax", size, "posix"), _sparse_layer(tmp_path, "gnu", size, "gnu")]
    write_oci_layout(layout, ImageSpec(layers=layers))
    return layout


def _check(path: Path, size: int, holes: bool = True) -> None:
    """``path`` has ``size`` bytes, DATA where it belongs, and (``holes``) almost no blocks on disk."""
    st = path.stat()
    assert st.st_size == size and (not holes or st.st_blocks * 512 < (1 << 20)), st
    with open(path, "rb") as f:
        for offset, data in DATA:
            f.seek(size - GIB + offset)
            assert f.read(len(data)) == (bytes(len(data)) if path.name.endswith("-hole") else data)
        f.seek(size - GIB + 4096)
        assert f.read(1 << 16) == bytes(1 << 16)


def test_sparse_files_convert_without_their_holes_and_unpack_sparse(tmp_path: Path) -> None:
    """The holes never go through the pipe to tar2sqfs (the tar stream of four 4 GiB files is a
    few KiB); the squashfs stores them as sparse blocks, which unsquashfs writes back as holes."""
    size = 4 * GIB
    sif = tmp_path / "sparse.sif"
    proc = run_cli("-d", "build", str(sif), f"oci:{_layout(tmp_path, size)}", timeout=60)
    stream = re.search(r"in a (\d+)-byte tar stream", proc.stderr)
    assert stream and int(stream.group(1)) < (1 << 20), proc.stderr
    assert sif.stat().st_size < (1 << 20)
    tree = tmp_path / "tree"
    run_cli("build", "--sandbox", str(tree), str(sif))
    for name in ("pax", "gnu", "pax-hole", "gnu-hole"):
        _check(tree / name, size)


def test_a_sandbox_keeps_the_holes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    run_cli("build", "--sandbox", str(tree), f"oci:{_layout(tmp_path, GIB)}")
    for name in ("pax", "gnu", "pax-hole", "gnu-hole"):
        _check(tree / name, GIB)


def test_apptainer_reads_our_sparse_files(tmp_path: Path, apptainer: str) -> None:
    sif = tmp_path / "sparse.sif"
    run_cli("build", str(sif), f"oci:{_layout(tmp_path, GIB)}")
    tree = tmp_path / "peer-tree"
    subprocess.run([apptainer, "build", "--sandbox", str(tree), str(sif)], capture_output=True, check=True)
    for name in ("pax", "gnu", "pax-hole", "gnu-hole"):
        _check(tree / name, GIB, holes=False)


@pytest.fixture(autouse=True)
def _room(tmp_path: Path) -> None:
    """Without sparse handling these tests would write gigabytes: make sure there is room."""
    st = os.statvfs(tmp_path)
    if st.f_bavail * st.f_frsize < 4 * GIB:
        pytest.skip("less than 4 GiB free under the test directory")


def _many_regions(count: int) -> bytes:
    """A layer with one sparse file of ``count`` one-byte regions (GNU PAX 1.0), 512 bytes apart."""
    entries = [(i * 512, 1) for i in range(count)] + [(count * 512, 0)]
    sparse_map = b"%d\n" % len(entries) + b"".join(b"%d\n%d\n" % e for e in entries)
    sparse_map += bytes(-len(sparse_map) % 512)
    ti = tarfile.TarInfo("GNUSparseFile.0/many")
    ti.size = len(sparse_map) + count
    ti.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "many",
        "GNU.sparse.realsize": str(count * 512),
    }
    data = b"x" * count + bytes(-count % 512)
    return ti.tobuf(tarfile.PAX_FORMAT) + sparse_map + data + bytes(1024)


def test_a_map_too_long_for_tar2sqfs_is_expanded(tmp_path: Path) -> None:
    """tar2sqfs reads at most 65536 map entries: a file with more regions goes in full."""
    layout = tmp_path / "layout"
    write_oci_layout(layout, ImageSpec(layers=[_many_regions(65536)]))
    sif = tmp_path / "many.sif"
    run_cli("build", str(sif), f"oci:{layout}")
    tree = tmp_path / "tree"
    run_cli("build", "--sandbox", str(tree), str(sif))
    expected = bytearray(65536 * 512)
    expected[::512] = b"x" * 65536
    assert (tree / "many").read_bytes() == expected
