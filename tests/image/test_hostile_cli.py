"""Hostile layer content through ``hpcsif build``, as a user types it, against Apptainer 1.4.

Where Apptainer (``apptainer`` or ``peer-apptainer`` on PATH) builds a safe image from a
hostile layer, hpcsif builds one with the same files; where hpcsif refuses, it exits
non-zero with one ``FATAL:`` line, no traceback and no output file. Images are OCI
archives under pytest's tmp_path (in /tmp, which the peer sees at the same path).
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hpcsif.image.layers import LayerBlob
from hpcsif.sif.reader import SIFImage
from tests.image.tarbuild import (
    MEDIA,
    blob,
    compress,
    d,
    file,
    layer,
    link,
    oci_layout,
    opaque,
    sym,
    tar_bytes,
    whiteout,
)

APPTAINER = shutil.which("apptainer") or shutil.which("peer-apptainer")
# Apptainer rewrites its cache's index.json unlocked (builds running side by side corrupt it),
# and every build adds to it: the test images need no cache
PEER_NO_CACHE = ("--disable-cache",)
# what Apptainer adds that hpcsif does not (and the metadata both add)
_NOT_COMPARED = re.compile(r"^/(\.singularity\.d|etc/hosts$|etc/resolv\.conf$)")


@pytest.fixture
def inflater() -> str:
    """Overrides the conftest's two inflaters: the CLI chooses its own in its own process."""
    return "cli"


def _archive(work: Path, layers: list[LayerBlob]) -> Path:
    """An oci-archive of ``layers`` with no ``./`` prefixes (Apptainer needs that)."""
    layout = oci_layout(work / "layout", layers)
    out = work / "image.oci-archive.tar"
    with tarfile.open(out, "w") as tar:
        for p in sorted(layout.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    return out


def _raw_blob(work: Path, data: bytes, raw: bytes | str, media_type: str) -> LayerBlob:
    """A layer blob of exactly ``data`` whose decompressed content is ``raw`` (or has that digest)."""
    path = work / hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    diff_id = raw if isinstance(raw, str) else "sha256:" + hashlib.sha256(raw).hexdigest()
    return LayerBlob(path, media_type, "sha256:" + path.name, diff_id)


def _hpcsif_build(sif: Path, archive: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["hpcsif", "build", str(sif), f"oci-archive:{archive}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _tree(sif: Path) -> dict[str, str]:
    """Path -> "mode size/target" of the SIF's root file system, read by unsquashfs."""
    with SIFImage.open(sif) as img:
        offset = img.primary_partition().offset
    cmd = ["unsquashfs", "-o", str(offset), "-lln", "-d", "", str(sif)]
    listing = subprocess.run(cmd, capture_output=True, text=True, check=True, errors="replace").stdout
    tree = {}
    for line in listing.splitlines():
        m = re.match(r"([-dlcbps][-rwxsStT]{9}) \S+\s+(\S+(?:,\s*\d+)?) \S+ \S+ (/.*)", line)
        if m and not _NOT_COMPARED.match(m[3]):
            path, _, target = m[3].partition(" -> ")
            size = "" if m[1][0] == "d" else m[2]  # directory sizes depend on the metadata files
            tree[path] = f"{m[1]} {target or size}"
    return tree


def _build_and_compare(tmp_path: Path, layers: list[LayerBlob], *, implied: bool = False) -> dict[str, str]:
    """Build with hpcsif (must succeed), compare with Apptainer's image where it runs.

    ``implied``: the layers imply directories, which hpcsif makes 0755 (Apptainer: 0775).
    """
    archive = _archive(tmp_path, layers)
    ours = tmp_path / "ours.sif"
    p = _hpcsif_build(ours, archive)
    assert p.returncode == 0, p.stderr
    tree = _tree(ours)
    if APPTAINER:
        theirs = tmp_path / "theirs.sif"
        subprocess.run(
            [APPTAINER, "-s", "build", *PEER_NO_CACHE, str(theirs), f"oci-archive:{archive}"],
            check=True,
            timeout=120,
        )

        def loose(t: dict[str, str]) -> dict[str, str]:
            # hpcsif drops device nodes (and hard links to them) on purpose
            return {p: "d" if implied and v[0] == "d" else v for p, v in t.items() if v[0] not in "cb"}

        assert loose(tree) == loose(_tree(theirs))
    return tree


def test_dotdot_names_links_and_whiteouts_stay_in_the_root(tmp_path: Path) -> None:
    lower = layer(tmp_path, [file("ok", "fine"), file("gone", "old")])
    upper = layer(
        tmp_path,
        [file("../escape", "evil"), file("a/../../b", "bee"), link("h", "../../ok"), file("../.wh.gone")],
    )
    tree = _build_and_compare(tmp_path, [lower, upper])
    assert tree["/escape"] == "-rw-r--r-- 4" and tree["/b"] == "-rw-r--r-- 3" and tree["/h"] == "-rw-r--r-- 4"
    assert "/gone" not in tree and "/a" not in tree
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "escape").exists()


def test_writes_through_symlinks_stay_in_the_root(tmp_path: Path) -> None:
    """Entries below a symlink of their own layer or a lower one go where it points, in the root."""
    entries = [d("data"), sym("evil", "/data"), file("evil/pwned", "x"), sym("rel", "../../../data")]
    entries += [file("rel/p2", "yy"), sym("out", str(tmp_path)), file("out/p3", "z"), sym("up", "../..")]
    upper = layer(tmp_path, [file("up/p4", "4444"), file("out/p5", "55555")], "zstd")
    tree = _build_and_compare(tmp_path, [layer(tmp_path, entries), upper], implied=True)
    assert tree["/data/pwned"] == "-rw-r--r-- 1" and tree["/data/p2"] == "-rw-r--r-- 2"
    assert tree["/evil"] == "lrwxrwxrwx /data" and tree[f"{tmp_path}/p3"] == "-rw-r--r-- 1"
    assert tree["/p4"] == "-rw-r--r-- 4" and tree[f"{tmp_path}/p5"] == "-rw-r--r-- 5"
    assert not {"p3", "p4", "p5"} & {p.name for p in tmp_path.iterdir()}


def test_hard_links_through_symlinks_resolve_in_the_root(tmp_path: Path) -> None:
    """A hard link's target path may pass through symlinks, of its own layer or a lower one."""
    lower = layer(tmp_path, [d("real"), file("real/t", "T"), sym("via", "real"), sym("abs", "/real")])
    upper = layer(
        tmp_path, [link("h1", "via/t"), d("own"), file("own/u", "UU"), sym("o", "own"), link("h2", "o/u")]
    )
    top = layer(tmp_path, [link("h3", "abs/t")], "zstd")
    tree = _build_and_compare(tmp_path, [lower, upper, top])
    assert tree["/h1"] == tree["/h3"] == "-rw-r--r-- 1" and tree["/h2"] == "-rw-r--r-- 2"


def _device(name: str, kind: bytes = tarfile.CHRTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.devmajor, ti.devminor = kind, 1, 3
    return ti


def test_devices_and_hard_links_to_them_are_dropped(tmp_path: Path) -> None:
    """Dropped devices still hide the lower layers' files at their paths."""
    lower = layer(tmp_path, [file("n", "file"), file("m", "m"), _device("d0"), file("keep", "k")])
    middle = layer(
        tmp_path, [_device("n"), link("h", "m"), link("hd", "d0"), _device("dd"), link("hdd", "dd")]
    )
    top = layer(tmp_path, [_device("m", tarfile.BLKTYPE)])
    tree = _build_and_compare(tmp_path, [lower, middle, top])
    assert tree["/h"] == "-rw-r--r-- 1" and tree["/keep"] == "-rw-r--r-- 1"
    assert not {"/n", "/m", "/d0", "/hd", "/dd", "/hdd"} & set(tree)


def test_empty_layer_blobs_are_empty_layers(tmp_path: Path) -> None:
    zero_bytes = _raw_blob(tmp_path, b"", b"", MEDIA["gzip"])  # some registries serve such layers
    layers = [zero_bytes, blob(tmp_path, b"", "gzip"), layer(tmp_path, [file("x", "1")])]
    assert _build_and_compare(tmp_path, layers)["/x"] == "-rw-r--r-- 1"


def test_bytes_after_the_compressed_stream_end_it(tmp_path: Path) -> None:
    """Zero padding or junk after the last gzip member or zstd frame is ignored, as Apptainer
    (which stops at the tar end) and ``gzip -d`` do."""
    raws = [tar_bytes([file(name, name * 2)]) for name in "abcd"]
    layers = [
        _raw_blob(tmp_path, compress(raws[0], "gzip") + bytes(1000), raws[0], MEDIA["gzip"]),
        _raw_blob(tmp_path, compress(raws[1], "gzip") + b"junk" * 100, raws[1], MEDIA["gzip"]),
        _raw_blob(tmp_path, compress(raws[2], "zstd") + bytes(3), raws[2], MEDIA["zstd"]),
        _raw_blob(tmp_path, compress(raws[3], "zstd") + b"junk" * 100, raws[3], MEDIA["zstd"]),
    ]
    tree = _build_and_compare(tmp_path, layers)
    assert all(tree[f"/{name}"] == "-rw-r--r-- 2" for name in "abcd")


def test_opaque_root_keeps_the_base_directories(tmp_path: Path) -> None:
    lower = layer(tmp_path, [file("keep"), d("proc"), file("tmp/t")])
    upper = layer(tmp_path, [opaque(""), whiteout("dev"), file("x", "1")], "zstd")
    tree = _build_and_compare(tmp_path, [lower, upper])
    assert "/keep" not in tree and "/tmp/t" not in tree
    assert all(tree[p].startswith("d") for p in ("/dev", "/proc", "/sys", "/tmp", "/var/tmp", "/etc"))


def test_directory_with_children_replaced_in_its_layer(tmp_path: Path) -> None:
    """Tar extraction replaces a directory (and what it held) by a later file or symlink."""
    entries = [d("n"), file("n/c", "ccc"), file("n", "file"), d("m"), file("m/c", "c"), sym("m", "/etc")]
    entries += [d("k"), file("k/old", "o"), file("k", "f"), d("k"), file("k/new", "n")]
    tree = _build_and_compare(tmp_path, [layer(tmp_path, entries)])
    assert (
        tree["/n"] == "-rw-r--r-- 4" and tree["/m"] == "lrwxrwxrwx /etc" and tree["/k/new"] == "-rw-r--r-- 1"
    )
    assert not {"/n/c", "/m/c", "/k/old"} & set(tree)


def test_directory_replaced_by_a_non_directory_and_back_loses_its_children(tmp_path: Path) -> None:
    """A layer's symlink or file where a lower layer had a directory removes what it held; a
    later directory there starts empty (as layers extracted one after the other)."""
    lower = layer(
        tmp_path, [d("a"), file("a/f", "1"), d("b"), file("b/g", "2"), d("c"), file("c/sub/x", "3")]
    )
    middle = layer(tmp_path, [sym("a", "b"), file("c", "file")])
    upper = layer(tmp_path, [d("a"), file("a/h", "44"), d("c"), file("c/y", "5")], "zstd")
    tree = _build_and_compare(tmp_path, [lower, middle, upper])
    assert (
        tree["/a/h"] == "-rw-r--r-- 2" and tree["/b/g"] == "-rw-r--r-- 1" and tree["/c/y"] == "-rw-r--r-- 1"
    )
    assert not {"/a/f", "/a/g", "/c/sub", "/c/sub/x"} & set(tree)


def test_hard_link_to_a_lower_file_its_own_layer_replaces_later(tmp_path: Path) -> None:
    """A hard link names the file as it is when the link is made: a later entry of its own
    layer at the target's path is a new file, and the link keeps the lower one's content."""
    lower = layer(tmp_path, [file("t", "T"), file("u", "U0")])
    upper = layer(tmp_path, [link("l", "t"), file("t", "NEW"), link("m", "u"), link("u", "t")])
    tree = _build_and_compare(tmp_path, [lower, upper])
    assert tree["/l"] == "-rw-r--r-- 1" and tree["/t"] == "-rw-r--r-- 3"
    assert tree["/m"] == "-rw-r--r-- 2" and tree["/u"] == "-rw-r--r-- 3"


def _pax(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.pax_headers = {"comment": "A" * size}
    return ti


def _pax_chain(count: int) -> bytes:
    """``count`` extended headers in a row, then a file."""
    header = tarfile.TarInfo("@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 512
    record = b"512 comment=" + b"x" * 499 + b"\n"
    return (header.tobuf(tarfile.USTAR_FORMAT) + record) * count + tar_bytes(
        [file("x")], tarfile.USTAR_FORMAT
    )


REFUSED = {
    "pax-header-2MiB": ([_pax("p", 2 << 20), file("x")], "extended header of 2097"),
    "name-component-300": ([file("d/" + "x" * 300)], "longer than 255 bytes"),
    "whiteout-of-parent": ([file("a/.wh..."), file("x")], "invalid whiteout"),
    "pax-header-chain": (_pax_chain(2000), "too many extended tar headers in a row"),
    "symlink-loop": ([sym("a", "b"), sym("b", "a"), file("a/x")], "too many levels of symbolic links"),
    # no symlink(2) makes it (Apptainer fails); the SIF made an I/O error of every start
    "symlink-target-4096": (
        [sym("ok", "z" * 4095), sym("s", "z" * 4096)],
        "'s' has a target over 4095 bytes",
    ),
    "hardlink-missing": ([file("a"), link("b", "missing")], "points at missing file"),
    "hardlink-directory": ([d("dd"), link("h", "dd")], "points at directory"),
    "not-a-tar": (b"hello, not a tar archive\n" * 100, "not a valid tar archive"),
    "truncated-gzip": ([file("x", random.Random(0).randbytes(100_000))], "truncated"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hostile_layer_is_refused_with_one_fatal_line(tmp_path: Path, case: str) -> None:
    """Apptainer fails on these too, except ``a/.wh...``, where it empties the whole image."""
    content, message = REFUSED[case]
    raw = content if isinstance(content, bytes) else tar_bytes(content)
    lay = blob(tmp_path, raw)
    if case == "truncated-gzip":  # the blob is cut short, its digest is that of the cut bytes
        data = lay.path.read_bytes()
        data = data[: len(data) // 2]
        lay = _raw_blob(tmp_path, data, lay.diff_id, MEDIA["gzip"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    archive = _archive(tmp_path, [lay])
    p = _hpcsif_build(out_dir / "x.sif", archive)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    fatal = [ln for ln in p.stderr.splitlines() if ln.startswith("FATAL:")]
    assert len(fatal) == 1 and message in fatal[0], p.stderr
    assert list(out_dir.iterdir()) == []


def _bomb(work: Path, size: int) -> LayerBlob:
    """A gzip layer of one ``size``-byte file of zeros: about 1000 times smaller compressed."""
    import zlib

    head = tarfile.TarInfo("zeros")
    head.size = size
    raw_head = head.tobuf(tarfile.PAX_FORMAT)
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    diff = hashlib.sha256(raw_head)
    parts = [comp.compress(raw_head)]
    zeros = bytes(1 << 24)
    for _ in range(size // len(zeros)):
        parts.append(comp.compress(zeros))
        diff.update(zeros)
    end = bytes(2 * tarfile.BLOCKSIZE)
    parts += [comp.compress(end), comp.flush()]
    diff.update(end)
    data = b"".join(parts)
    return _raw_blob(work, data, "sha256:" + diff.hexdigest(), MEDIA["gzip"])


# runs argv[1:] and prints the peak RSS (KiB) of it and its children
_PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def test_decompression_bombs_take_bounded_memory_and_disk(tmp_path: Path) -> None:
    """A 512 MiB file from 0.5 MiB of gzip converts in little memory into a small image (squashfs
    stores zero blocks sparse); zstd windows over 128 MiB and xz dictionaries over 256 MiB,
    which the decoder would have to allocate, are refused at once."""
    import lzma

    import zstandard

    archive = _archive(tmp_path, [_bomb(tmp_path, 1 << 29)])
    sif = tmp_path / "bomb.sif"
    # the peak memory of the build alone (this process's other children do not count)
    cmd = [sys.executable, "-c", _PEAK_RSS, "hpcsif", "build", str(sif), f"oci-archive:{archive}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout.split()[-1]) < 300_000  # KiB
    assert sif.stat().st_size < 4 << 20 and _tree(sif)["/zeros"] == f"-rw-r--r-- {1 << 29}"

    raw = tar_bytes([file("x", "1")])
    params = zstandard.ZstdCompressionParameters(window_log=31)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown: 2 GiB window
    zstd_big = stream.compress(raw) + stream.flush()
    xz_big = lzma.compress(raw, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 30}])
    for data, message in ((zstd_big, "too much memory"), (xz_big, "needs more than 256 MiB")):
        work = tmp_path / message.split()[0]
        work.mkdir()
        lay = _raw_blob(work, data, raw, MEDIA["zstd"])
        p = _hpcsif_build(work / "x.sif", _archive(work, [lay]))
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr
        assert not (work / "x.sif").exists()
