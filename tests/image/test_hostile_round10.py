"""Hostile layers, round 10: symlinks that layers write through, through ``hpcsif build``.

Apptainer extracts layer after layer (umoci): a layer's entry below a lower symlink lands
where the symlink points, whatever an upper layer does to the symlink later, and a hard link
to a symlink is that symlink too. hpcsif merges top-down and learns of such symlinks on a
later pass; it dropped or misplaced those entries.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image.tarbuild import E, d, file, layer, link, opaque, sym, whiteout
from tests.image.test_hostile_cli import _archive, _build_and_compare, _hpcsif_build
from tests.image.test_hostile_round9 import _both_refuse


@pytest.fixture
def inflater() -> str:
    """The CLI chooses its own inflater in its own process."""
    return "cli"


# what the top layer does to the symlink ``a -> x`` after the middle layer wrote ``a/f``
TOPS = {
    "whiteout": [whiteout("a")],
    "file": [file("a", "F")],
    "directory": [d("a"), file("a/g", "g")],
    "other-symlink": [sym("a", "y")],
    "opaque-root": [opaque(""), file("k", "k")],
}


@pytest.mark.parametrize("top", sorted(TOPS))
def test_a_layer_writes_through_a_symlink_an_upper_layer_replaces(tmp_path: Path, top: str) -> None:
    """``a/f`` of the middle layer is ``x/f``; the top layer's ``a`` (or whiteout) does not hide
    it (hpcsif hid it, or wrote it below the top layer's directory)."""
    layers = [
        layer(tmp_path, [d("x"), d("y"), sym("a", "x")]),
        layer(tmp_path, [file("a/f", "f"), whiteout("a/gone")]),
        layer(tmp_path, TOPS[top], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers)
    if top == "opaque-root":
        assert "/x/f" not in tree and "/a" not in tree
    else:
        assert tree["/x/f"] == "-rw-r--r-- 1" and "/a/f" not in tree and "/y/f" not in tree


def test_each_layer_writes_through_the_symlink_it_found(tmp_path: Path) -> None:
    """``a -> x``, a layer writing ``a/f``, ``a -> y`` over it, a layer writing ``a/g``: ``f``
    is in ``x``, ``g`` in ``y`` (both went where the topmost symlink pointed)."""
    layers = [
        layer(tmp_path, [d("x"), d("y"), sym("a", "x")]),
        layer(tmp_path, [file("a/f", "f")]),
        layer(tmp_path, [sym("a", "y")]),
        layer(tmp_path, [file("a/g", "gg")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers)
    assert tree["/x/f"] == "-rw-r--r-- 1" and tree["/y/g"] == "-rw-r--r-- 2" and tree["/a"] == "lrwxrwxrwx y"


@pytest.mark.parametrize("where", ["same-layer", "upper-layer", "other-directory"])
def test_entries_go_through_a_hard_link_to_a_symlink(tmp_path: Path, where: str) -> None:
    """``h`` hard-linked to symlink ``q/s -> ../x`` is a symlink ``../x``: ``h/f`` is ``x/f``
    (hpcsif made ``h`` a directory)."""
    base = [d("x"), d("q"), sym("q/s", "../x"), link("h", "q/s")]
    if where == "same-layer":
        layers = [layer(tmp_path, [*base, file("h/f", "f")])]
    elif where == "upper-layer":
        layers = [layer(tmp_path, base), layer(tmp_path, [file("h/f", "f"), whiteout("h/gone")], "zstd")]
    else:  # the link's target text names another place from the link's directory
        entries = [d("x"), d("q"), d("q/x"), sym("q/s", "x"), link("h", "q/s"), file("h/f", "f")]
        layers = [layer(tmp_path, entries)]
    tree = _build_and_compare(tmp_path, layers)
    assert tree["/x/f"] == "-rw-r--r-- 1" and tree["/h"] == tree["/q/s"] and "/h/f" not in tree


# one layer writes below the lower symlink ``q/a -> x`` and removes it; the order counts
IN_ORDER = {
    "write-then-whiteout": ([file("q/a/f", "f"), whiteout("q/a")], "/q/x/f"),
    "write-then-opaque": ([file("q/a/f", "f"), opaque("q")], "/q/x/f"),
    "whiteout-then-write": ([whiteout("q/a"), file("q/a/f", "f")], "/q/a/f"),
    "opaque-then-write": ([opaque("q"), file("q/a/f", "f")], "/q/a/f"),
}


@pytest.mark.parametrize("case", sorted(IN_ORDER))
def test_a_layer_writes_through_a_symlink_it_removes_until_it_removes_it(tmp_path: Path, case: str) -> None:
    """Before its whiteout or opaque marker, a layer's entry went through the lower symlink
    (hpcsif left it below a new directory ``q/a``); after it, it makes that directory."""
    entries, where = IN_ORDER[case]
    layers = [layer(tmp_path, [d("q"), d("q/x"), sym("q/a", "x")]), layer(tmp_path, entries, "zstd")]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert tree[where] == "-rw-r--r-- 1"


def test_hard_link_to_a_file_its_layer_makes_a_directory_fails(tmp_path: Path) -> None:
    """``a`` then ``a/x`` below it make ``a`` a directory; an upper hard link to ``a`` fails, as
    in Apptainer ('link: operation not permitted'); hpcsif linked the file while an upper
    layer had ``a/x`` too."""
    layers = [
        layer(tmp_path, [file("a", "A"), sym("a/x", "y")]),
        layer(tmp_path, [link("b", "a")]),
        layer(tmp_path, [file("a/x", "X")], "zstd"),
    ]
    _both_refuse(tmp_path, _archive(tmp_path, layers), ["hard link 'b' points at directory 'a'"], "link: ")


def test_a_file_takes_away_the_symlinks_below_its_name(tmp_path: Path) -> None:
    """``s/x -> ../a``, then a file ``s``, then ``s/x/z``: the file took ``s/x`` away, so ``s``
    becomes a directory again and ``s/x/z`` lands there (hpcsif followed the old symlink and
    then could not merge the layer)."""
    entries = [d("a"), sym("s/x", "../a"), file("s", "S"), sym("s/x/z", "../b"), file("k", "k")]
    tree = _build_and_compare(tmp_path, [layer(tmp_path, entries)], implied=True)
    assert tree["/s/x/z"] == "lrwxrwxrwx ../b" and "/a/z" not in tree


@pytest.mark.parametrize("lower", ["file", "directory"])
def test_hard_link_below_its_own_target_fails(tmp_path: Path, lower: str) -> None:
    """``a/y`` linked to ``a``: making ``a/`` for the link replaced the file ``a`` (or ``a`` is a
    directory), so the link fails as in Apptainer ('link: operation not permitted'); hpcsif
    linked the file where an upper layer had ``a/x``."""
    base = [file("a", "A")] if lower == "file" else [d("a")]
    layers = [
        layer(tmp_path, base),
        layer(tmp_path, [link("a/y", "a")]),
        layer(tmp_path, [file("a/x")], "zstd"),
    ]
    _both_refuse(tmp_path, _archive(tmp_path, layers), ["hard link 'a/y' points at directory 'a'"], "link: ")


@pytest.mark.parametrize("below", ["symlink", "file"])
def test_a_file_hidden_by_an_upper_directory_still_removes_its_layers_entries_below(
    tmp_path: Path, below: str
) -> None:
    """``a/y``, then a file ``a`` in one layer; ``a/x/z`` a layer up: the file took ``a/y`` away
    before the upper layer made ``a`` a directory again (hpcsif kept ``a/y``)."""
    entry = sym("a/y", "x") if below == "symlink" else file("a/y", "Y")
    layers = [layer(tmp_path, [entry, file("a", "A"), file("k")]), layer(tmp_path, [d("a/x/z")], "zstd")]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert "/a/y" not in tree and tree["/a/x/z"][0] == "d"


def test_hard_link_to_a_hidden_file_gets_the_content_it_had_then(tmp_path: Path) -> None:
    """``f`` twice, then a link to it, all hidden by an upper opaque directory: the link is the
    second ``f`` (hpcsif read the layer again and gave it the first)."""
    entries = [file("b/f", "first"), file("b/f", "2nd"), link("h", "b/f"), file("b/f", "third")]
    layers = [layer(tmp_path, entries), layer(tmp_path, [opaque("b"), file("k")], "zstd")]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert tree["/h"] == "-rw-r--r-- 3" and "/b/f" not in tree


# lower layer, upper layer: the upper layer's entries go through the lower symlinks
THROUGH_CHAINS = {
    # the upper layer's entries below a/x imply a directory there, which is the symlink
    "link-to-a-symlink-written-through": (
        [d("q"), sym("a/x", "/q")],
        [file("a/x/z", "22"), link("t/y", "a/x")],
        {"/q/z": "-rw-r--r-- 2", "/t/y": "lrwxrwxrwx /q"},
    ),
    # b/x is a/x, through b: the file replaces the directory a/x/z made, children and all
    "file-replaces-its-layers-directory-through-a-symlink": (
        [sym("b", "/a")],
        [file("a/x/z", "1"), file("b/x", "22")],
        {"/a/x": "-rw-r--r-- 2"},
    ),
    # a/x/z went through a -> / before the layer replaced a (hpcsif's pre-scan dropped it)
    "entry-then-its-symlink-replaced": (
        [sym("a", "/")],
        [file("x/keep"), file("a/x/z", "1"), sym("a", "/a")],
        {"/x/z": "-rw-r--r-- 1", "/a": "lrwxrwxrwx /a"},
    ),
    # .. after a symlink leaves the directory it names, as securejoin resolves it (hpcsif
    # resolved a -> x/../y to y)
    "dotdot-after-a-symlink": (
        [d("p"), d("p/q"), sym("x", "p/q"), sym("a", "x/../y")],
        [file("a/f", "f")],
        {"/p/y/f": "-rw-r--r-- 1"},
    ),
    # s is a hard link to the symlink a/x -> /a: s/x/z is a/z (hpcsif: 'missing file')
    "link-target-through-a-linked-symlink": (
        [sym("a/x", "/a"), link("s", "a/x")],
        [file("a/x/z", "22"), link("a/y", "s/x/z")],
        {"/a/z": "-rw-r--r-- 2", "/a/y": "-rw-r--r-- 2"},
    ),
    # s/x is a/x through s, which the directory replaces; then s itself is replaced
    "symlink-replaced-before-an-entry-below-it": (
        [sym("a/x", "/a"), link("s", "a/x")],
        [d("s/x"), E("s", "fifo"), d("s/x/z")],
        {"/s/x/z": "drwxr-xr-x ", "/a/x": "drwxr-xr-x "},
    ),
}


@pytest.mark.parametrize("case", sorted(THROUGH_CHAINS))
def test_entries_through_lower_symlinks_land_as_in_apptainer(tmp_path: Path, case: str) -> None:
    """Each failed or differed before (see the comments)."""
    lower, upper, expected = THROUGH_CHAINS[case]
    layers = [layer(tmp_path, lower), layer(tmp_path, upper, "zstd")]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert {path: tree.get(path) for path in expected} == expected


def test_a_file_its_layer_makes_a_directory_stays_one_below_an_upper_opaque_marker(tmp_path: Path) -> None:
    """``b`` then ``b/x`` make ``b`` a directory, which the upper opaque marker empties; hpcsif
    kept the file ``b``."""
    layers = [
        layer(tmp_path, [file("b", "333"), d("b/x")]),
        layer(tmp_path, [opaque("b"), file("k")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert tree["/b"][0] == "d" and "/b/x" not in tree


def test_hard_link_to_a_link_whose_target_is_replaced_later(tmp_path: Path) -> None:
    """``s`` links the lower symlink ``t/y``, a directory then replaces ``t/y``, ``a/x`` links
    ``s``: it is that symlink too (hpcsif: 'points at directory')."""
    layers = [
        layer(tmp_path, [sym("t/y", "/")]),
        layer(tmp_path, [link("s", "t/y"), d("t/y"), link("a/x", "s")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert tree["/s"] == tree["/a/x"] == "lrwxrwxrwx /" and tree["/t/y"][0] == "d"


def test_hard_link_to_a_lower_file_its_layer_made_a_directory_fails(tmp_path: Path) -> None:
    """``a/x/z`` made the lower file ``a`` a directory before ``b/x`` links it: Apptainer fails
    ('link: operation not permitted'); hpcsif linked the file where an upper layer had ``a/x``."""
    layers = [
        layer(tmp_path, [file("a", "A")]),
        layer(tmp_path, [file("a/x/z", "22"), link("b/x", "a")]),
        layer(tmp_path, [d("a/x")], "zstd"),
    ]
    _both_refuse(tmp_path, _archive(tmp_path, layers), ["hard link 'b/x' points at directory 'a'"], "link: ")


def test_a_layer_that_empties_the_root_through_a_symlink_removes_a_looping_one(tmp_path: Path) -> None:
    """``t -> /`` makes ``t/.wh..wh..opq`` an opaque root, which removes ``a -> a/x`` before the
    layer's ``a/x/.wh.z`` could loop through it (hpcsif: 'too many levels of symbolic links')."""
    layers = [
        layer(tmp_path, [sym("t", "/"), sym("a", "a/x"), file("gone")]),
        layer(tmp_path, [opaque("t"), whiteout("a/x/z"), file("k")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers)
    assert not {"/a", "/t", "/gone"} & set(tree) and tree["/k"] == "-rw-r--r-- 0"


@pytest.mark.parametrize("last", ["directory", "file"])
def test_hard_link_to_what_a_lower_layer_ends_with(tmp_path: Path, last: str) -> None:
    """The lower layer has file ``t`` twice, then ``t/y`` (``t`` is a directory: the upper link
    fails as in Apptainer; hpcsif linked the lower symlink ``t`` that the file had replaced),
    or then ``t`` again (a file: the link is that file)."""
    ending = [sym("t/y", "t")] if last == "directory" else [sym("t/y", "t"), file("t", "333")]
    layers = [
        layer(tmp_path, [sym("t", "a/x")]),
        layer(tmp_path, [file("t", "dup"), file("t", "22"), *ending]),
        layer(tmp_path, [link("b", "t")], "zstd"),
    ]
    if last == "directory":
        _both_refuse(
            tmp_path, _archive(tmp_path, layers), ["hard link 'b' points at directory 't'"], "link: "
        )
    else:
        tree = _build_and_compare(tmp_path, layers)
        assert tree["/b"] == tree["/t"] == "-rw-r--r-- 3"


def test_a_layer_that_repeats_names_keeps_its_replaced_symlinks_and_link_targets(tmp_path: Path) -> None:
    """A layer that must be merged twice (``t`` then ``t/y``) skips its replaced members the
    second time: entries below the symlink ``a`` still go through it (hpcsif: 'cannot be
    merged'), and a replaced link to the replaced symlink ``c/x`` still had its target (hpcsif:
    'points at missing file')."""
    entries = [file("t", "333"), sym("a", "b"), file("a/x", "22"), sym("c/x", "s/x"), link("s/x", "c/x")]
    entries += [E("t/y", "fifo"), file("a", "22"), file("s", "3"), file("c/x", "1")]
    tree = _build_and_compare(tmp_path, [layer(tmp_path, entries)], implied=True)
    assert tree["/b/x"] == "-rw-r--r-- 2" and tree["/a"] == "-rw-r--r-- 2" and tree["/t/y"][0] == "p"
    assert tree["/c/x"] == "-rw-r--r-- 1" and tree["/s"] == "-rw-r--r-- 1"


def test_hard_link_below_a_file_an_earlier_layer_made_fails(tmp_path: Path) -> None:
    """``a`` replaced the directory ``a/`` below: ``b`` linked to ``a/y`` fails as in Apptainer
    ('link: not a directory'), though the link's own layer replaces ``a`` afterwards (hpcsif
    linked the removed ``a/y``)."""
    layers = [
        layer(tmp_path, [file("a/y", "1")]),
        layer(tmp_path, [file("a", "333")]),
        layer(tmp_path, [link("b", "a/y"), file("a")], "zstd"),
    ]
    _both_refuse(
        tmp_path, _archive(tmp_path, layers), ["hard link 'b' points at missing file 'a/y'"], "link: "
    )


def test_hard_link_to_a_name_a_directory_held_for_a_while(tmp_path: Path) -> None:
    """``s`` a file, a directory, a file again: the upper link is the last file (hpcsif: 'points
    at directory')."""
    layers = [
        layer(tmp_path, [file("s", "dup"), d("s"), file("s", "1")]),
        layer(tmp_path, [link("b/x", "s")]),
    ]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert tree["/b/x"] == tree["/s"] == "-rw-r--r-- 1"


def test_names_that_take_symlinks_away_over_many_symlinks_take_linear_time(tmp_path: Path) -> None:
    """8,000 symlinks, then 8,000 times ``a/x -> y`` and a file ``a`` (90 KiB of layer): each
    file looked at every symlink of the layer for those below ``a``, 13 s (Apptainer: 3 s)."""
    import time

    entries = [sym(f"z/s{i}", "x") for i in range(8000)]
    for _ in range(8000):
        entries += [sym("a/x", "y"), file("a")]
    archive = _archive(tmp_path, [layer(tmp_path, entries, "zstd")])
    start = time.monotonic()
    p = _hpcsif_build(tmp_path / "x.sif", archive)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - start < 10


def test_hard_link_to_a_lower_file_its_layer_then_takes_away_fails(tmp_path: Path) -> None:
    """``a/x/z``, then a file ``a`` took it away: the upper link to it fails as in Apptainer
    ('link: not a directory'; hpcsif linked it where the upper layer has ``a/x``)."""
    layers = [
        layer(tmp_path, [file("a/x/z", "1"), file("a", "dup")]),
        layer(tmp_path, [link("c", "a/x/z"), sym("a/x", "t")], "zstd"),
    ]
    _both_refuse(
        tmp_path, _archive(tmp_path, layers), ["hard link 'c' points at missing file 'a/x/z'"], "link: "
    )


def test_hard_link_below_a_file_that_its_layer_replaces_later_fails(tmp_path: Path) -> None:
    """``t`` (a file then, replaced by another file later) stands where the link's ``t/y`` is:
    Apptainer fails ('link: not a directory'); hpcsif, merging the layer a second time (``a``
    becomes a directory) without the first ``t``, linked the lower ``t/y``."""
    layers = [
        layer(tmp_path, [file("t/y", "Y")]),
        layer(tmp_path, [file("a", "22"), file("t", "1"), link("a/y", "t/y"), file("t")], "zstd"),
    ]
    error = ["hard link 'a/y' points at missing file 't/y'"]
    _both_refuse(tmp_path, _archive(tmp_path, layers), error, "link: ")


def test_a_symlink_its_layer_takes_away_after_a_second_pass_is_no_way_through(tmp_path: Path) -> None:
    """``a/x -> s/x`` (through ``s -> a``), then the file ``a`` takes it away, in a layer merged
    twice: the upper ``a/x/z`` is a file in a new ``a/x`` (hpcsif went through the removed
    symlink, learnt in the pass that the layer's repeated names cut short)."""
    lower = [file("a/y", "dup"), sym("s", "a"), sym("s/x", "s/x"), d("a/y"), file("a", "22")]
    layers = [layer(tmp_path, lower), layer(tmp_path, [file("a/x/z", "333")], "zstd")]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert tree["/a/x/z"] == "-rw-r--r-- 3" and "/a/s" not in tree


def test_a_whiteout_above_the_layer_that_removed_the_symlink_is_not_written_through(tmp_path: Path) -> None:
    """``t -> /``; ``t/.wh..wh..opq`` (an opaque root, which removes ``t``) and ``t/y``; then
    ``t/.wh.y`` a layer up removes that ``t/y`` (hpcsif wrote the whiteout through ``t``)."""
    layers = [
        layer(tmp_path, [sym("t", "/")]),
        layer(tmp_path, [opaque("t"), sym("t/y", "/../a/x")]),
        layer(tmp_path, [whiteout("t/y"), file("k")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert "/t/y" not in tree and tree["/t"][0] == "d"


def test_entries_go_through_a_hard_link_to_a_lower_symlink(tmp_path: Path) -> None:
    """``t`` hard-linked to the lower symlink ``c -> x`` is that symlink: a layer above writes
    ``t/f`` into ``x`` (hpcsif made ``t`` a directory)."""
    layers = [
        layer(tmp_path, [d("x"), sym("c", "x")]),
        layer(tmp_path, [link("t", "c")]),
        layer(tmp_path, [file("t/f", "f")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers)
    assert tree["/t"] == "lrwxrwxrwx x" and tree["/x/f"] == "-rw-r--r-- 1"


def test_passes_that_disagree_on_a_lower_symlink_end(tmp_path: Path) -> None:
    """A layer that repeats ``a`` (content, then a symlink ``a -> t``) under a layer that whites
    out ``a/x``, then ``a``: each pass undid what the one before learnt of ``a``, and the build
    failed after 16 ('could not be merged'); Apptainer builds it."""
    layers = [
        layer(tmp_path, [file("a", "dup"), sym("a", "t"), file("k")]),
        layer(tmp_path, [whiteout("a/x"), whiteout("a")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers)
    assert "/a" not in tree and tree["/k"] == "-rw-r--r-- 0"


def test_hard_link_to_a_file_that_replaced_a_directory_in_its_layer(tmp_path: Path) -> None:
    """``t/y`` then the file ``t``: the upper link to ``t`` is that file (hpcsif: 'points at
    directory', from the directory ``t/y`` implied before the file replaced it)."""
    layers = [
        layer(tmp_path, [d("t/y"), file("t", "22")]),
        layer(tmp_path, [link("c", "t")]),
        layer(tmp_path, [file("t", "333")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers)
    assert tree["/c"] == "-rw-r--r-- 2" and tree["/t"] == "-rw-r--r-- 3"


def test_a_directory_before_the_symlink_at_its_name_leaves_it_a_way_through(tmp_path: Path) -> None:
    """``a/`` then ``a -> c`` in one layer; ``s/x`` through ``s -> a`` a layer up lands in
    ``c`` (hpcsif took the directory, which came first, for a replacement of the symlink)."""
    layers = [
        layer(tmp_path, [sym("s", "../../../a"), d("a"), sym("a", "c")]),
        layer(tmp_path, [sym("s/x", "/../a/x"), whiteout("a")], "zstd"),
    ]
    tree = _build_and_compare(tmp_path, layers, implied=True)
    assert tree["/c/x"] == "lrwxrwxrwx /../a/x" and "/a" not in tree
