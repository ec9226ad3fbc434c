"""Hostile layers: nothing may land outside the root, on either output path."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from hpcsif.errors import LayerError
from hpcsif.image.layers import extract_tree, flatten
from tests.image.tarbuild import d, file, layer, link, squash_and_unpack, sym


def _flatten_fails(layers, match: str) -> LayerError:
    with open(os.devnull, "wb") as out, pytest.raises(LayerError, match=match) as err:
        flatten(layers, out)
    return err.value


def _extract_fails(layers, dest: Path, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        extract_tree(layers, dest)
    assert not dest.exists()  # what was written is removed


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "./../../../escape"])
def test_dotdot_escape_is_clamped_to_the_root(tmp_path: Path, name: str):
    """``..`` at the root stays at the root (as Apptainer's umoci and Docker extract): contained."""
    lay = layer(tmp_path, [file("ok", "fine"), file(name, "evil"), file("h", "h"), link("l", "../../h")])
    root, _ = squash_and_unpack([lay], tmp_path)
    assert (root / "escape").read_text() == "evil" and (root / "l").read_text() == "h"
    assert os.stat(root / "l").st_nlink == 2
    (tmp_path / "box").mkdir()
    extract_tree([lay], tmp_path / "box" / "root")
    assert (tmp_path / "box" / "root" / "escape").read_text() == "evil"
    assert not (tmp_path / "escape").exists() and not (tmp_path / "box" / "escape").exists()


def test_name_component_over_255_bytes_is_refused(tmp_path: Path):
    """squashfs cannot hold it (tar2sqfs would write an image unsquashfs calls corrupt)."""
    lay = layer(tmp_path, [file("ok"), file("d/" + "é" * 128, "x")])
    _flatten_fails([lay], "longer than 255 bytes")
    _extract_fails([lay], tmp_path / "box", "longer than 255 bytes")
    root, _ = squash_and_unpack([layer(tmp_path, [file("é" * 127)])], tmp_path)  # 254 bytes: fine
    assert (root / ("é" * 127)).exists()


def test_dotdot_that_stays_inside_is_normalised(tmp_path: Path):
    lay = layer(tmp_path, [file("a/../b", "b"), file("c/./d//e", "e")])
    root, _ = squash_and_unpack([lay], tmp_path)
    assert (root / "b").read_text() == "b" and (root / "c/d/e").read_text() == "e"
    assert not (root / "a").exists()


def test_absolute_names_are_contained(tmp_path: Path):
    lay = layer(tmp_path, [file("/etc/abs", "inside"), file("///double", "x")])
    root, _ = squash_and_unpack([lay], tmp_path)
    assert (root / "etc/abs").read_text() == "inside" and (root / "double").read_text() == "x"
    box = tmp_path / "box"
    extract_tree([lay], box)
    assert (box / "etc/abs").read_text() == "inside"


def test_write_through_symlink_in_same_layer_is_contained(tmp_path: Path):
    """As Apptainer (umoci, securejoin): below a symlink of the same layer, the entry goes where
    the symlink points, resolved inside the root; the symlink stays."""
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = str(outside).lstrip("/")
    entries = [
        sym("evil", str(outside)),
        file("evil/pwned", "x"),
        sym("up", "../../../.."),
        file("up/p2", "y"),
    ]
    entries += [sym("loop", "loop"), d("keep")]
    lay = layer(tmp_path, entries)
    root, _ = squash_and_unpack([lay], tmp_path)
    assert (root / inside / "pwned").read_text() == "x" and (root / "p2").read_text() == "y"
    assert os.readlink(root / "evil") == str(outside)
    box = tmp_path / "box"
    extract_tree([lay], box)
    assert (box / inside / "pwned").read_text() == "x" and (box / "p2").read_text() == "y"
    assert list(outside.iterdir()) == []
    looped = layer(tmp_path, [sym("loop", "loop"), file("loop/x")])
    _flatten_fails([looped], "too many levels of symbolic links")
    _extract_fails([looped], tmp_path / "box2", "too many levels")


def test_write_through_lower_symlink_is_contained(tmp_path: Path):
    """Entries below a lower symlink go where it points inside the root, never outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = str(outside).lstrip("/")  # where the absolute link points within the image
    lower = layer(
        tmp_path, [sym("evil", str(outside)), sym("rel", "../../.."), d("etc"), file("etc/passwd", "root")]
    )
    upper = layer(
        tmp_path,
        [file("evil/pwned", "x"), file("rel/pwned2", "y"), sym("etc-link", "/etc"), d("etc-link")],
        "zstd",
    )
    top = layer(tmp_path, [file("via/passwd", "mine")], "none")
    via = layer(tmp_path, [sym("via", "/etc")], "none")
    box = tmp_path / "box"
    extract_tree([via, lower, upper, top], box)
    assert os.readlink(box / "evil") == str(outside) and (box / inside / "pwned").read_text() == "x"
    assert os.readlink(box / "rel") == "../../.." and (box / "pwned2").read_text() == "y"
    assert (box / "etc/passwd").read_text() == "mine" and os.readlink(box / "via") == "/etc"
    assert (box / "etc-link").is_dir()  # an explicit directory replaces a symlink of its own layer
    assert list(outside.iterdir()) == []
    root, _ = squash_and_unpack([via, lower, upper, top], tmp_path)
    assert (root / inside / "pwned").read_text() == "x" and (root / "etc/passwd").read_text() == "mine"


def test_symlinks_are_never_followed_by_extract_tree(tmp_path: Path):
    """Absolute and escaping symlinks are kept verbatim, and nothing is written through them."""
    outside = tmp_path / "outside"
    outside.mkdir()
    lay = layer(tmp_path, [sym("abs", str(outside / "file")), sym("up", "../../../../tmp"), d("dir")])
    box = tmp_path / "box"
    extract_tree([lay], box)
    assert os.readlink(box / "abs") == str(outside / "file") and os.readlink(box / "up") == "../../../../tmp"
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([file("a", "a"), link("b", "missing")], "points at missing file 'missing'"),
        ([d("dir"), link("b", "dir")], "points at directory 'dir'"),
        ([link("self", "self")], "points at itself"),
    ],
    ids=["missing", "directory", "self"],
)
def test_bad_hardlinks_are_refused(tmp_path: Path, entries, match: str):
    lay = layer(tmp_path, entries)
    err = _flatten_fails([lay], match)
    assert lay.digest in str(err)
    _extract_fails([lay], tmp_path / "box", match)


def test_hardlink_to_lower_directory_is_refused(tmp_path: Path):
    lower = layer(tmp_path, [d("dir")])
    upper = layer(tmp_path, [link("b", "dir")], "none")
    _flatten_fails([lower, upper], "points at directory 'dir'")


def test_invalid_whiteout_is_refused(tmp_path: Path):
    lay = layer(tmp_path, [file("a/.wh..."), file("x")])
    _flatten_fails([lay], "invalid whiteout")


def test_unknown_entry_type_is_refused(tmp_path: Path):
    """An unknown typeflag is an error, as in Apptainer, not a silently missing file."""
    ti = tarfile.TarInfo("weird")
    ti.type = b"Z"
    lay = layer(tmp_path, [file("ok", "1"), ti])
    _flatten_fails([lay], "entry 'weird' has an unknown type flag")
    _extract_fails([lay], tmp_path / "box", "unknown type flag")


def test_non_directory_root_entry_is_refused(tmp_path: Path):
    ti = tarfile.TarInfo("./")
    ti.type = tarfile.SYMTYPE
    ti.linkname = "/"
    lay = layer(tmp_path, [ti])
    _flatten_fails([lay], "root entry")


def test_extract_tree_needs_empty_destination(tmp_path: Path):
    lay = layer(tmp_path, [file("a", "a")])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("mine")
    with pytest.raises(LayerError, match="not an empty directory"):
        extract_tree([lay], busy)
    assert (busy / "keep").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    extract_tree([lay], empty)
    assert (empty / "a").read_text() == "a"
