"""Hostile layers, round 11: tar-level oddities through ``hpcsif build``, against Apptainer.

A seeded fuzzer of PAX/GNU headers, sparse files, odd names and modes, compression variants
and archive transports found these: GNU sparse PAX records that tarfile reads otherwise than
Go's archive/tar (an empty map was an internal error), the directory that Apptainer's
extraction (umoci) makes in place of a file, which takes that file's owner and mode, and PAX
times with a fraction, which tarfile's float rounded up a second.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from hpcsif.sif.reader import SIFImage
from tests.image.tarbuild import E, blob, d, file, layer, sha, tar_bytes, whiteout
from tests.image.test_hostile_cli import (
    _NOT_COMPARED,
    APPTAINER,
    PEER_NO_CACHE,
    _archive,
    _build_and_compare,
    _hpcsif_build,
)
from tests.image.test_hostile_round9 import _both_refuse, inflater  # noqa: F401 (fixture: the CLI's own)


def _pax(name: str, records: dict[str, str], data: bytes = b"") -> tuple[tarfile.TarInfo, bytes]:
    """A regular member ``name`` holding ``data``, with the extended header ``records``."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    info.pax_headers = records
    return info, data


def _sparse_10(name: str, regions: str, realsize: int, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    """A GNU PAX 1.0 sparse member: the map ``regions`` ("count\\noffset\\nlength\\n…") starts
    its data, then the stored ``data``."""
    stored = regions.encode().ljust(512, b"\0") + data
    records = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize),
    }
    return _pax(f"GNUSparseFile.0/{name}", records, stored)


# GNU sparse records as Go's archive/tar reads them: (member, the path it gives, mode and size)
SPARSE_READ = {
    # an empty map of format 0.1: a file all holes (tarfile failed: 'invalid literal for int()')
    "empty-map": (
        _pax(
            "GNUSparseFile.0/a",
            {
                "GNU.sparse.major": "0",
                "GNU.sparse.minor": "1",
                "GNU.sparse.numblocks": "0",
                "GNU.sparse.map": "",
                "GNU.sparse.size": "100",
                "GNU.sparse.name": "a",
            },
        ),
        "/a",
        "-rw-r--r-- 100",
    ),
    # no version and an empty map: Go takes it for no sparse file at all
    "empty-map-no-version": (
        _pax("GNUSparseFile.0/a", {"GNU.sparse.map": "", "GNU.sparse.size": "100", "GNU.sparse.name": "a"}),
        "/GNUSparseFile.0/a",
        "-rw-r--r-- 0",
    ),
    # a version Go does not know: neither (tarfile read the map, name and size)
    "unknown-version": (
        _pax(
            "GNUSparseFile.0/q",
            {
                "GNU.sparse.major": "1",
                "GNU.sparse.minor": "1",
                "GNU.sparse.map": "1,2",
                "GNU.sparse.name": "q",
            },
            b"abc",
        ),
        "/GNUSparseFile.0/q",
        "-rw-r--r-- 3",
    ),
}


@pytest.mark.parametrize("case", sorted(SPARSE_READ))
def test_gnu_sparse_records_are_read_as_apptainer_reads_them(tmp_path: Path, case: str) -> None:
    member, path, expected = SPARSE_READ[case]
    tree = _build_and_compare(tmp_path, [layer(tmp_path, [member, file("k", "k")])], implied=True)
    assert tree[path] == expected


def _records_00(*pairs: tuple[str, str]) -> tarfile.TarInfo:
    """A format 0.0 sparse member ``q`` of 300 bytes that stores 5: records in ``pairs`` order
    (tarfile keeps one value per key in a dict: the header is written by hand)."""
    body = b""
    for key, value in [("GNU.sparse.size", "300"), ("GNU.sparse.numblocks", "2"), *pairs]:
        record = f" {key}={value}\n".encode()
        body += b"%d" % (len(record) + 2) + record  # all records here are 10 to 99 bytes
    head = tarfile.TarInfo("PaxHeaders/q")
    head.type, head.size = tarfile.XHDTYPE, len(body)
    member = tarfile.TarInfo("GNUSparseFile.0/q")
    member.size = 5
    return head.tobuf(tarfile.USTAR_FORMAT) + body.ljust(512, b"\0") + member.tobuf(tarfile.USTAR_FORMAT)


SPARSE_REFUSED = {
    "regions-out-of-order": (
        [_sparse_10("a", "2\n10\n5\n12\n5\n", 100, b"x" * 10)],
        "is out of order or too long",
        "invalid tar header",
    ),
    "map-covers-more-than-stored": (
        [_sparse_10("a", "1\n0\n9\n", 100, b"x" * 3)],
        "its map covers another number",
        "sparse file references non-existent data",
    ),
    "count-no-number": (
        [_pax("q", {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.numblocks": " 1"})],
        "has a region count that is no number",
        "invalid tar header",
    ),
}


@pytest.mark.parametrize("case", sorted(SPARSE_REFUSED))
def test_malformed_gnu_sparse_maps_fail_the_layer(tmp_path: Path, case: str) -> None:
    """tarfile expanded such maps as best it could (an out-of-order one overwrote its own data)."""
    entries, ours, theirs = SPARSE_REFUSED[case]
    _both_refuse(tmp_path, _archive(tmp_path, [layer(tmp_path, entries)]), [ours], theirs)


def test_gnu_sparse_00_pairs_are_read_in_order_or_refused(tmp_path: Path) -> None:
    """Format 0.0 repeats ``offset`` and ``numbytes`` records: tarfile read them from the raw
    header with a regular expression, in any order."""
    good = _records_00(
        ("GNU.sparse.offset", "0"),
        ("GNU.sparse.numbytes", "3"),
        ("GNU.sparse.offset", "100"),
        ("GNU.sparse.numbytes", "2"),
    )
    raw = good + b"abcde".ljust(512, b"\0") + bytes(1024)
    tree = _build_and_compare(tmp_path / "good", [blob(_mk(tmp_path / "good"), raw)], implied=True)
    assert tree["/GNUSparseFile.0/q"] == "-rw-r--r-- 300"
    bad = _records_00(("GNU.sparse.numbytes", "3"), ("GNU.sparse.offset", "0"))
    work = _mk(tmp_path / "bad")
    raw = bad + b"abc".ljust(512, b"\0") + bytes(1024)
    _both_refuse(work, _archive(work, [blob(work, raw)]), ["sparse records"], "invalid tar header")


def _mk(path: Path) -> Path:
    path.mkdir()
    return path


def _listing(sif: Path) -> dict[str, str]:
    """Path -> "owner date" of the SIF's root file system (unsquashfs, UTC, to the minute)."""
    with SIFImage.open(sif) as img:
        offset = img.primary_partition().offset
    cmd = ["unsquashfs", "-o", str(offset), "-lln", "-UTC", "-d", "", str(sif)]
    listing = subprocess.run(cmd, capture_output=True, text=True, check=True, errors="replace").stdout
    out = {}
    for line in listing.splitlines():
        m = re.match(r"\S{10} (\d+/\d+)\s+\S+ (\S+ \S+) (/.*)", line)
        if m and not _NOT_COMPARED.match(m[3]):
            out[m[3].partition(" -> ")[0]] = f"{m[1]} {m[2]}"
    return out


def _listings(tmp_path: Path, layers: list) -> tuple[dict[str, str], dict[str, str] | None]:
    """Owners and times of hpcsif's image (built with :func:`_build_and_compare`) and of
    Apptainer's (None without Apptainer)."""
    _build_and_compare(tmp_path, layers, implied=True)
    theirs = tmp_path / "theirs.sif"
    return _listing(tmp_path / "ours.sif"), _listing(theirs) if theirs.exists() else None


# a directory that entries below a file's name need: (layers, the owner it gets)
DIRECTORY_FOR_A_FILE = {
    "same-layer": ([[file("a", "A", 0o600, uid=1000), file("a/y", "y")]], "1000/0"),
    "fifo-same-layer": ([[E("a", "fifo", uid=7), file("a/y", "y"), file("a/z", "z")]], "7/0"),
    "upper-layer": ([[file("a", "A", uid=1000)], [file("a/y", "y")]], "1000/0"),
    "replaced-directory": ([[d("a", 0o700), file("a", "A", uid=7)], [file("a/y", "y")]], "7/0"),
    # the first entry below it counts, of its own layer before the upper ones
    "own-layer-first": ([[file("a", "A", uid=1000), file("a/y", "y")], [file("a/b/c", "c")]], "1000/0"),
    # a whiteout removes nothing of its own layer
    "whiteout-in-its-layer": ([[file("a", "A", uid=5), whiteout("a")], [file("a/y", "y")]], "5/0"),
    # made for an entry deeper below: a new directory, as any parent the layers imply
    "deeper-entry-first": ([[file("a", "A", uid=1000)], [file("a/b/c", "c"), file("a/y", "y")]], "0/0"),
    # … not the attributes of a directory the file had replaced
    "deeper-entry-first-over-a-directory": (
        [[d("a", uid=1000)], [file("a", "A", uid=5)], [file("a/b/c", "c")]],
        "0/0",
    ),
    "deeper-entry-first-in-its-layer": (
        [[d("a", uid=1000)], [file("a", "A", uid=5), file("a/b/c", "c")]],
        "0/0",
    ),
}


@pytest.mark.parametrize("case", sorted(DIRECTORY_FOR_A_FILE))
def test_a_directory_made_in_place_of_a_file_takes_its_owner(tmp_path: Path, case: str) -> None:
    """umoci restores the parent's attributes after each entry, those the file had: hpcsif
    gave the directory root's (or, where the file had replaced a directory, that one's)."""
    entries, owner = DIRECTORY_FOR_A_FILE[case]
    layers = [layer(tmp_path, es) for es in entries]
    ours, theirs = _listings(tmp_path, layers)
    assert ours["/a"].startswith(owner + " ")
    if theirs is not None:
        assert ours["/a"].split()[0] == theirs["/a"].split()[0]


def test_pax_times_with_a_fraction_are_rounded_down(tmp_path: Path) -> None:
    """22:13:59.999999999 is 22:13:59, as in Go's archive/tar; tarfile's float made it 22:14."""
    member = _pax("f", {"mtime": "1700000039.999999999"}, b"x")
    ours, theirs = _listings(tmp_path, [layer(tmp_path, [member])])
    assert ours["/f"] == "0/0 2023-11-14 22:13"
    if theirs is not None:
        assert theirs["/f"] == ours["/f"]


def _old_style_file(how: str) -> bytes:
    """A type '\\0' member whose header name ends in '/' but whose PAX path or GNU long name
    does not, holding one byte, then a file ``k``."""
    old = tarfile.TarInfo("x")
    old.type, old.size = tarfile.AREGTYPE, 1
    if how == "pax":
        old.pax_headers = {"path": "q"}
        head = old.tobuf(tarfile.PAX_FORMAT)
        head = head[:-512] + _with_name(head[-512:], b"q/")
    else:
        old.name = "a/" + "y" * 120
        head = old.tobuf(tarfile.GNU_FORMAT)
        head = head[:-512] + _with_name(head[-512:], b"a/" + b"y" * 97 + b"/")
    return head + b"Z".ljust(512, b"\0") + tar_bytes([file("k", "k")])


def _with_name(block: bytes, name: bytes) -> bytes:
    """The header ``block`` with its name field ``name`` (and its checksum made right)."""
    block = bytearray(block)
    block[0:100] = name.ljust(100, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@pytest.mark.parametrize("how", ["pax", "gnu"])
def test_old_style_member_whose_long_name_has_no_slash_is_a_file(tmp_path: Path, how: str) -> None:
    """Go's archive/tar decides on the final name; tarfile made the member a directory from
    its header's name (cut at 100 bytes, ending in '/' there) and dropped its content."""
    tree = _build_and_compare(tmp_path, [blob(tmp_path, _old_style_file(how))], implied=True)
    assert tree["/q" if how == "pax" else "/a/" + "y" * 120] == "-rw-r--r-- 1"


def test_old_style_directory_named_by_a_pax_path_alone(tmp_path: Path) -> None:
    """A PAX path ending in '/' makes a type '\\0' member a directory without a child to imply it."""
    old = tarfile.TarInfo("q")
    old.type, old.mode, old.pax_headers = tarfile.AREGTYPE, 0o755, {"path": "q/"}
    raw = old.tobuf(tarfile.PAX_FORMAT) + tar_bytes([file("k", "k")])
    tree = _build_and_compare(tmp_path, [blob(tmp_path, raw)])
    assert tree["/q"] == "drwxr-xr-x "


def _docker_archive(work: Path, manifest: Callable[[dict], object]) -> Path:
    """A ``docker save`` archive of one layer whose manifest.json is ``manifest(entry)``,
    ``entry`` being the right one."""
    raw = tar_bytes([file("a", "A")])
    config = {"os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(raw)]}}
    entry = {"Config": "config.json", "RepoTags": ["test:latest"], "Layers": ["layer.tar"]}
    members = {
        "config.json": json.dumps(config).encode(),
        "layer.tar": raw,
        "manifest.json": json.dumps(manifest(entry)).encode(),
    }
    out = work / "docker.tar"
    with tarfile.open(out, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


# manifest.json documents that containers/image (Apptainer) refuses: (document, our words)
BAD_DOCKER_MANIFESTS = {
    "an-object": (lambda e: e, "not a list of objects"),  # an internal error ('str' has no .get)
    "tags-a-string": (lambda e: [dict(e, RepoTags="test:latest")], "RepoTags must be a list of names"),
    "no-config": (lambda e: [{"Layers": e["Layers"]}], "Config must be a path"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCKER_MANIFESTS))
def test_malformed_docker_manifests_fail_in_one_line(tmp_path: Path, case: str) -> None:
    shape, words = BAD_DOCKER_MANIFESTS[case]
    archive = _docker_archive(tmp_path, shape)
    out = tmp_path / "out"
    out.mkdir()
    cmd = ["hpcsif", "build", str(out / "x.sif"), f"docker-archive:{archive}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    fatal = [ln for ln in p.stderr.splitlines() if ln.startswith("FATAL:")]
    assert p.returncode != 0 and len(fatal) == 1, p.stderr
    assert f"malformed manifest.json ({words}" in fatal[0] and list(out.iterdir()) == []
    if APPTAINER:
        peer = [APPTAINER, "-s", "build", *PEER_NO_CACHE, str(out / "t.sif"), f"docker-archive:{archive}"]
        assert subprocess.run(peer, capture_output=True, timeout=120).returncode != 0


def test_a_well_formed_docker_manifest_builds(tmp_path: Path) -> None:
    """The counterpart of the malformed ones: the same archive with the right document."""
    archive = _docker_archive(tmp_path, lambda e: [e])
    p = subprocess.run(["hpcsif", "build", str(tmp_path / "x.sif"), f"docker-archive:{archive}"], timeout=120)
    assert p.returncode == 0


def test_a_whiteout_after_entries_below_its_name_keeps_the_directory(tmp_path: Path) -> None:
    """Apptainer's extraction (umoci) removes only what the layer has not written: the
    directory it wrote into stays, with its owner and mode, and loses its lower children
    (hpcsif made a new root-owned directory)."""
    lower = layer(tmp_path, [d("a", 0o1777, uid=3), file("a/old", "o"), d("b", uid=4)])
    upper = layer(tmp_path, [file("a/new", "n"), whiteout("a"), whiteout("b"), file("b/new", "n")])
    ours, theirs = _listings(tmp_path, [lower, upper])
    assert ours["/a"].startswith("3/0 ") and "/a/old" not in ours and "/a/new" in ours
    assert ours["/b"].startswith("0/0 ")  # removed first, then made anew
    if theirs is not None:
        assert {p: v.split()[0] for p, v in ours.items()} == {p: v.split()[0] for p, v in theirs.items()}


def test_hard_link_below_a_lower_symlink_to_that_symlink(tmp_path: Path) -> None:
    """``a -> s`` below; ``a/x/z`` hard-linked to ``a`` lies in ``s/x`` and is the symlink ``a``
    (hpcsif failed at once: 'points at directory', as it must where ``a`` is a directory)."""
    lower = layer(tmp_path, [E("a", "sym", target="s", mode=0o777), d("s")])
    upper = layer(tmp_path, [E("a/x/z", "link", target="a")], "zstd")
    tree = _build_and_compare(tmp_path, [lower, upper], implied=True)
    assert tree["/s/x/z"] == tree["/a"] == "lrwxrwxrwx s"


def test_an_archive_without_a_layer_blob_names_the_archive(tmp_path: Path) -> None:
    """The message named hpcsif's cache ('is missing from ~/.cache/hpcsif/oci'), where the
    archive's blobs had gone, as if the cache were broken."""
    lay = layer(tmp_path, [file("a", "A")])
    archive = _archive(tmp_path, [lay])
    with tarfile.open(archive) as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as out:
        for member, data in members:
            if not member.name.endswith(lay.digest.split(":")[1]):
                out.addfile(member, io.BytesIO(data) if data is not None else None)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = _hpcsif_build(out_dir / "x.sif", broken)
    fatal = [ln for ln in p.stderr.splitlines() if ln.startswith("FATAL:")]
    assert p.returncode != 0 and len(fatal) == 1 and list(out_dir.iterdir()) == [], p.stderr
    assert fatal[0].endswith(f"{broken}: layer {lay.digest} is missing"), fatal[0]


@pytest.mark.parametrize("kind", ["unknown-type", "long-symlink"])
def test_a_member_apptainer_cannot_extract_fails_even_if_replaced(tmp_path: Path, kind: str) -> None:
    """Apptainer extracts member after member and fails at this one; hpcsif skipped it where
    a later member of the layer has its name and the layer was read twice (``a`` written twice
    made the second pass)."""
    bad = tarfile.TarInfo("s")
    if kind == "unknown-type":
        bad.type = b"Z"
        words, theirs = "has an unknown type flag b'Z'", "unknown typeflag"
    else:
        bad.type, bad.linkname = tarfile.SYMTYPE, "q" * 4096
        words, theirs = "has a target over 4095 bytes", "symlink"
    entries = [file("a", "1"), file("a", "2"), bad, file("s", "S")]
    _both_refuse(tmp_path, _archive(tmp_path, [layer(tmp_path, entries)]), [words], theirs)
