"""Hostile and sloppy images that earlier campaigns did not try, through ``hpcsif build``.

Each case is compared with Apptainer 1.4 (``apptainer`` or ``peer-apptainer`` on PATH) where
it runs: what it builds hpcsif builds, what it refuses hpcsif refuses with one ``FATAL:``
line, no traceback and nothing left in the output directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hpcsif.image.compose import ImageSpec, layer_tar, write_oci_layout
from tests.convert.test_hostile_metadata import _put
from tests.image.tarbuild import MEDIA, blob, d, file, layer, link, sym, tar_bytes
from tests.image.test_hostile_cli import _PEAK_RSS, APPTAINER, _archive, _hpcsif_build, _raw_blob, _tree


def _peer_builds(work: Path, source: str) -> bool:
    """Whether Apptainer builds ``source`` (an ``oci-archive:`` or ``oci:`` argument)."""
    out = work / "peer.sif"
    p = subprocess.run([APPTAINER, "-s", "build", str(out), source], capture_output=True, timeout=120)
    out.unlink(missing_ok=True)
    return p.returncode == 0


def _refused(out_dir: Path, p: subprocess.CompletedProcess[str], message: str) -> None:
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    fatal = [line for line in p.stderr.splitlines() if line.startswith("FATAL:")]
    assert len(fatal) == 1 and message in fatal[0], p.stderr
    assert list(out_dir.iterdir()) == []


def _chain(count: int) -> list:
    """Directory d0, symlinks s1 -> d0 … s<count> -> s<count-1>, and a file written through them."""
    links = [sym(f"s{i}", f"s{i - 1}" if i > 1 else "d0") for i in range(1, count + 1)]
    return [d("d0"), *links, file(f"s{count}/x", "y")]


def test_symlink_chains_are_followed_as_far_as_apptainer_follows_them(tmp_path: Path) -> None:
    """Apptainer (filepath-securejoin) follows 255 symlinks to place an entry; hpcsif stopped at 40."""
    for count, builds in ((255, True), (256, False)):
        work = tmp_path / str(count)
        (work / "out").mkdir(parents=True)
        archive = _archive(work, [layer(work, _chain(count))])
        p = _hpcsif_build(work / "out" / "x.sif", archive)
        if builds:
            assert p.returncode == 0, p.stderr
            assert _tree(work / "out" / "x.sif")["/d0/x"] == "-rw-r--r-- 1"
        else:
            _refused(work / "out", p, f"'s{count}/x': too many levels of symbolic links")
        if APPTAINER:
            assert _peer_builds(work, f"oci-archive:{archive}") == builds


def _bad_checksum() -> bytes:
    """Two members; the second header's checksum is off by one bit."""
    raw = bytearray(tar_bytes([file("a", "A"), file("b", "B")], tarfile.USTAR_FORMAT))
    raw[2 * tarfile.BLOCKSIZE + 149] ^= 1
    return bytes(raw)


def _nul_in_pax_path() -> bytes:
    member = tarfile.TarInfo("innocent")
    member.pax_headers = {"path": "etc/passwd\0.txt"}
    return tar_bytes([member])


DAMAGED = {
    # tarfile took the bad header for the end of the layer and dropped "b" without a word
    "bad-checksum": (_bad_checksum, "invalid tar header at offset 1024: bad checksum"),
    # tarfile cut the name at the NUL: another file than the one named
    "nul-in-pax-path": (_nul_in_pax_path, "the PAX path record at offset 0 holds a NUL byte"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_tar_headers_fail_the_layer(tmp_path: Path, case: str) -> None:
    """Go's archive/tar (Apptainer) refuses these headers; so does hpcsif, in one line."""
    content, message = DAMAGED[case]
    archive = _archive(tmp_path, [blob(tmp_path, content())])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _refused(out_dir, _hpcsif_build(out_dir / "x.sif", archive), message)
    if APPTAINER:
        assert not _peer_builds(tmp_path, f"oci-archive:{archive}")


def test_image_without_layers_is_refused(tmp_path: Path) -> None:
    """A manifest with no layers (a config alone) has no root file system: Apptainer refuses it
    ("no extractable OCI/Docker tar layers"); hpcsif built an empty image."""
    layout = tmp_path / "layout"
    write_oci_layout(layout, ImageSpec(layers=[layer_tar([])]))
    index = json.loads((layout / "index.json").read_text())
    entry = index["manifests"][0]
    manifest = json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_bytes())
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    config["rootfs"]["diff_ids"], manifest["layers"] = [], []
    manifest["config"]["digest"], manifest["config"]["size"] = _put(layout, json.dumps(config).encode())
    entry["digest"], entry["size"] = _put(layout, json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps(index))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = ["hpcsif", "build", str(out_dir / "x.sif"), f"oci:{layout}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    _refused(out_dir, p, f"image oci://{layout} has no layers")
    if APPTAINER:
        assert not _peer_builds(tmp_path, f"oci:{layout}")


def _docker_save(work: Path, *, link: bytes, big: bool, gzipped: bool) -> Path:
    """A legacy ``docker save`` archive whose third layer repeats the first as a ``link`` member
    (a symlink ``../aaa/layer.tar`` or a hard link), as Docker before 25 writes it."""
    first = tar_bytes([file("hello", bytes(5 << 20) if big else b"hi")])  # big: left in place
    second = tar_bytes([file("second", "2")])
    diff_ids = [_put_digest(first), _put_digest(second), _put_digest(first)]
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    layers = ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"]
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["x:1"], "Layers": layers}]).encode()
    archive = work / "saved.tar"
    with tarfile.open(archive, "w:gz" if gzipped else "w") as tar:
        for name, data in (("config.json", config), ("aaa/layer.tar", first), ("bbb/layer.tar", second)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("ccc/layer.tar")
        info.type = link
        info.linkname = "../aaa/layer.tar" if link == tarfile.SYMTYPE else "aaa/layer.tar"
        tar.addfile(info)
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return archive


def _put_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "link,big,gzipped",
    [(tarfile.SYMTYPE, True, False), (tarfile.LNKTYPE, False, False), (tarfile.SYMTYPE, False, True)],
    ids=["symlink-in-place", "hardlink", "symlink-gzip"],
)
def test_docker_save_layer_linked_to_its_first_copy(
    tmp_path: Path, link: bytes, big: bool, gzipped: bool
) -> None:
    """Layers that are links to another member of the archive were "missing"; Apptainer
    (containers/image) follows them."""
    archive = _docker_save(tmp_path, link=link, big=big, gzipped=gzipped)
    out = tmp_path / "x.sif"
    p = subprocess.run(
        ["hpcsif", "build", str(out), f"docker-archive:{archive}"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    tree = _tree(out)
    assert tree["/hello"] == f"-rw-r--r-- {5 << 20 if big else 2}" and tree["/second"] == "-rw-r--r-- 1"
    if APPTAINER and not gzipped:  # Apptainer 1.4.5 reads no compressed docker-archive at all
        assert _peer_builds(tmp_path, f"docker-archive:{archive}")


def test_too_many_hard_links_name_the_first_failure(tmp_path: Path) -> None:
    """66,000 hard links to one file in one directory: the wide directory is unpacked with tar,
    which refuses links past the file system's limit (Apptainer fails too: "link: too many
    links"). The FATAL line was the last 2000 characters of tar's repeated complaints."""
    entries = [file("t", "T"), *(link(f"h{i}", "t") for i in range(66_000))]
    archive = _archive(tmp_path, [layer(tmp_path, entries)])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = _hpcsif_build(out_dir / "x.sif", archive)
    if p.returncode == 0:
        pytest.skip(f"the file system of {tmp_path} takes 66,000 links to one file")
    _refused(out_dir, p, "FATAL:   unpacking the root filesystem failed: tar: h")
    assert re.search(r"FATAL: .*: tar: h\d+: Cannot hard link to .t.: Too many links\n$", p.stderr), p.stderr


@pytest.mark.parametrize("blob_kind", ["fifo-layer", "directory-config"])
def test_layout_blob_that_is_no_regular_file(tmp_path: Path, blob_kind: str) -> None:
    """A FIFO as a layer blob hung the build for ever (as it hangs Apptainer's); a directory as
    the config said "FATAL:   4: Is a directory". Both are one line naming the blob."""
    layout = tmp_path / "layout"
    write_oci_layout(layout, ImageSpec(layers=[layer_tar([])]))
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    desc = manifest["layers"][0] if blob_kind == "fifo-layer" else manifest["config"]
    path = layout / "blobs/sha256" / desc["digest"][7:]
    path.unlink()
    if blob_kind == "fifo-layer":
        os.mkfifo(path)
    else:
        path.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = ["hpcsif", "build", str(out_dir / "x.sif"), f"oci:{layout}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    name = f"blob {path}" if blob_kind == "fifo-layer" else f"blob {desc['digest']}"
    _refused(out_dir, p, f"{name} is not a regular file")


def _sparse_layer(size: int) -> bytes:
    """A layer of one GNU PAX 1.0 sparse file of ``size`` bytes storing its last byte only."""
    sparse_map = b"1\n%d\n1\n" % (size - 1)
    data = sparse_map + bytes(tarfile.BLOCKSIZE - len(sparse_map)) + b"x"
    member = tarfile.TarInfo("GNUSparseFile.0/huge")
    member.size = len(data)
    member.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "huge",
        "GNU.sparse.realsize": str(size),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def test_sparse_file_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """A 300-byte layer holding a 300 GiB sparse file kept tar2sqfs busy reading zeros (a 1 TiB
    one for 4 minutes, and then it crashed); Apptainer fills the disk with them. Holes over
    256 GiB in all are refused before packing starts."""
    archive = _archive(tmp_path, [blob(tmp_path, _sparse_layer(300 << 30))])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = _hpcsif_build(out_dir / "x.sif", archive)
    _refused(out_dir, p, f"sparse file 'huge' of {300 << 30} bytes takes the holes of the image's")


def test_bzip2_bomb_is_refused(tmp_path: Path) -> None:
    """bzip2 (which Apptainer does not read in layers) expands zeros over a million times:
    a 1 MiB layer would have kept the build decoding 1.3 TiB for an hour. Past 32768 times
    (what zstd reaches) it is refused; a 256 MiB file from 200 bytes is one line, at once."""
    raw = tar_bytes([file("zeros", bytes(256 << 20))])
    archive = _archive(tmp_path, [blob(tmp_path, raw, "bz2")])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _refused(out_dir, _hpcsif_build(out_dir / "x.sif", archive), "the bzip2 stream expands over 32768 times")


def test_hard_links_into_the_aufs_link_store(tmp_path: Path) -> None:
    """Layers from AUFS hosts keep hard-linked files in ``.wh..wh.plnk`` and may link to them:
    hpcsif skipped what lay in AUFS directories and refused the links ("points at missing
    file"). Apptainer keeps it; the AUFS entries themselves still go."""
    entries = [d(".wh..wh.plnk"), file(".wh..wh.plnk/1.2", "plinked"), link("x", ".wh..wh.plnk/1.2")]
    entries += [file(".wh..wh.aufs"), d(".wh..wh.orph"), file(".wh..wh.orph/o", "o")]
    archive = _archive(tmp_path, [layer(tmp_path, entries)])
    out = tmp_path / "x.sif"
    p = _hpcsif_build(out, archive)
    assert p.returncode == 0, p.stderr
    tree = _tree(out)
    assert tree["/x"] == tree["/.wh..wh.plnk/1.2"] == "-rw-r--r-- 7" and "/.wh..wh.aufs" not in tree
    assert tree["/.wh..wh.orph/o"] == "-rw-r--r-- 1" and tree["/.wh..wh.plnk"].startswith("d")
    if APPTAINER:
        theirs = tmp_path / "theirs.sif"
        subprocess.run(
            [APPTAINER, "-s", "build", str(theirs), f"oci-archive:{archive}"], check=True, timeout=120
        )
        implied = {p: "d" if v[0] == "d" else v for p, v in tree.items()}  # hpcsif: 0755, Apptainer: 0775
        assert implied == {p: "d" if v[0] == "d" else v for p, v in _tree(theirs).items()}


def test_sandbox_file_too_large_for_the_file_system(tmp_path: Path) -> None:
    """A 20 TiB sparse file (ext4 holds 16 TiB) in a sandbox failed as "FATAL:   Invalid argument";
    the line now names the layer and the file, and the sandbox is gone."""
    archive = _archive(tmp_path, [blob(tmp_path, _sparse_layer(20 << 40))])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = ["hpcsif", "build", "--sandbox", str(out_dir / "sb"), f"oci-archive:{archive}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode == 0:
        pytest.skip(f"the file system of {tmp_path} holds a 20 TiB file")
    _refused(out_dir, p, ": cannot write /huge in the sandbox: ")
    assert "FATAL:   layer sha256:" in p.stderr


@pytest.mark.parametrize("gzipped", [False, True])
def test_oci_archive_with_absolute_member_names(tmp_path: Path, gzipped: bool) -> None:
    """``tar -P`` keeps the leading ``/`` (``/index.json``, ``/blobs/sha256/…``): Apptainer reads
    such an archive; hpcsif said "archive has no index.json"."""
    plain = _archive(tmp_path, [layer(tmp_path, [file("x", "1")])])
    archive = tmp_path / "absolute.tar"
    with tarfile.open(plain) as src, tarfile.open(archive, "w:gz" if gzipped else "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member) if member.isfile() else None
            member.name = "/" + member.name
            dst.addfile(member, data)
    out = tmp_path / "x.sif"
    p = _hpcsif_build(out, archive)
    assert p.returncode == 0, p.stderr
    assert _tree(out)["/x"] == "-rw-r--r-- 1"
    if APPTAINER and not gzipped:
        assert _peer_builds(tmp_path, f"oci-archive:{archive}")


def test_paths_past_path_max_are_refused(tmp_path: Path) -> None:
    """A 4096-byte path: no system call takes it, Apptainer fails on it, and a 20,000-deep one
    took hpcsif 800 MiB (the merge kept each of its parents' paths)."""
    name = "a/" * 2047 + "fg"  # 4096 bytes; 4095 pass
    archive = _archive(tmp_path, [layer(tmp_path, [file(name[1:], "ok"), file(name, "x")])])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = _hpcsif_build(out_dir / "x.sif", archive)
    _refused(out_dir, p, "has a path of 4096 bytes or more")
    if APPTAINER:
        assert not _peer_builds(tmp_path, f"oci-archive:{archive}")


def test_deeply_nested_directories_take_bounded_memory(tmp_path: Path) -> None:
    """200 entries 4000 bytes deep (a few KiB of layer) imply 400,000 directories with 800 MiB
    of paths, which the merge kept (100 such entries: 840 MiB of memory, 18 s); past 256 MiB
    of directory paths the build stops, in under 400 MiB."""
    deep = "/".join(["a"] * 1990)
    archive = _archive(tmp_path, [layer(tmp_path, [file(f"b{i}/{deep}/f", "x") for i in range(200)])])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [sys.executable, "-c", _PEAK_RSS, "hpcsif", "build", str(out_dir / "x.sif")]
    cmd.append(f"oci-archive:{archive}")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    _refused(out_dir, p, "the image's directory paths add up to over 256 MiB")
    assert int(p.stdout.split()[-1]) < 400_000  # KiB


def test_a_million_skippable_zstd_frames_are_skipped_quickly(tmp_path: Path) -> None:
    """8 MB of empty skippable frames between two zstd frames: each got a decoder of its own and
    a copy of the buffered input, 20 s (Apptainer: 0.4 s); now about a second."""
    import struct
    import time

    import zstandard

    raw = tar_bytes([file("a", "A" * 600)])
    frames = [zstandard.ZstdCompressor().compress(part) for part in (raw[:1024], raw[1024:])]
    data = frames[0] + struct.pack("<II", 0x184D2A50, 0) * 1_000_000 + frames[1]
    archive = _archive(tmp_path, [_raw_blob(tmp_path, data, raw, MEDIA["zstd"])])
    start = time.monotonic()
    p = _hpcsif_build(tmp_path / "x.sif", archive)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - start < 10
    assert _tree(tmp_path / "x.sif")["/a"] == "-rw-r--r-- 600"
