"""Hostile layers, round 9: what one layer removes, across layers, through ``hpcsif build``.

Apptainer extracts layer after layer (umoci): a whiteout, an opaque directory or a
non-directory removes what the layers below have there at that point of the layer. A hard
link made after that to a removed file fails there, and a directory that replaces a
non-directory of its own layer starts empty. hpcsif, which merges top-down, gave such links
the deleted file's content and kept the lower directory's children.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.image.tarbuild import blob, d, file, layer, link, opaque, sym, tar_bytes, whiteout
from tests.image.test_hostile_cli import (
    APPTAINER,
    PEER_NO_CACHE,
    _archive,
    _build_and_compare,
    _hpcsif_build,
)


@pytest.fixture
def inflater() -> str:
    """The CLI chooses its own inflater in its own process."""
    return "cli"


def _both_refuse(tmp_path: Path, archive: Path, ours: list[str], theirs: str) -> None:
    """Building *archive* fails with one FATAL line holding each of *ours*, no traceback and
    nothing written; Apptainer's build (when there is one) fails saying *theirs*."""
    out = tmp_path / "out"
    out.mkdir()
    p = _hpcsif_build(out / "x.sif", archive)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    fatal = [ln for ln in p.stderr.splitlines() if ln.startswith("FATAL:")]
    assert len(fatal) == 1 and all(part in fatal[0] for part in ours), p.stderr
    assert list(out.iterdir()) == []
    if APPTAINER:
        peer = subprocess.run(
            [APPTAINER, "-s", "build", *PEER_NO_CACHE, str(out / "theirs.sif"), f"oci-archive:{archive}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert peer.returncode != 0 and theirs in peer.stderr, peer.stderr


def _sandbox_of_compared(tmp_path: Path) -> Path:
    """The image :func:`_build_and_compare` built, built again as a sandbox (``tmp_path/box``)."""
    box, archive = tmp_path / "box", tmp_path / "image.oci-archive.tar"
    p = subprocess.run(
        [sys.executable, "-m", "hpcsif.cli.main", "build", "--sandbox", str(box), f"oci-archive:{archive}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return box


# (lower layers' entries, the top layer's entries); the top layer's link names a removed file
MISSING_LINK_TARGETS = {
    "whiteout-first": ([[file("t", "T")]], [whiteout("t"), link("h", "t")]),
    "opaque-first": ([[d("a"), file("a/t", "T")]], [opaque("a"), link("h", "a/t")]),
    "parent-whiteout-first": ([[d("a"), file("a/t", "T")]], [whiteout("a"), link("h", "a/t")]),
    "root-opaque-first": ([[file("t", "T")]], [opaque(""), link("h", "t")]),
    "parent-replaced-by-a-file": ([[d("a"), file("a/t", "T")]], [file("a", "F"), link("h", "a/t")]),
    "parent-replaced-and-back": ([[d("a"), file("a/t", "T")]], [file("a", "F"), d("a"), link("h", "a/t")]),
    "parent-replaced-in-its-layer": ([], [d("a"), file("a/t", "T"), file("a", "F"), link("h", "a/t")]),
    "whiteout-in-a-layer-between": ([[file("t", "T")], [whiteout("t")]], [link("h", "t")]),
    "opaque-in-a-layer-between": (
        [[d("a"), file("a/t", "T")], [opaque("a"), file("a/n")]],
        [link("h", "a/t")],
    ),
}


@pytest.mark.parametrize("case", sorted(MISSING_LINK_TARGETS))
def test_hard_link_to_a_removed_file_fails_as_in_apptainer(tmp_path: Path, case: str) -> None:
    """Apptainer: 'link: no such file or directory' (or 'not a directory'); the file the image
    deleted must not come back under the link's name."""
    lowers, top = MISSING_LINK_TARGETS[case]
    layers = [layer(tmp_path, entries) for entries in lowers] + [layer(tmp_path, top, "zstd")]
    _both_refuse(tmp_path, _archive(tmp_path, layers), ["hard link 'h' points at missing file"], "link: ")


def test_links_made_before_the_removal_or_to_a_new_file_stay(tmp_path: Path) -> None:
    """The counterparts that Apptainer builds: the link comes first, or the file is added again."""
    lower = layer(tmp_path, [file("t", "T"), file("u", "U0"), d("a"), file("a/v", "V")])
    entries = [link("h", "t"), whiteout("t"), whiteout("u"), file("u", "NEW"), link("hu", "u")]
    entries += [d("p"), file("p/x", "PX"), link("hp", "p/x"), file("p", "P")]
    upper = layer(tmp_path, entries)
    top = layer(tmp_path, [link("hv", "a/v"), opaque("a"), file("a/w", "W")], "zstd")
    tree = _build_and_compare(tmp_path, [lower, upper, top])
    assert tree["/h"] == "-rw-r--r-- 1" and tree["/hu"] == "-rw-r--r-- 3" and tree["/hv"] == "-rw-r--r-- 1"
    assert tree["/hp"] == "-rw-r--r-- 2" and tree["/p"] == "-rw-r--r-- 1"
    assert not {"/t", "/a/v", "/p/x"} & set(tree)


@pytest.mark.parametrize("first", ["file", "empty-file", "symlink"])
def test_directory_replacing_a_non_directory_of_its_layer_starts_empty(tmp_path: Path, first: str) -> None:
    """``a`` (a file or symlink), then ``a/`` in one layer over a lower ``a/t``: the file took
    the lower directory away, so ``a/t`` is gone, as after Apptainer's extraction."""
    entry = {"file": file("a", "F"), "empty-file": file("a"), "symlink": sym("a", "x")}[first]
    lower = layer(tmp_path, [d("a"), file("a/t", "T"), file("keep", "K")])
    upper = layer(tmp_path, [entry, d("a"), file("a/n", "nn")])
    tree = _build_and_compare(tmp_path, [lower, upper])
    assert tree["/a/n"] == "-rw-r--r-- 2" and tree["/keep"] == "-rw-r--r-- 1"
    assert "/a/t" not in tree


def _record(key: str, value: str) -> bytes:
    """A PAX record, ``LEN key=value\\n`` where LEN counts its own digits too."""
    rest = f" {key}={value}\n".encode()
    size = len(rest) + 1
    while len(str(size)) + len(rest) != size:
        size += 1
    return str(size).encode() + rest


def _with_header(kind: bytes, records: dict[str, str]) -> bytes:
    """A file ``a``, then an extended header of type ``kind`` holding ``records``, then ``b``."""
    first = tar_bytes([file("a", "aa")])[: 2 * tarfile.BLOCKSIZE]  # a's header and data, no end
    body = b"".join(_record(k, v) for k, v in records.items())
    head = tarfile.TarInfo("@header")
    head.type, head.size = kind, len(body)
    header = head.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % tarfile.BLOCKSIZE)
    return first + header + tar_bytes([file("b", "bb")], tarfile.USTAR_FORMAT)


@pytest.mark.parametrize("kind", [tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE])
def test_global_and_solaris_headers_are_refused_as_in_apptainer(tmp_path: Path, kind: bytes) -> None:
    """tarfile gave a global header's ``path`` and ``uid`` to every later member (``a`` and
    ``b`` became one file named by the header), a Solaris header's to the next one. Apptainer
    refuses both members (unknown typeflag)."""
    archive = _archive(tmp_path, [blob(tmp_path, _with_header(kind, {"path": "renamed", "uid": "42"}))])
    _both_refuse(tmp_path, archive, ["offset 1024 is a", f"(type {kind.decode()!r})"], "unknown typeflag")


def test_entries_go_through_the_topmost_lower_symlink(tmp_path: Path) -> None:
    """``a -> x``, then ``a -> y`` a layer up, then ``a/f``: ``f`` lands in ``y`` (it landed in
    ``x``, through the symlink the next layer had replaced)."""
    layers = [
        layer(tmp_path, [d("x"), d("y"), sym("a", "x")]),
        layer(tmp_path, [sym("a", "y")]),
        layer(tmp_path, [file("a/f", "f"), whiteout("a/gone")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers)
    assert tree["/y/f"] == "-rw-r--r-- 1" and tree["/a"] == "lrwxrwxrwx y" and "/x/f" not in tree


@pytest.mark.parametrize("arch", ["x86_64", "AMD64", "not/an/arch"])
def test_config_architecture_that_is_no_goarch_name_builds_for_this_host(tmp_path: Path, arch: str) -> None:
    """Apptainer builds such an image (labelled for the host); hpcsif failed: 'unknown architecture'."""
    from hpcsif.image.compose import ImageSpec, layer_tar, write_oci_layout
    from hpcsif.image.model import host_arch
    from hpcsif.sif.reader import SIFImage

    layout = tmp_path / "layout"
    write_oci_layout(layout, ImageSpec(layers=[layer_tar([])], architecture=arch))
    sif = tmp_path / "x.sif"
    p = subprocess.run(
        ["hpcsif", "build", str(sif), f"oci:{layout}"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    with SIFImage.open(sif) as img:
        assert img.primary_partition().arch == host_arch()
    labels = subprocess.run(["hpcsif", "inspect", "--labels", str(sif)], capture_output=True, text=True)
    assert f"org.label-schema.build-arch: {host_arch()}" in labels.stdout


def test_owners_beyond_32_bits_wrap_in_the_sif_and_the_sandbox(tmp_path: Path) -> None:
    """A base-256 (or PAX) owner over 2^32: the sandbox build was 'internal error: OverflowError'."""
    big = file("a", "x").tarinfo()
    big.uid, big.gid = 2**33 + 5, 2**40 + 7
    layers = [blob(tmp_path, tar_bytes([big], tarfile.GNU_FORMAT))]
    assert _build_and_compare(tmp_path, layers)["/a"] == "-rw-r--r-- 1"
    box = _sandbox_of_compared(tmp_path)
    st = (box / "a").stat()
    assert (st.st_uid, st.st_gid) == (5, 7)


# one layer: an entry ``t``, hard links h1 and h2 to it, then ``t`` replaced (``tar -r`` or a
# tool appending): (the first ``t``, what replaces it, what the links hold then)
LINKED_THEN_REPLACED = {
    "file-by-file": ([file("t", "A")], [file("t", "BBBB"), link("g", "t")], "-rw-r--r-- 1"),
    "file-by-symlink": ([file("t", "A")], [sym("t", "/etc/passwd")], "-rw-r--r-- 1"),
    "file-by-directory": ([file("t", "A")], [d("t"), file("t/x", "xx")], "-rw-r--r-- 1"),
    "empty-file-by-file": ([file("t")], [file("t", "full")], "-rw-r--r-- 0"),
    "symlink-by-file": ([sym("t", "/etc/x")], [file("t", "new")], "lrwxrwxrwx /etc/x"),
}


@pytest.mark.parametrize("case", sorted(LINKED_THEN_REPLACED))
def test_hard_links_keep_the_file_their_layer_replaces_later(tmp_path: Path, case: str) -> None:
    """As tar extraction, the links keep the old file: hpcsif failed ('points at missing file')
    where it had written the old content, and gave the links the new one where it had not."""
    first, replacement, kept = LINKED_THEN_REPLACED[case]
    entries = [*first, link("h1", "t"), link("h2", "h1"), *replacement]
    tree = _build_and_compare(tmp_path, [layer(tmp_path, entries)])
    assert tree["/h1"] == tree["/h2"] == kept and tree["/t"] != kept


def _raw_header(name: bytes, kind: bytes, size: int) -> bytes:
    """A ustar header block naming ``name`` exactly (GNU long name records and the like)."""
    info = tarfile.TarInfo("x")
    info.type, info.size = kind, size
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[0:100] = name.ljust(100, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _long_name(value: bytes, size: int | None = None) -> bytes:
    """A GNU long name record holding ``value`` (its size field says ``size``, else its length)."""
    size = len(value) if size is None else size
    return _raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, size) + value + bytes(-len(value) % 512)


_FILE_Z = _raw_header(b"short", tarfile.REGTYPE, 1) + b"z".ljust(512, b"\0")
_PAX_PATH = tarfile.TarInfo("x")
_PAX_PATH.pax_headers, _PAX_PATH.size = {"path": "paxpath"}, 1

# GNU long name records as Go's archive/tar (Apptainer) reads them: (layer, the file's name)
GNU_LONG_NAMES = {
    "two-in-a-row": (_long_name(b"first\0") + _long_name(b"second\0") + _FILE_Z, "/second"),
    "empty": (_long_name(b"", 0) + _FILE_Z, "/short"),
    "shorter-than-its-block": (_long_name(b"gnuname", 6) + _FILE_Z, "/gnunam"),
    "after-a-pax-path": (
        _PAX_PATH.tobuf(tarfile.PAX_FORMAT)[:-512] + _long_name(b"gnupath\0") + _FILE_Z,
        "/gnupath",
    ),
}


@pytest.mark.parametrize("case", sorted(GNU_LONG_NAMES))
def test_gnu_long_names_are_read_as_apptainer_reads_them(tmp_path: Path, case: str) -> None:
    """tarfile took the first of two records, read the record's padding as part of the name,
    let an empty record name the root (the build failed) and a PAX path win over the record."""
    content, name = GNU_LONG_NAMES[case]
    tree = _build_and_compare(tmp_path, [blob(tmp_path, content + bytes(1024))])
    assert tree[name] == "-rw-r--r-- 1"


def _pax_member(records: bytes) -> bytes:
    """An extended header holding exactly ``records``, then a one-byte file ``f``."""
    head = tarfile.TarInfo("PaxHeader")
    head.type, head.size = tarfile.XHDTYPE, len(records)
    member = tarfile.TarInfo("f")
    member.size = 1
    return (
        head.tobuf(tarfile.USTAR_FORMAT)
        + records.ljust(-(-len(records) // 512) * 512, b"\0")
        + member.tobuf(tarfile.USTAR_FORMAT)
        + b"c".ljust(512, b"\0")
        + bytes(1024)
    )


BAD_PAX_RECORDS = {
    "length-too-short": (b"11 path=one\n", "malformed extended header record at offset 0"),
    "no-newline": (b"10 path=xy", "malformed extended header record at offset 0"),
    "nul-after-the-records": (b"11 path=ab\n\0\0\0", "malformed extended header record at offset 11"),
    "uid-no-number": (b"13 uid=abcde\n", "the PAX uid record at offset 0 is no number"),
    "mtime-infinite": (b"15 mtime=1e999\n", "the PAX mtime record at offset 0 is no number"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAX_RECORDS))
def test_malformed_pax_records_fail_the_layer_as_in_apptainer(tmp_path: Path, case: str) -> None:
    """Go's archive/tar refuses these ('invalid tar header'); tarfile read them as best it
    could (a name cut short, uid 0, an infinite mtime that tar2sqfs then failed on)."""
    records, message = BAD_PAX_RECORDS[case]
    archive = _archive(tmp_path, [blob(tmp_path, _pax_member(records))])
    _both_refuse(tmp_path, archive, [message], "invalid tar header")


def test_empty_pax_records_keep_the_header_values(tmp_path: Path) -> None:
    """As in Go's archive/tar: an empty ``path`` made the member the root (the build failed)."""
    tree = _build_and_compare(tmp_path, [blob(tmp_path, _pax_member(b"8 path=\n7 uid=\n"))])
    assert tree["/f"] == "-rw-r--r-- 1"


def _with_prefix_area(magic: bytes, prefix: bytes) -> bytes:
    """A one-byte file ``f`` whose header has ``magic`` and ``prefix`` at the ustar prefix field."""
    info = tarfile.TarInfo("f")
    info.size = 1
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[257:265], block[345:500] = magic, prefix.ljust(155, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + b"c".ljust(512, b"\0") + bytes(1024)


@pytest.mark.parametrize(
    ("magic", "prefix"),
    [(b"ustar  \0", b"14515271244\x0014515271244"), (bytes(8), b"junk")],
    ids=["gnu-incremental-times", "v7"],
)
def test_only_posix_headers_have_a_name_prefix(tmp_path: Path, magic: bytes, prefix: bytes) -> None:
    """GNU tar keeps atime/ctime where POSIX has the prefix (incremental dumps): tarfile made
    them a directory above the file; Go's archive/tar (Apptainer) reads no prefix there."""
    tree = _build_and_compare(tmp_path, [blob(tmp_path, _with_prefix_area(magic, prefix))])
    assert tree["/f"] == "-rw-r--r-- 1"


def _old_style_directory(how: str) -> bytes:
    """A type '\\0' member whose PAX path or GNU long name ends in '/', then a file below it."""
    old = tarfile.TarInfo("x")
    old.type = tarfile.AREGTYPE
    if how == "pax":
        old.pax_headers = {"path": "d/"}
        head = old.tobuf(tarfile.PAX_FORMAT)
    else:
        old.name = "d" * 120 + "/"
        head = old.tobuf(tarfile.GNU_FORMAT)
    return head + tar_bytes([file(("d" if how == "pax" else "d" * 120) + "/child", "c")])


@pytest.mark.parametrize("how", ["pax", "gnu"])
def test_old_style_directories_named_by_long_names(tmp_path: Path, how: str) -> None:
    """Go's archive/tar makes a type '\\0' member whose final name ends in '/' a directory;
    tarfile did so only for the ustar name: a file, and the build failed on its child."""
    tree = _build_and_compare(tmp_path, [blob(tmp_path, _old_style_directory(how))], implied=True)
    assert tree[f"/{'d' if how == 'pax' else 'd' * 120}/child"] == "-rw-r--r-- 1"


def test_whiteouts_create_no_directory_and_keep_their_entries_parents(tmp_path: Path) -> None:
    """An opaque marker of a directory no layer has made that directory (hpcsif kept it); the
    parent directories of a whited-out entry went with it (they stay after extraction)."""
    lower = layer(tmp_path, [file("f", "F"), sym("p/q/z", "c"), file("o/t", "T")])
    upper = layer(
        tmp_path, [opaque("new"), opaque("f"), opaque("o/q"), whiteout("p/q/z"), opaque("o")], "zstd"
    )
    tree = _build_and_compare(tmp_path, [lower, upper], implied=True)
    assert tree["/f"] == "-rw-r--r-- 1" and tree["/p/q"].startswith("d") and tree["/o"].startswith("d")
    assert not {"/new", "/o/q", "/o/t", "/p/q/z"} & set(tree)


def test_entries_below_a_non_directory_of_their_layer_make_it_a_directory(tmp_path: Path) -> None:
    """As Apptainer's extraction: a file, FIFO or hard link that a later entry of its layer
    lies below becomes a directory (hpcsif refused the layer); a symlink of the layer that an
    upper layer hides still leads its layer's later entries (they went below the hidden name)."""
    fifo = tarfile.TarInfo("f3")
    fifo.type = tarfile.FIFOTYPE
    entries = [file("f1", "F"), file("f1/x", "1"), file("f2"), file("f2/x", "22"), fifo, file("f3/x", "333")]
    entries += [
        file("t", "T"),
        link("f4", "t"),
        file("f4/x", "4444"),
        d("c"),
        sym("a", "c"),
        file("a/x", "5"),
    ]
    tree = _build_and_compare(tmp_path, [layer(tmp_path, entries), layer(tmp_path, [d("a")])], implied=True)
    assert [tree[f"/f{i}/x"] for i in (1, 2, 3, 4)] == [f"-rw-r--r-- {i}" for i in (1, 2, 3, 4)]
    assert tree["/t"] == "-rw-r--r-- 1" and tree["/c/x"] == "-rw-r--r-- 1" and "/a/x" not in tree


# hard links that were made (so their target had to be there) though a later entry of their
# layer, or an upper layer, replaces them: (layers, bottom first)
REPLACED_LINKS_TO_NOTHING = {
    "replaced-later": [[whiteout("y")], [link("h", "missing"), file("h", "1")]],
    "hidden-by-an-upper-layer": [[link("h", "missing"), file("s", "S")], [file("h", "H")]],
    "below-its-own-name": [[file("h/y", "1"), link("h", "h/y")], [d("h/x")]],
    "replaced-on-the-second-pass": [[file("h", "22"), link("h", "missing"), file("h", "333")]],
}


@pytest.mark.parametrize("case", sorted(REPLACED_LINKS_TO_NOTHING))
def test_replaced_hard_links_still_need_their_target(tmp_path: Path, case: str) -> None:
    """Apptainer fails ('link: no such file or directory'); hpcsif built the image."""
    layers = [layer(tmp_path, entries) for entries in REPLACED_LINKS_TO_NOTHING[case]]
    out = tmp_path / "out"
    out.mkdir()
    p = _hpcsif_build(out / "x.sif", _archive(tmp_path, layers))
    fatal = [ln for ln in p.stderr.splitlines() if ln.startswith("FATAL:")]
    assert p.returncode != 0 and len(fatal) == 1, p.stderr
    assert "hard link 'h' points at missing file '" in fatal[0]
    assert list(out.iterdir()) == []


def test_many_layers_that_repeat_names(tmp_path: Path) -> None:
    """Each such layer needs a pass of its own: the third failed with 'converting again'."""
    layers = [layer(tmp_path, [file(f"d{i}", "A" * (i + 2)), file(f"d{i}", "B")]) for i in range(5)]
    tree = _build_and_compare(tmp_path, layers)
    assert all(tree[f"/d{i}"] == "-rw-r--r-- 1" for i in range(5))
    box = _sandbox_of_compared(tmp_path)
    assert all((box / f"d{i}").read_text() == "B" for i in range(5))


# (layers, bottom first; a path that must be there, one that must not)
ODD_MERGES = {
    # a whiteout below a file is no reason for a directory there (on the second pass the file went)
    "whiteout-below-a-file": ([[file("b"), whiteout("b/x"), file("c", "1"), file("c", "22")]], "/b", "/b/x"),
    # an upper layer whites out and empties 'a': no directory stays
    "whited-out-and-opaque": ([[file("a/x/z", "1")], [opaque("a"), whiteout("a")]], "/etc", "/a"),
    # the symlink's own layer replaced it with a directory: nothing goes through it
    "symlink-replaced-in-its-layer": ([[sym("a/x", "/a"), d("a/x")], [file("a/x/z", "1")]], "/a/x/z", "/a/z"),
    # a link to a file an upper layer hides, then replaced: hpcsif crashed (IndexError)
    "withdrawn-link-to-a-hidden-file": (
        [[file("t", "T"), link("h", "t"), file("h", "HH")], [file("t", "U")]],
        "/h",
        "/x",
    ),
    # 'a' (a file) became a directory for 'a/y' on a second pass: the lower 'a/x' came back
    "file-made-a-directory-on-the-second-pass": (
        [[d("a"), file("a/x", "333")], [file("a"), file("a/y", "333"), file("a/y", "22")]],
        "/a/y",
        "/a/x",
    ),
}


@pytest.mark.parametrize("case", sorted(ODD_MERGES))
def test_odd_merges_found_by_a_differential_fuzzer(tmp_path: Path, case: str) -> None:
    """Random layer stacks built by hpcsif and Apptainer (tree compared): these differed."""
    stacks, there, absent = ODD_MERGES[case]
    tree = _build_and_compare(tmp_path, [layer(tmp_path, entries) for entries in stacks], implied=True)
    assert there in tree and absent not in tree


def test_hard_link_to_a_link_that_became_a_directory_fails(tmp_path: Path) -> None:
    """``a`` (a hard link) became a directory for ``a/q``: a link to ``a`` is a link to a directory,
    which Apptainer refuses ('operation not permitted'); hpcsif linked the file ``a`` had named."""
    out = tmp_path / "out"
    out.mkdir()
    entries = [file("s", "S"), link("a", "s"), file("a/q", "Q"), link("a/x", "a")]
    p = _hpcsif_build(out / "x.sif", _archive(tmp_path, [layer(tmp_path, entries)]))
    fatal = [ln for ln in p.stderr.splitlines() if ln.startswith("FATAL:")]
    assert p.returncode != 0 and len(fatal) == 1 and "hard link 'a/x' points at directory 'a'" in fatal[0]
    assert list(out.iterdir()) == []


def test_the_pre_scan_follows_the_layers_symlinks(tmp_path: Path) -> None:
    """``a/x/z`` goes through ``a/x -> ../b`` below the file ``b``, which becomes a directory: the
    second pass did not know it and failed ('cannot be merged')."""
    entries = [sym("a/x", "../b"), d("c"), link("b/x", "a/x"), file("b", "22"), file("a/x/z", "1")]
    tree = _build_and_compare(tmp_path, [layer(tmp_path, entries)], implied=True)
    assert tree["/b/z"] == "-rw-r--r-- 1" and tree["/a/x"] == "lrwxrwxrwx ../b"
