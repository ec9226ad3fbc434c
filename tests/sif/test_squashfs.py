"""squashfs creation and reading with the real tools (tar2sqfs, mksquashfs, unsquashfs, squashfuse)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from hpcsif.errors import SquashfsError
from hpcsif.image.layers import flatten
from hpcsif.sif.squashfs import squashfs_from_dir, squashfs_from_tar, superblock_ok, unsquash_to_dir
from tests.image.tarbuild import d, file, layer

SIF_OFFSET = 8192


@pytest.fixture
def image_layers(tmp_path: Path):
    return [layer(tmp_path, [d("etc"), file("etc/hello", "hello\n"), file("bin/run", "#!/bin/sh\n", 0o755)])]


def _info(image: Path) -> str:
    return subprocess.run(["unsquashfs", "-s", str(image)], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("compression", ["zstd", "gzip", "lz4", "xz"])
def test_from_tar_each_compression(tmp_path: Path, image_layers, compression: str):
    dest = tmp_path / "out.sqfs"
    assert (
        squashfs_from_tar(lambda f: flatten(image_layers, f), dest, compression=compression, jobs=2) == dest
    )
    assert superblock_ok(dest)
    info = _info(dest)
    assert f"Compression {compression}" in info
    if compression == "zstd":
        assert "compression-level 3" in info  # the default level
    out = tmp_path / "x"
    unsquash_to_dir(dest, out)
    assert (out / "etc/hello").read_text() == "hello\n"
    assert os.access(out / "bin/run", os.X_OK)


def test_from_tar_level(tmp_path: Path, image_layers):
    dest = tmp_path / "out.sqfs"
    squashfs_from_tar(lambda f: flatten(image_layers, f), dest, compression="gzip", level=1)
    assert "compression-level 1" in _info(dest)


@pytest.mark.parametrize(
    ("compression", "level", "match"),
    [("brotli", None, "unknown squashfs compression"), ("zstd", 30, "1..22"), ("lz4", 3, "takes no level")],
)
def test_bad_compression_options(tmp_path: Path, compression: str, level, match: str):
    with pytest.raises(SquashfsError, match=match):
        squashfs_from_tar(lambda f: None, tmp_path / "x.sqfs", compression=compression, level=level)


def test_writer_failure_leaves_nothing(tmp_path: Path):
    dest = tmp_path / "out.sqfs"

    def writer(pipe):
        pipe.write(b"\0" * 512)
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        squashfs_from_tar(writer, dest)
    assert list(tmp_path.iterdir()) == []


def test_tar2sqfs_failure_reports_stderr(tmp_path: Path):
    dest = tmp_path / "out.sqfs"
    dup = tarfile.TarInfo("same").tobuf() * 2  # the same name twice: tar2sqfs refuses

    with pytest.raises(SquashfsError, match=r"tar2sqfs failed with exit status \d+ .*same"):
        squashfs_from_tar(lambda f: f.write(dup + bytes(1024)), dest)
    assert list(tmp_path.iterdir()) == []


def test_fallback_without_tar2sqfs(tmp_path: Path, image_layers, monkeypatch: pytest.MonkeyPatch):
    """With tar2sqfs off PATH, the stream is unpacked in tmpdir and packed with mksquashfs."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("tar", "mksquashfs"):
        (bindir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bindir))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    dest = tmp_path / "out.sqfs"
    squashfs_from_tar(lambda f: flatten(image_layers, f), dest, tmpdir=scratch)
    assert superblock_ok(dest) and list(scratch.iterdir()) == []
    monkeypatch.undo()
    out = tmp_path / "x"
    unsquash_to_dir(dest, out)
    assert (out / "etc/hello").read_text() == "hello\n"


def test_from_dir_at_offset_and_back(tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub/file").write_text("payload")
    (src / "link").symlink_to("/sub/file")
    container = tmp_path / "container.bin"
    head = b"#!/usr/bin/env run-singularity\n".ljust(SIF_OFFSET, b"\xaa")
    container.write_bytes(head)
    squashfs_from_dir(src, container, offset=SIF_OFFSET, jobs=1)
    assert container.read_bytes()[:SIF_OFFSET] == head  # bytes before the offset untouched
    assert superblock_ok(container, SIF_OFFSET) and not superblock_ok(container)
    out = tmp_path / "out"
    unsquash_to_dir(container, out, offset=SIF_OFFSET)
    assert (out / "sub/file").read_text() == "payload"
    assert os.readlink(out / "link") == "/sub/file"


def test_from_dir_atomic(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    dest = tmp_path / "plain.sqfs"
    squashfs_from_dir(src, dest, compression="gzip")
    assert superblock_ok(dest) and "Compression gzip" in _info(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.sqfs", "src"]
    with pytest.raises(SquashfsError, match="not a directory"):
        squashfs_from_dir(tmp_path / "missing", dest)
    with pytest.raises(SquashfsError, match="no such file"):
        squashfs_from_dir(src, tmp_path / "nofile", offset=4096)


def test_superblock_rejects_garbage_and_truncation(tmp_path: Path, image_layers):
    dest = tmp_path / "ok.sqfs"
    squashfs_from_tar(lambda f: flatten(image_layers, f), dest)
    data = dest.read_bytes()
    cut = tmp_path / "cut.sqfs"
    cut.write_bytes(data[:200])
    junk = tmp_path / "junk"
    junk.write_bytes(b"hsqs" + bytes(200))
    assert superblock_ok(dest)
    assert not superblock_ok(cut) and not superblock_ok(junk) and not superblock_ok(tmp_path / "none")
    with pytest.raises(SquashfsError, match="no valid squashfs"):
        unsquash_to_dir(junk, tmp_path / "out")
    with pytest.raises(SquashfsError, match="already exists"):
        unsquash_to_dir(dest, tmp_path)


@pytest.mark.skipif(shutil.which("squashfuse") is None, reason="squashfuse not installed")
def test_squashfuse_mount_at_offset(tmp_path: Path, image_layers):
    """The partition reads back through squashfuse -o offset, as the engine mounts SIFs."""
    plain = tmp_path / "p.sqfs"
    squashfs_from_tar(lambda f: flatten(image_layers, f), plain)
    container = tmp_path / "c.bin"
    container.write_bytes(bytes(SIF_OFFSET) + plain.read_bytes())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["squashfuse", "-o", f"offset={SIF_OFFSET}", str(container), str(mnt)], check=True)
    try:
        for _ in range(50):
            if os.path.ismount(mnt):
                break
            time.sleep(0.05)
        assert (mnt / "etc/hello").read_text() == "hello\n"
        assert os.access(mnt / "bin/run", os.X_OK)
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], check=False)


def test_tar2sqfs_dying_mid_stream(tmp_path: Path):
    """tar2sqfs refuses a stream half-way; the writer's broken pipe becomes its error message."""
    dest = tmp_path / "out.sqfs"

    def writer(pipe):
        pipe.write(tarfile.TarInfo("same").tobuf() * 2)
        for _ in range(64):  # far more than the pipe holds
            pipe.write(bytes(1 << 20))

    with pytest.raises(SquashfsError, match="tar2sqfs failed"):
        squashfs_from_tar(writer, dest)
    assert list(tmp_path.iterdir()) == []
