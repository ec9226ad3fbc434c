"""The merge semantics of flatten/extract_tree on a multi-layer image, checked on real output.

Every case runs twice: through tar2sqfs + unsquashfs (the SIF path) and through extract_tree
(the sandbox path); both must give the same tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from hpcsif.errors import DuplicateEntryError, WriteThroughError
from hpcsif.image.layers import ExtraFile, extract_tree, flatten
from tests.image.tarbuild import E, d, file, layer, link, oci_layout, opaque, squash_and_unpack, sym, whiteout

LONG = "deep/" + "/".join(["d" * 60] * 5) + "/" + "f" * 200  # > 255 bytes: PAX path header
UNICODE = "données/ünïcödé-文件.txt"


def _base(tmp: Path):
    """Three layers (gzip, zstd, plain) covering the merge cases."""
    bottom = layer(
        tmp,
        [
            d("./etc"),
            file("./etc/passwd", "root:x:0:0\n"),
            file("/etc/removed", "gone\n"),
            d("etc/removed-dir"),
            file("etc/removed-dir/a", "a"),
            d("opq", mode=0o700),
            file("opq/old", "old"),
            d("opq/sub"),
            file("opq/sub/older", "x"),
            d("replaced-dir"),
            file("replaced-dir/child", "child"),
            d("usr"),
            d("usr/lib"),
            file("usr/lib/libc.so", "libc"),
            sym("lib", "usr/lib"),
            file("usr/share/gone", "g"),
            file("usr/share/kept", "k"),
            sym("share", "usr/share"),
            file("usr/opq/old", "o"),
            sym("opqlink", "usr/opq"),
            file("bin/tool", "#!/bin/sh\n", mode=0o4750),  # setuid, no o+r, parent implicit
            file("bin/secret", "s", mode=0o600),
            d("tmp", mode=0o1777),
            file("shared/target", "TARGET-BOTTOM"),
            file("hidden-target", "HIDDEN-CONTENT", mode=0o640),
            link("hl-to-hidden", "hidden-target"),
            E("dev/null", "chr"),
            E("dev/sda", "blk"),
            E("run/fifo", "fifo", mode=0o600),
            d("attrs", mode=0o700, uid=7, gid=8),
            file("dup", "first-empty-is-replaced"),
        ],
        "gzip",
    )
    middle = layer(
        tmp,
        [
            file("etc/passwd", "root:x:0:0\nuser:x:1000:1000\n"),
            whiteout("etc/removed"),
            whiteout("etc/removed-dir"),
            opaque("opq"),
            file("opq/new", "new"),
            file("replaced-dir", "now a file"),
            file("hidden-target", "UPPER"),
            file(LONG, "long name"),
            file(UNICODE, "unicode"),
            sym("abs-link", "/etc/passwd"),
            link("link-to-lower", "shared/target"),
            d("attrs", mode=0o750, uid=1, gid=2),
            file("lib/extra/libx.so", "libx"),  # below a lower symlink: written through it
        ],
        "zstd",
    )
    top = layer(
        tmp,
        [
            file("app/a", "A" * 5000, mode=0o755),
            link("app/b", "app/a"),
            link("app/c", "app/b"),
            sym("dupsym", "first"),
            sym("dupsym", "second"),
            d("dupdir", mode=0o700),
            d("dupdir", mode=0o750),
            whiteout("share/gone"),  # whiteouts alone below lower symlinks: applied through them
            opaque("opqlink"),
        ],
        "none",
    )
    return [bottom, middle, top]


@pytest.fixture(params=["squashfs", "sandbox"])
def merged(request, tmp_path: Path):
    """(root of the merged tree, skipped counts) for the base image plus extra files."""
    layers = _base(tmp_path)
    extra = [
        ExtraFile("/.singularity.d", None, 0o755),
        ExtraFile("/.singularity.d/runscript", b"#!/bin/sh\nexec echo hi\n", 0o755),
        ExtraFile("/.singularity.d/env/90-environment.sh", b"export A=1\n", 0o644),
        ExtraFile("/singularity", None, 0o777, symlink=".singularity.d/runscript"),
        ExtraFile("/etc/passwd", b"overridden\n", 0o644),
    ]
    if request.param == "squashfs":
        return squash_and_unpack(layers, tmp_path, extra)
    stats = extract_tree(layers, tmp_path / "sandbox", extra=extra)
    return tmp_path / "sandbox", stats.skipped


def test_overwrites_and_extra_files(merged):
    root, _ = merged
    assert (root / "etc/passwd").read_text() == "overridden\n"  # extra files win over layers
    assert (root / ".singularity.d/runscript").read_text().startswith("#!/bin/sh")
    assert os.readlink(root / "singularity") == ".singularity.d/runscript"
    assert (root / ".singularity.d/env/90-environment.sh").read_text() == "export A=1\n"


def test_whiteouts_and_opaque(merged):
    root, skipped = merged
    etc = sorted(p.name for p in (root / "etc").iterdir())
    assert etc == ["passwd"]  # removed file and removed dir (and its child) are gone
    assert sorted(p.name for p in (root / "opq").iterdir()) == ["new"]
    assert not any(".wh." in p.name for p in root.rglob("*"))
    assert skipped["whiteout"] >= 4  # removed, removed-dir, removed-dir/a, opq/old, opq/sub …


def test_upper_file_hides_lower_directory(merged):
    root, _ = merged
    assert (root / "replaced-dir").is_file()
    assert (root / "replaced-dir").read_text() == "now a file"


def test_directory_merge_keeps_upper_attributes(merged):
    root, _ = merged
    st = (root / "attrs").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755  # 0750 from the upper layer, made world-readable
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1, 2)
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777  # sticky bit kept


def test_entries_below_a_lower_symlink_are_written_through_it(merged):
    """As Apptainer (umoci), containerd and Podman extract: the usr-merge symlink stays."""
    root, _ = merged
    assert os.readlink(root / "lib") == "usr/lib"
    assert (root / "usr/lib/extra/libx.so").read_text() == "libx"
    assert (root / "usr/lib/libc.so").read_text() == "libc"
    assert (root / "bin").is_dir()  # an implicit parent with nothing below it in the image
    assert os.readlink(root / "share") == "usr/share" and os.readlink(root / "opqlink") == "usr/opq"
    assert sorted(os.listdir(root / "usr/share")) == ["kept"]
    assert os.listdir(root / "usr/opq") == []


def test_permissions_fixed(merged):
    root, _ = merged
    tool = stat.S_IMODE((root / "bin/tool").stat().st_mode)
    assert not tool & (stat.S_ISUID | stat.S_ISGID)
    assert tool & 0o555 == 0o555  # executable by owner -> readable and executable by all
    assert stat.S_IMODE((root / "bin/secret").stat().st_mode) & 0o444 == 0o444
    assert not stat.S_IMODE((root / "bin/secret").stat().st_mode) & 0o111
    assert stat.S_IMODE((root / "opq").stat().st_mode) & 0o555 == 0o555


def test_devices_dropped_fifos_kept(merged):
    root, skipped = merged
    assert not (root / "dev/null").exists() and not (root / "dev/sda").exists()
    assert skipped["device"] == 2
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)


def test_hardlinks(merged):
    root, _ = merged
    a, b, c = (root / "app/a"), (root / "app/b"), (root / "app/c")
    assert a.read_text() == b.read_text() == c.read_text() == "A" * 5000
    assert a.stat().st_ino == b.stat().st_ino == c.stat().st_ino
    # the link's target in its own layer is hidden by an upper layer: the layer is read again
    assert (root / "hl-to-hidden").read_text() == "HIDDEN-CONTENT"
    assert (root / "hidden-target").read_text() == "UPPER"
    # a link whose target is in a lower layer
    assert (root / "link-to-lower").read_text() == "TARGET-BOTTOM"
    assert (root / "link-to-lower").stat().st_ino == (root / "shared/target").stat().st_ino


def test_symlinks_long_and_unicode_names(merged):
    root, _ = merged
    assert os.readlink(root / "abs-link") == "/etc/passwd"  # kept verbatim
    assert (root / LONG).read_text() == "long name"
    assert (root / UNICODE).read_text() == "unicode"


def test_duplicates_in_one_layer_last_wins(merged):
    root, _ = merged
    assert os.readlink(root / "dupsym") == "second"
    assert stat.S_IMODE((root / "dupdir").stat().st_mode) == 0o755  # 0750 (the last), fixed


def test_duplicate_file_with_content_in_one_layer(tmp_path: Path):
    """The last copy wins: flatten asks for a second pass, which knows the repeated names."""
    lay = layer(
        tmp_path, [file("x", "one"), d("dir"), file("x", "two"), file("dir/y", "1"), file("dir/y", "2")]
    )
    with (
        open(os.devnull, "wb") as out,
        pytest.raises(DuplicateEntryError, match="'x' replaces an earlier") as err,
    ):
        flatten([lay], out)
    assert lay.digest in str(err.value)
    with open(os.devnull, "wb") as out:
        assert flatten([lay], out).skipped["duplicate"] == 2  # now in one pass


@pytest.mark.parametrize("path", ["squashfs", "sandbox"])
def test_duplicate_file_with_content_last_wins(tmp_path: Path, path: str):
    lay = layer(tmp_path, [file("x", "one"), file("x", "two"), file("x", "three")], "zstd")
    if path == "squashfs":
        root, _ = squash_and_unpack([lay], tmp_path)  # squashfs_from_tar retries by itself
    else:
        root = tmp_path / "box"
        extract_tree([lay], root)
    assert (root / "x").read_text() == "three"


def test_empty_duplicate_is_replaced(tmp_path: Path):
    lay = layer(tmp_path, [file("x"), file("x", "content"), sym("y", "a"), file("y", "file")])
    root, skipped = squash_and_unpack([lay], tmp_path)
    assert (root / "x").read_text() == "content"
    assert (root / "y").is_file() and not (root / "y").is_symlink()
    assert skipped["duplicate"] == 2


def test_stats_and_progress(tmp_path: Path):
    layers = _base(tmp_path)
    calls: list[tuple[int, int]] = []
    learn = pytest.raises(WriteThroughError, match="'lib' -> 'usr/lib'")
    with open(tmp_path / "out.tar", "wb") as out, learn:
        flatten(layers, out)  # the first pass learns that lib/extra belongs below lib -> usr/lib
    with open(tmp_path / "out.tar", "wb") as out:
        stats = flatten(layers, out, progress=lambda done, total: calls.append((done, total)))
    total = sum(lay.path.stat().st_size for lay in layers)
    assert calls and calls[-1][1] == total and all(done <= total for done, _ in calls)
    assert stats.bytes_in == total
    assert stats.bytes_out == (tmp_path / "out.tar").stat().st_size
    assert stats.skipped["device"] == 2
    assert stats.entries > 30


def test_root_opaque_hides_everything_below(tmp_path: Path):
    lower = layer(tmp_path, [file("a", "a"), d("b"), file("b/c", "c")])
    upper = layer(tmp_path, [opaque("."), file("new", "n")], "zstd")
    root, _ = squash_and_unpack([lower, upper], tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["new"]


def test_root_entry_aufs_metadata_and_replaced_link(tmp_path: Path):
    lower = layer(tmp_path, [d("./", mode=0o700), file("lowfile", "low")])
    upper = layer(
        tmp_path,
        [
            d("./", mode=0o750),
            d(".wh..wh.plnk"),
            file(".wh..wh.plnk/123.456", "aufs hardlink stash"),
            file(".wh..wh.aufs"),
            link("x", "lowfile"),  # a link to the lower layer, then replaced in the same layer
            sym("x", "elsewhere"),
        ],
        "zstd",
    )
    root, _ = squash_and_unpack([lower, upper], tmp_path)
    # AUFS's hard-link store stays (as in Apptainer: links may point there), the rest goes
    assert sorted(p.name for p in root.iterdir()) == [".wh..wh.plnk", "lowfile", "x"]
    assert (root / ".wh..wh.plnk/123.456").read_text() == "aufs hardlink stash"
    assert os.readlink(root / "x") == "elsewhere"
    assert stat.S_IMODE(root.stat().st_mode) == 0o755  # the upper root entry (0750), made traversable


def test_link_to_lower_target_hidden_above(tmp_path: Path):
    """A link's target lives in a lower layer but an upper layer replaced it: the link keeps
    the lower content (copied under the link's name)."""
    bottom = layer(tmp_path, [file("t", "BOTTOM"), file("u", "U")])
    middle = layer(tmp_path, [link("p", "t"), link("q", "t"), link("r", "u")], "none")
    top = layer(tmp_path, [file("t", "TOP")], "zstd")
    root, _ = squash_and_unpack([bottom, middle, top], tmp_path)
    assert (root / "t").read_text() == "TOP"
    assert (root / "p").read_text() == (root / "q").read_text() == "BOTTOM"
    assert (root / "p").stat().st_ino == (root / "q").stat().st_ino != (root / "t").stat().st_ino
    assert (root / "r").stat().st_ino == (root / "u").stat().st_ino


def test_values_beyond_ustar_use_pax(tmp_path: Path):
    target = "/opt/" + "t" * 150
    big_uid = 3_000_000  # more than 7 octal digits
    lay = layer(tmp_path, [sym("longlink", target), file("owned", "x", uid=big_uid, gid=big_uid)])
    out = tmp_path / "out.tar"
    with open(out, "wb") as f:
        flatten([lay], f)
    with tarfile.open(out) as tf:
        members = {m.name: m for m in tf}
    assert members["longlink"].linkname == target
    assert (members["owned"].uid, members["owned"].gid) == (big_uid, big_uid)
    root, _ = squash_and_unpack([lay], tmp_path)
    assert os.readlink(root / "longlink") == target


def _tree(root: Path) -> dict[str, tuple]:
    """Every path below ``root`` with its type, content digest, link target and owner."""
    out = {}
    for path in root.rglob("*"):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISREG(st.st_mode):
            out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), st.st_nlink, st.st_uid)
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", os.readlink(path), st.st_uid)
        else:
            out[rel] = (stat.S_IFMT(st.st_mode), st.st_uid)
    return out


@pytest.mark.skipif(shutil.which("umoci") is None or os.geteuid() != 0, reason="needs umoci, as root")
def test_same_tree_as_umoci(tmp_path: Path):
    """Differential check against umoci's layer extraction on the cases where extraction and
    overlay semantics agree (no device nodes, no writes below lower symlinks)."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    lower = layer(
        blobs,
        [
            d("etc"),
            file("etc/a", "a"),
            file("etc/b", "b"),
            d("etc/sub"),
            file("etc/sub/c", "c"),
            d("opq"),
            file("opq/old", "old"),
            file("shared", "S", uid=12),
            link("shared-link", "shared"),
            sym("abs", "/etc/a"),
            d("gone"),
            file("gone/x", "x"),
        ],
        "gzip",
    )
    upper = layer(
        blobs,
        [
            file("etc/a", "A2"),
            whiteout("etc/b"),
            whiteout("gone"),
            opaque("opq"),
            file("opq/new", "new"),
            file("etc/sub", "now a file"),
            file(LONG, "long"),
            file(UNICODE, "uni"),
            file("app/bin", "bin", mode=0o755),
            link("app/bin2", "app/bin"),
        ],
        "none",  # umoci 0.4 reads no zstd
    )
    layout = oci_layout(tmp_path / "layout", [lower, upper])
    ref = tmp_path / "umoci"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:test", str(ref)], check=True, capture_output=True
    )
    ours, _ = squash_and_unpack([lower, upper], tmp_path)
    assert _tree(ours) == _tree(ref / "rootfs")


def test_wide_directory_is_packed_by_mksquashfs(tmp_path: Path, monkeypatch, caplog):
    """tar2sqfs 1.2 is quadratic in the entries of one directory: past the limit the stream
    is unpacked and packed with mksquashfs instead, with the same result."""
    from hpcsif.sif import squashfs

    monkeypatch.setattr(squashfs, "_TAR2SQFS_WIDE", 50)
    entries = [file(f"wide/f{i}", str(i)) for i in range(60)] + [d("narrow"), file("narrow/x", "x")]
    lay = layer(tmp_path, [*entries, link("wide/h", "narrow/x")])
    with caplog.at_level("INFO", logger="hpcsif.sif.squashfs"):
        root, _ = squash_and_unpack([lay], tmp_path)
    assert "directory /wide has more than 50 entries" in caplog.text
    assert sorted(p.name for p in (root / "wide").iterdir()) == sorted([f"f{i}" for i in range(60)] + ["h"])
    assert (root / "wide/f59").read_text() == "59" and (root / "wide/h").stat().st_nlink == 2
