"""Reading OCI/Docker layer blobs and merging them into one root filesystem.

:func:`flatten` streams the merged root filesystem of an image as a single POSIX (PAX)
tar archive — the input of ``tar2sqfs`` — and :func:`extract_tree` writes the same merge
into a directory (``build --sandbox``). Neither ever holds a whole layer in memory.

Merge model (overlayfs semantics, what Docker's overlay2 and Podman show at run time):
layers are read **top-down**. A path emitted by an upper layer hides the same path in
lower layers; an upper non-directory at ``P`` hides everything below ``P``; an upper
directory merges with a lower one (the upper attributes win), but not past a non-directory
at ``P`` in between, which removed what the layers under it had below ``P``; ``.wh.NAME`` hides ``NAME``
and ``.wh..wh..opq`` hides all lower children of its directory. Whiteouts apply only to
lower layers and never appear in the output (an opaque directory stays, empty). A layer
that has ``a/b`` (or a whiteout ``a/.wh.b``) but no entry ``a``
over a lower *symlink* ``a`` (a usr-merge ``bin -> usr/bin``) writes through it, inside the
root, as Apptainer (umoci), containerd and Podman extract layers: ``a/b`` lands at
``usr/bin/b`` and the symlink stays. Each layer writes through the symlink it met when it
was extracted: the nearest lower one that no layer in between replaced or removed (the layer
that replaces or whites it out does until it does), whatever upper layers do to it later. The
merge is top-down, so it learns of such a symlink only when it reaches the lower layer: it
remembers it and asks for another pass (:class:`~hpcsif.errors.WriteThroughError`). An upper
*explicit* directory ``a`` replaces the lower symlink, as tar extraction does. A hard link
to a symlink is that symlink (its target read from the link's directory). Symlinks are
followed component by component as securejoin follows them: ``..`` after a symlink leaves
the directory it named, not the symlink's own directory. AUFS bookkeeping entries
(``.wh..wh.aufs``, ``.wh..wh.plnk`` …) are skipped, but not what lies below them, as in
Apptainer: AUFS keeps hard-linked files in ``.wh..wh.plnk``, and hard links may point
there. Directories are written last, once each, with the attributes of the topmost layer that has them.

Duplicates inside one layer: the last entry wins, like tar extraction. Entries without
content (directories, symlinks, FIFOs, empty files, hard links) are held back until the
end of their layer so they can be replaced. A regular file *with content*, or a directory
(with the children written since), that a later entry of the same layer replaces cannot
be taken back from the stream: the layer is then pre-scanned for the members that later
ones replace (earlier occurrences of a name, and what lies below a name a later
non-directory takes) and :class:`~hpcsif.errors.DuplicateEntryError` asks for a second
pass, which skips them (``squashfs_from_tar`` and :func:`extract_tree` retry by
themselves). Such layers are rare (``tar -r``). Hard links made to an entry before a later
entry of their layer replaces it keep the old entry, as tar extraction leaves them the old
inode: it goes under the first link's name (the pre-scan names it), the other links link there.

Hard links: a link whose target is earlier in the same layer becomes a hard link in the
output; if that target is hidden by an upper layer, the layer is read again to give the
link the hidden target's content. A link whose target is not earlier in its own layer
resolves to the nearest lower layer that has the target (a later entry of its own layer at
that path is a new file, as in tar extraction).

Permissions (like Apptainer's fix-perms): every file becomes readable by all (and
executable by all where any execute bit is set), every directory readable and traversable
by all; setuid and setgid bits are removed (they are never usable in a container),
sticky bits are kept. Character and block devices are dropped (counted in
``FlattenStats.skipped["device"]``), and so are hard links to them, yet they hide what
lower layers have at their paths; FIFOs are kept; an entry of unknown type is a
``LayerError``. Extended attributes (file capabilities, SELinux labels) are dropped like
setuid bits. Owners and mtimes are kept.

Hostile layers, decided per case:

* absolute names and leading ``./`` are normalised into the root (``/etc/x`` is ``etc/x``),
  and so are names and hard-link targets whose ``..`` components would leave it (``..`` at
  the root is the root, as in Apptainer and Docker: ``../../x`` is ``x``);
* a name component longer than 255 bytes -> ``LayerError`` (no file system can hold it);
* a symlink target of 4096 bytes or more -> ``LayerError`` (``symlink(2)`` refuses it);
* an entry below a symlink of the *same* layer (even one an upper layer hides) goes where
  the symlink points, resolved inside the root, as Apptainer (umoci, securejoin) extracts
  it; below another non-directory of the same layer it replaces that with a directory, as
  Apptainer's extraction does; below a non-directory of an *upper* layer it is hidden;
* a hard link to a missing target, to a directory or to itself -> ``LayerError``; so is one
  to a file that a whiteout, an opaque directory or a non-directory of its own layer (before
  it) or of a layer between it and the target removed, as in Apptainer, which extracts layer
  after layer: the link would bring back a file the image deleted. A directory that replaces
  a non-directory of its own layer starts empty (the non-directory removed the lower one);
  a hard link that a later entry or an upper layer replaces still needs its target;
* an entry placed through more than 255 symlinks (Apptainer's securejoin limit), a damaged
  tar header after the first member, or a PAX path with a NUL byte -> ``LayerError`` (tarfile
  would take the bad header for the end of the layer and cut the name at the NUL);
* sparse files whose holes add up to over :data:`~hpcsif.image.sinks.MAX_HOLES` in one SIF -> ``LayerError``
  (``tar2sqfs`` reads holes as zeros: a 300-byte layer could keep it busy for hours);
* symlink targets are kept verbatim: absolute targets resolve inside the container at run
  time, and :func:`extract_tree` never follows a symlink while writing (``O_NOFOLLOW`` and
  directory file descriptors), so no entry can be written outside ``dest``.

Each layer is read through :mod:`hpcsif.image.layer_stream` (decompressed, its digests checked
while it streams) and :mod:`hpcsif.image.tar_members` (its members read as Go's archive/tar
reads them, names normalised into the root, modes made Apptainer's); the merged entries go
to one of the sinks of :mod:`hpcsif.image.sinks` (a tar stream or a directory).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from sys import intern
from typing import BinaryIO, NamedTuple, TypeVar

from hpcsif.errors import (
    DuplicateEntryError,
    LayerError,
    MergeAgainError,
    WriteThroughError,
)
from hpcsif.image.layer_stream import LayerBlob, LayerStream
from hpcsif.image.sinks import WIDE_DIRECTORY as WIDE_DIRECTORY  # for the consumers of flatten()
from hpcsif.image.sinks import DirSink, FlattenStats, Sink, TarSink
from hpcsif.image.tar_members import (
    PATH_MAX,
    RefusedMember,
    ancestors,
    follow_links,
    member_data,
    member_kind,
    normalise_name,
    open_tar,
)

log = logging.getLogger(__name__)

# bytes of the directory paths that an image's entries imply: a hundred deeply nested entries
# (a few KiB of layer) implied 200,000 directories of 2 KiB paths, 800 MiB of memory
_MAX_DIR_PATH_BYTES = 256 << 20

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_AUFS_META = ".wh..wh."


@dataclass(frozen=True)
class ExtraFile:
    """A file, directory (``data is None``) or symlink laid over all layers.

    With ``under`` it is laid under all layers instead: it appears only where the image
    has nothing at that path (Apptainer's base directories such as ``/var/tmp``).
    """

    path: str
    data: bytes | None = None
    mode: int = 0o644
    symlink: str | None = None
    under: bool = False


# ---------------------------------------------------------------------------------------
# the merge

_EMITTED = 1  # per-layer state of a non-directory path: written (or held back) …
_HIDDEN = 2  # … or hidden by an upper layer; a str is the path a hard link points at
_DEVICE = 3  # … or a device node (dropped, and so are hard links to it)
_ROOT_DEFAULT = tarfile.TarInfo(".")
_ROOT_DEFAULT.type, _ROOT_DEFAULT.mode = tarfile.DIRTYPE, 0o755


class _Layer:
    """Book-keeping for the layer being read."""

    def __init__(self, level: int, blob: LayerBlob) -> None:
        self.level = level
        self.blob = blob
        self.label = blob.label
        self.state: dict[str, int | str] = {}
        self.held: dict[str, tuple[tarfile.TarInfo, str]] = {}  # contentless entries, replaceable
        self.written: set[str] = set()  # regular files whose content is already out
        self.links: dict[str, str] = {}  # hard links (name -> target), replaceable
        self.linked: set[str] = set()  # the targets in links (and maybe some no longer there)
        self.ordinal = -1  # the member being merged
        self.hidden_at: dict[str, int] = {}  # hidden non-directories -> their member's ordinal
        # hidden link targets (their ordinals: the member there when the link was made) -> links
        self.rereads: dict[int, list[str]] = {}
        self.whiteouts: set[str] = set()
        self.opaque: set[str] = set()
        # ordinals of the members a later member of this layer replaces (known after a pre-scan)
        self.repeats = _REPEATS.get((str(blob.path), blob.offset, blob.digest), _Repeats())
        self.replaced = self.repeats.replaced
        self.replaced_nondirs: set[str] = set()  # names of replaced non-directories skipped so far
        self.skipped_live: set[str] = set()  # … of those, the ones no later entry replaced yet
        # this layer's symlinks, and hard links to them, which are symlinks too -> their targets
        self.symlinks = _Symlinks()
        # hard links to a target not (yet) in this layer -> [(name, layer)]: they wait for the
        # layers below from the end of this one (a later entry of this layer is no target)
        self.awaiting: dict[str, list[tuple[str, str]]] = {}
        # what the layer did, for the symlinks of lower layers (_Merger.below, .touched): the
        # paths it put entries below before it replaced or removed them (and those it did so
        # first), and the paths it put an entry at (-> whether all were directories)
        self.below: set[str] = set()
        self.late: set[str] = set()
        self.parents: set[str] = set()  # the directories the layer's visible entries lie in
        self.deep_first: set[str] = set()  # … of those, the ones its first entry below was deeper in
        # non-directories an upper layer makes directories: their attributes go to the directory
        # if the first entry below them (of this layer, else of the upper ones) is right below
        self.lent: dict[str, tuple[tarfile.TarInfo, str]] = {}
        self.touched: dict[str, bool] = {}
        # targets in lower layers of hard links that a later entry of this layer replaced: the
        # link needs no content, yet extraction made it, so the target must be there
        self.required: dict[str, tuple[str, str]] = {}
        # the targets of upper layers' hard links found in this layer -> (a link, its layer): a
        # later entry of the layer that makes one a directory fails them, as in Apptainer
        self.resolved: dict[str, tuple[str, str]] = {}
        self.resolved_in: set[str] = set()  # the directories they lie in
        self.pending_dirs: set[str] = set()  # … and those it has directories at

    def note_below(self, name: str) -> None:
        """Note that the layer put an entry (or a whiteout, a hard link's target) at ``name``."""
        parent = name.rpartition("/")[0]
        if parent in self.below or parent in self.late:  # so are all above it
            return
        gone = "" in self.opaque  # what lower layers have at the ancestor is gone
        for anc in ancestors(name):
            if anc not in self.below and anc not in self.late:  # interned: the merge's tables share it
                (self.late if gone or anc in self.touched or anc in self.whiteouts else self.below).add(
                    intern(anc)
                )
            gone = gone or anc in self.whiteouts or anc in self.opaque or self.touched.get(anc) is False

    def resolve(self, target: str, link: tuple[str, str]) -> None:
        """Note that ``target``, here, is what the upper hard link ``link`` (name, layer) links."""
        self.resolved.setdefault(target, link)
        self.resolved_in.update(ancestors(target))

    def track_symlink(self, name: str, kind: str, text: str | None) -> None:
        """Note entry ``name`` (of ``kind``; a symlink to ``text``, or a hard link to one): the
        layer's later entries below a symlink go where it points, even where it is hidden or a
        later entry replaces it."""
        if text is not None:
            self.symlinks.put(name, text)
        else:
            self.symlinks.forget(name)
            if kind != "dir":  # a non-directory took those below it away
                self.symlinks.forget_below(name)

    def note(self, name: str, is_dir: bool) -> None:
        """Note that the layer put an entry at ``name`` (a directory: ``is_dir``)."""
        self.note_below(name)
        self.touched[name] = self.touched.get(name, True) and is_dir

    def removed(self, path: str) -> bool:
        """True if the layer so far put an entry or a whiteout at ``path``, or a whiteout, an
        opaque marker or a non-directory above it: what lower layers have there is gone."""
        if path in self.touched or path in self.whiteouts or "" in self.opaque:
            return True
        return any(
            anc in self.whiteouts or anc in self.opaque or self.touched.get(anc) is False
            for anc in ancestors(path)
        )


_Progress = Callable[[int, int], None]

# The members of a layer that later members replace, found by a pre-scan once the stream
# met a replacement it could not take back: the next pass over that layer (layers are
# immutable blobs) skips them. Keyed by the blob's identity; values are member ordinals.
_REPEATS: dict[tuple[str, int, str | None], _Repeats] = {}
_MAX_REPEATS = 64
# For an image (its layers' identities): the lower symlinks that upper layers write through,
# path -> where it points and which layers wrote through it
_THROUGH: dict[tuple[tuple[str, int, str | None], ...], dict[str, list[_Through]]] = {}
# … and (path, level) of those that changed after they were learnt: they change no more
_SETTLED: dict[tuple[tuple[str, int, str | None], ...], set[tuple[str, int]]] = {}


class _Through(NamedTuple):
    """A lower symlink that layers write through: the level of its layer, its target (as
    written), and the level of the nearest layer above that replaced or removed it
    (0: none did). Only the layers in between met it while they were extracted."""

    level: int
    text: str
    upto: int

    def applies(self, lay: _Layer, path: str) -> bool:
        """True if layer ``lay`` met the symlink at ``path``: a layer between it and the one that
        replaced or removed it (that one too), until the layer replaced or removed it itself."""
        return lay.level > 0 and self.upto <= lay.level < self.level and not lay.removed(path)


class _Repeats(NamedTuple):
    """What a pre-scan of a layer found (member ordinals): the members later ones replace; of
    those, the files that hard links made before the replacement keep (the ordinal -> the
    name of the first such link, which becomes the file: ``kept``); those first links
    (``absorbed``), and the other links, which now point at that name (``retarget``)."""

    replaced: frozenset[int] = frozenset()
    kept: dict[int, str] = {}
    absorbed: frozenset[int] = frozenset()
    retarget: dict[int, str] = {}
    # replaced non-directories that a member below replaces -> whether it lies right below
    parents: dict[int, bool] = {}


class _Symlinks(dict[str, str]):
    """The symlinks of a layer (path -> target), indexed by the directories they lie in: a
    non-directory takes those below its name away (a hostile layer can alternate thousands
    of such names with thousands of symlinks elsewhere)."""

    def __init__(self) -> None:
        super().__init__()
        self._below: dict[str, set[str]] = {}

    def put(self, name: str, text: str) -> None:
        """Note the symlink ``name`` -> ``text``."""
        if name not in self:
            for anc in ancestors(name):
                self._below.setdefault(anc, set()).add(name)
        self[name] = text

    def forget(self, name: str) -> None:
        """``name`` is no symlink (any more)."""
        if self.pop(name, None) is None:
            return
        for anc in ancestors(name):
            below = self._below[anc]
            below.discard(name)
            if not below:
                del self._below[anc]

    def forget_below(self, name: str) -> None:
        """Forget the symlinks below ``name``."""
        for path in list(self._below.get(name, ())):
            self.forget(path)


def _scan_repeats(lay: _Layer, through: Callable[[str, _Layer], str | None] | None) -> _Repeats:
    """The members of layer ``lay`` that a later member replaces, as tar extraction does
    (``through`` gives the targets of the lower symlinks that the layer writes through).

    An earlier occurrence of a name is replaced by the last one; a later non-directory also
    removes what the layer put below that name before it (a directory replaced by a file).
    A hard link made to a file before the file is replaced keeps the replaced file's content.
    """
    blob = lay.blob
    seen = _Layer(lay.level, blob)  # what the layer removed so far, for ``through``
    names: list[tuple[str, bool]] = []
    symlinks: set[int] = set()  # what lies below a symlink of the layer goes through it
    texts = _Symlinks()  # the layer's symlinks so far -> their targets
    link_ordinals: dict[str, list[int]] = {}  # hard link target -> the links' ordinals
    links: dict[str, str] = {}  # hard link name -> the name of the file it ultimately names

    def symlink(path: str) -> str | None:
        text = texts.get(path)
        return through(path, seen) if text is None and through else text

    def placed(path: str) -> str:
        return follow_links(path, symlink, blob.label) if texts or through else path

    stream = LayerStream(blob, verify=False)
    try:
        with open_tar(stream) as tf:
            for i, ti in enumerate(tf):
                tf.members.clear()
                name = placed(normalise_name(ti.name, blob))  # as the merge places it
                if through:
                    parent, base = posixpath.split(name)
                    if base == OPAQUE_MARKER:
                        seen.opaque.add(parent)
                    elif base.startswith(WHITEOUT_PREFIX):
                        seen.whiteouts.add(posixpath.join(parent, base[len(WHITEOUT_PREFIX) :]))
                    else:
                        seen.touched[name] = seen.touched.get(name, True) and ti.isdir()
                names.append((name, ti.isdir()))
                links.pop(name, None)
                text = ti.linkname if ti.issym() else None
                if ti.islnk():
                    target = placed(normalise_name(ti.linkname, blob))
                    text = texts.get(target)  # a link to a symlink is one too
                    target = links.get(target, target)
                    links[name] = target
                    link_ordinals.setdefault(target, []).append(i)
                if text is not None:
                    symlinks.add(i)
                    texts.put(name, text)
                else:
                    texts.forget(name)
                    if not ti.isdir():  # a non-directory takes those below it away
                        texts.forget_below(name)
    finally:
        stream.close()
    last: dict[str, int] = {}
    last_nondir: dict[str, int] = {}
    last_below: dict[str, int] = {}  # name -> the last member below it
    for i, (name, is_dir) in enumerate(names):
        last[name] = i
        if not is_dir:
            last_nondir[name] = i
        if not posixpath.basename(name).startswith(WHITEOUT_PREFIX):  # whiteouts need no directory
            for anc in ancestors(name):
                last_below[anc] = i
    replaced = frozenset(
        i
        for i, (name, is_dir) in enumerate(names)
        # replaced by a later occurrence (a directory over a directory merges), by the
        # directory a later member below it needs, or removed with an ancestor that a later
        # non-directory replaces
        if (last[name] != i and not (is_dir and names[last[name]][1]))
        or (not is_dir and i not in symlinks and last_below.get(name, -1) > i)
        or any(last_nondir.get(anc, -1) > i for anc in ancestors(name))
    )
    kept: dict[int, str] = {}
    absorbed: set[int] = set()
    retarget: dict[int, str] = {}
    parents: dict[int, bool] = {}
    # walking back: name -> the ordinal of its next occurrence, of its next non-directory
    following: dict[str, int] = {}
    following_nondir: dict[str, int] = {}
    following_below: dict[str, int] = {}
    for i in range(len(names) - 1, -1, -1):
        name, is_dir = names[i]
        # the member is gone at its next occurrence, at the next member below it (a directory
        # replaces it), or where a non-directory takes an ancestor
        below = following_below.get(name, len(names) + 1)
        end = min(
            [following.get(name, len(names)), below]
            + [following_nondir[anc] for anc in ancestors(name) if anc in following_nondir]
        )
        # a directory is made for a member below it (before anything else ends it)
        becomes_parent = end == below
        following[name] = i
        if not is_dir:
            following_nondir[name] = i
        if not posixpath.basename(name).startswith(WHITEOUT_PREFIX):
            for anc in ancestors(name):
                following_below[anc] = i
        if is_dir or i not in replaced:
            continue
        if becomes_parent:  # … which takes its attributes if the member lies right below it
            parents[i] = posixpath.dirname(names[below][0]) == name
        keepers = [j for j in link_ordinals.get(name, ()) if i < j < end and j not in replaced]
        if keepers:
            host = names[keepers[0]][0]
            kept[i] = host
            absorbed.add(keepers[0])
            retarget.update((j, host) for j in keepers[1:])
    return _Repeats(replaced, kept, frozenset(absorbed), retarget, parents)


class _Merger:
    """Top-down overlay merge of layers into a sink (see the module docstring)."""

    def __init__(self, sink: Sink, stats: FlattenStats, total: int, progress: _Progress | None) -> None:
        self.sink = sink
        self.stats = stats
        self.total = total
        self.progress = progress
        self.done_in = 0
        # path -> level * 2 + is_dir, for every path an upper layer (or this one) claimed
        self.claims: dict[str, int] = {}
        self.claimed_dir_bytes = 0  # the length of the directory paths in claims
        self.dirs: dict[str, tuple[int, tarfile.TarInfo]] = {}  # explicit directory attributes
        self.hidden: set[str] = set()  # whiteouts of the layers above
        self.opaque: set[str] = set()
        self.deep_first: set[str] = set()  # see _Layer.deep_first and _directory_from
        self.pending: dict[str, list[tuple[str, str]]] = {}  # lower link target -> [(name, layer)]
        self.required: dict[str, tuple[str, str]] = {}  # lower targets of replaced links (_Layer)
        self.links: list[tuple[str, str]] = []
        self.through: dict[str, list[_Through]] = {}  # lower symlinks known to be written through
        # hard links to directories or removed files, unless the pass turns out to need another (lower
        # symlinks written through, a layer that repeats names): raised at the end of the pass
        self.deferred: list[str] = []
        self.found: dict[str, list[_Through]] = {}  # … and those this pass found
        self.levels: dict[str, int] = {}  # layer label -> its level (the topmost, if repeated)
        # hard links to lower targets -> the lowest layer above them that replaced their name
        self.link_upto: dict[str, int] = {}
        self.dropped: set[tuple[str, int]] = set()  # … and (path, level) of those it found replaced
        # for the symlinks of lower layers, what the layers read so far did at a path, each the
        # lowest such layer: put entries, whiteouts or hard-link targets below it (-> level),
        # an entry or a whiteout at it (-> level * 2 + is_dir), an opaque marker in it (-> level)
        self.below: dict[str, int] = {}
        self.touched: dict[str, int] = {}
        self.opaque_at: dict[str, int] = {}

    def _lower_symlink(self, path: str, lay: _Layer) -> str | None:
        """The target of the lower symlink at ``path`` if layer ``lay`` writes through it."""
        return next((hit.text for hit in self.through.get(path, ()) if hit.applies(lay, path)), None)

    def _placed(self, path: str, lay: _Layer) -> str:
        """Where ``path`` (root-relative) of layer ``lay`` lies: through the symlinks among its
        parents, the layer's own and the lower ones it writes through."""
        if not lay.symlinks and not self.through:
            return path

        def symlink(parent: str) -> str | None:
            text = lay.symlinks.get(parent)
            return self._lower_symlink(parent, lay) if text is None and self.through else text

        left: list[str] = []
        placed = follow_links(path, symlink, lay.label, left)
        for directory in left:  # if a lower symlink, the layer wrote through it
            lay.note_below(f"{directory}/")
        return placed

    # -- visibility ----------------------------------------------------------------------

    def _blocked(self, name: str, lay: _Layer) -> str | None:
        """Why ``name`` of layer ``lay`` is hidden by an ancestor, or None."""
        reason = "whiteout" if "" in self.opaque and name else None
        for anc in ancestors(name):
            if reason is None and (anc in self.hidden or anc in self.opaque):
                reason = "whiteout"  # yet a non-directory of the layer above it becomes a directory
            claim = self.claims.get(anc)
            if claim is not None and not claim & 1:
                if claim >> 1 != lay.level:
                    return reason or "shadowed"
                # below a non-directory of its own layer: Apptainer's extraction replaces that
                # with a directory (hpcsif refused the layer)
                held = lay.held.get(anc)
                self._take_back(lay, anc, False)
                if held is not None:
                    self._directory_from(lay, anc, *held, right_below=name.rpartition("/")[0] == anc)
                lay.state.pop(anc, None)  # a directory now: a hard link to it fails
                self.claims[anc] = lay.level * 2 + 1
                lay.opaque.add(anc)  # what the layers below had there went with the non-directory
        if name in self.hidden:
            return "whiteout"
        return reason

    def _claim_unhidden_parents(self, name: str, lay: _Layer) -> None:
        """The parent directories of a whited-out entry stay, as extraction left them, down to
        the one an upper whiteout removed or an upper opaque directory emptied."""
        if "" in self.opaque:
            return
        stop = next((anc for anc in ancestors(name) if anc in self.hidden or anc in self.opaque), None)
        if stop is None:
            self._claim_parents(name, lay)
        elif stop in self.hidden:
            self._claim_parents(stop, lay)
        else:  # the opaque directory stays
            self._claim_parents(f"{stop}/", lay)

    def _claim_parents(self, name: str, lay: _Layer) -> None:
        if lay.replaced_nondirs:  # the directory where a skipped non-directory was starts empty
            lay.opaque.update(anc for anc in ancestors(name) if anc in lay.replaced_nondirs)
        parent = name.rpartition("/")[0]
        if parent not in lay.parents:  # else all of them are there
            lay.deep_first.update(intern(anc) for anc in ancestors(parent) if anc not in lay.parents)
            lay.parents.update(map(intern, ancestors(name)))
        for anc in ancestors(name):
            if anc not in self.claims:  # interned: a hostile layer's are kilobytes long, and many
                self.claims[intern(anc)] = lay.level * 2 + 1
                self.claimed_dir_bytes += len(anc)
        if self.claimed_dir_bytes > _MAX_DIR_PATH_BYTES:
            raise LayerError(
                f"layer {lay.label}: the image's directory paths add up to over "
                f"{_MAX_DIR_PATH_BYTES >> 20} MiB (at {name[:80]!r}...: directories nested too deep?)"
            )

    # -- entries -------------------------------------------------------------------------

    def _name(self, lay: _Layer, ti: tarfile.TarInfo) -> str:
        """Where member ``ti`` of layer ``lay`` goes in the root: through the symlinks of its
        layer and the lower ones it writes through."""
        return self._placed(normalise_name(ti.name, lay.blob), lay)

    def entry(self, lay: _Layer, ti: tarfile.TarInfo, data: BinaryIO | None) -> None:
        """Merge one member of layer ``lay`` (``data`` streams its content)."""
        name = self._name(lay, ti)
        parent, base = posixpath.split(name)
        if lay.lent and not base.startswith(WHITEOUT_PREFIX):
            self._lend(lay, name, parent)
        if base.startswith(WHITEOUT_PREFIX):
            if base.startswith(_AUFS_META) and base != OPAQUE_MARKER:
                return  # AUFS bookkeeping (.wh..wh.aufs, .wh..wh.plnk itself): never content
            # a whiteout creates no directory (Apptainer's extraction makes none for it)
            lay.note_below(name)
            if base == OPAQUE_MARKER:
                lay.opaque.add(parent)
            else:
                target = base[len(WHITEOUT_PREFIX) :]
                if target in ("", ".", ".."):
                    raise LayerError(f"layer {lay.label}: invalid whiteout {ti.name!r}")
                path = posixpath.join(parent, target)
                if path in lay.parents:  # it keeps what the layer wrote below it, and so itself
                    lay.opaque.add(path)
                else:
                    lay.whiteouts.add(path)
            return
        kind = member_kind(ti)
        _check_extractable(lay, ti, kind)
        lay.note(name, kind == "dir")
        text = self._symlink_text(lay, ti, kind)
        if text is not None:
            self._found_through(lay.level, name, text)
        else:  # a later entry of the symlink's layer replaced it (a non-directory: those below too)
            for table in (self.found, self.through):
                for path in [name] if kind == "dir" or not table else list(table):
                    # (a hard link there may be a lower symlink itself: _linked_through)
                    below = (path == name and kind != "lnk") or path.startswith(name + "/")
                    if path in table and below and path in lay.symlinks:  # (the layer had it, until now)
                        self._replaced_symlink(lay, path)
        lay.skipped_live.discard(name)
        self._place(lay, name, ti, kind, data)
        lay.track_symlink(name, kind, text)

    def _symlink_text(self, lay: _Layer, ti: tarfile.TarInfo, kind: str) -> str | None:
        """The target of member ``ti`` of layer ``lay`` if a symlink, or a hard link to a symlink
        of the layer (the link is that symlink too, its target read from its own directory)."""
        if kind == "sym":
            return ti.linkname
        if kind != "lnk" or not lay.symlinks:
            return None
        return lay.symlinks.get(self._placed(normalise_name(ti.linkname, lay.blob), lay))

    def _place(self, lay: _Layer, name: str, ti: tarfile.TarInfo, kind: str, data: BinaryIO | None) -> None:
        """Merge entry ``ti`` (no whiteout) of layer ``lay`` at ``name``."""
        if kind == "dir" and (name in lay.state or name in lay.replaced_nondirs):
            # a directory where this layer had a non-directory: tar extraction removed the lower
            # layers' directory (children and all) for that one, and this one starts empty
            lay.opaque.add(name)
        if lay.resolved:  # a file that upper hard links found, which this entry makes a directory
            for path in (name, *ancestors(name)) if kind == "dir" else ancestors(name):
                if path in lay.resolved:  # (unless a later entry replaces it again: another pass)
                    link, label = lay.resolved[path]
                    self.deferred.append(f"layer {label}: hard link {link!r} points at directory {path!r}")
            if kind != "dir" and name in lay.resolved_in:  # … or which it takes away
                for path, (link, label) in lay.resolved.items():
                    if path.startswith(name + "/"):
                        self.deferred.append(
                            f"layer {label}: hard link {link!r} points at missing file {path!r}"
                        )
        if self.pending:  # … or will find, if this layer ends with a directory there
            lay.pending_dirs.update(path for path in ancestors(name) if path in self.pending)
        if name in self.required:
            link, label = self.required.pop(name)
            if kind == "dir":
                raise LayerError(f"layer {label}: hard link {link!r} points at directory {name!r}")
            lay.resolve(name, (link, label))
            if kind == "sym":
                self._linked_through(link, label, ti.linkname)
        if name in self.pending:
            if kind != "dir":
                self._resolve_pending(lay, name, ti, kind, data)
                return
            lay.pending_dirs.add(name)  # the links fail unless a later entry replaces it
        if not name and kind != "dir":
            raise LayerError(f"layer {lay.label}: the root entry {ti.name!r} is not a directory")
        reason = self._blocked(name, lay)
        if reason == "whiteout":
            self._claim_unhidden_parents(name, lay)
        claim = self.claims.get(name)
        if reason is None and claim is not None:
            reason = self._against_claim(lay, name, ti, kind, claim)
        if reason is not None:
            if reason != "merged":
                self.stats.skip(reason)
            if kind == "lnk":  # made all the same: its target must be there
                lay.state[name] = self._require(lay, name, ti)
            elif kind != "dir":
                lay.state[name] = _HIDDEN
                lay.hidden_at[name] = lay.ordinal
            return
        self._claim_parents(name, lay)
        self.claims[name] = lay.level * 2 + (kind == "dir")
        if kind == "dir":
            self.dirs[name] = (lay.level, ti)
        elif kind == "lnk":
            self._link(lay, name, ti)
        elif kind == "reg" and ti.size:
            self.sink.emit(name, ti, kind, data, lay.label)
            lay.written.add(name)
            lay.state[name] = _EMITTED
        elif kind == "dev":  # dropped, yet it hides what lower layers have here
            lay.state[name] = _DEVICE
            self.stats.skip("device")
        else:
            lay.held[name] = (ti, kind)
            lay.state[name] = _EMITTED

    def _against_claim(
        self, lay: _Layer, name: str, ti: tarfile.TarInfo, kind: str, claim: int
    ) -> str | None:
        """Settle ``name`` that is already claimed; None means this entry takes it."""
        level, is_dir = claim >> 1, claim & 1
        if level < lay.level:  # an upper layer has it
            if is_dir and kind != "dir":  # it replaced a directory below, children and all
                if name in lay.parents:  # … the layer's own ones too
                    self._take_back(lay, name, True)
                lay.opaque.add(name)
                lay.lent[name] = (ti, kind)
            if is_dir and kind == "dir":
                # an implicit upper directory (or one this layer's earlier entry gave them, which
                # this one replaces): take these attributes
                if self.dirs.get(name, (lay.level,))[0] == lay.level:
                    self.dirs[name] = (lay.level, ti)
                lay.lent.pop(name, None)
                return "merged"
            return "shadowed"
        # a duplicate in the same layer: the last one wins, as tar extraction does
        if is_dir and kind == "dir":
            self.dirs[name] = (lay.level, ti)
            return "merged"
        self._take_back(lay, name, is_dir)
        return None

    def _directory_from(
        self, lay: _Layer, name: str, ti: tarfile.TarInfo, kind: str, *, right_below: bool = True
    ) -> None:
        """The directory that entries below non-directory ``ti`` of layer ``lay`` (its own later
        ones, or an upper layer's) imply at ``name`` takes the owner, mode and time of ``ti``, as
        in Apptainer: its extraction (umoci) gives the parent of an entry, made in place of a
        file, the attributes that file had (not where the first entry below lies deeper in).
        An upper layer's own directory there keeps its attributes."""
        if kind in ("reg", "fifo", "dev") and self.dirs.get(name, (lay.level,))[0] == lay.level:
            # not a directory entry (see _link_target); else a new directory: the attributes of
            # the lower directories there went with the file
            self.dirs[name] = (lay.level, ti if right_below else _ROOT_DEFAULT)

    def _lend(self, lay: _Layer, name: str, parent: str) -> None:
        """Settle the non-directories of ``lay.lent`` that entry ``name`` of their layer lies
        below (see :meth:`_directory_from`; whiteouts make no directory, and remove nothing of
        their own layer)."""
        for anc in ancestors(name):
            lent = lay.lent.pop(anc, None)
            if lent is not None:
                self._directory_from(lay, anc, *lent, right_below=anc == parent)

    def _take_back(self, lay: _Layer, name: str, is_dir: bool) -> None:
        """Withdraw entry ``name`` of layer ``lay``, which a later entry of the layer replaces
        (``is_dir``: it is a directory), or ask for a second pass that skips it."""
        if name in lay.written or is_dir:  # content already streamed, or a directory (maybe with children)
            if lay.replaced:  # the pre-scan of an earlier pass did not settle it
                raise LayerError(
                    f"layer {lay.label}: entry {name!r} replaces an earlier entry in a way "
                    "that cannot be merged"
                )
            if len(_REPEATS) >= _MAX_REPEATS:
                _REPEATS.clear()
            through = self._lower_symlink if self.through else None
            _REPEATS[(str(lay.blob.path), lay.blob.offset, lay.blob.digest)] = _scan_repeats(lay, through)
            raise DuplicateEntryError(
                f"layer {lay.label}: entry {name!r} replaces an earlier entry whose content or children "
                "are written already; converting again (the layer's replaced entries are now known)"
            )
        held = lay.held.pop(name, None)
        if held is not None and name in lay.linked:
            self._keep_for_links(lay, name, held)
        lay.links.pop(name, None)
        lay.symlinks.forget(name)
        target = lay.state.get(name)
        if isinstance(target, str):  # an earlier hard link: withdraw its request for content
            if any(user == name for user, _ in lay.awaiting.get(target, [])):
                lay.required.setdefault(target, (name, lay.label))
                self.link_upto[name] = self._upto(name)
            for requests in (
                lay.awaiting.get(target, []),
                lay.rereads.get(lay.hidden_at.get(target, -1), []),
            ):
                requests[:] = [r for r in requests if (r[0] if isinstance(r, tuple) else r) != name]
        self.stats.skip("duplicate")

    def _keep_for_links(self, lay: _Layer, name: str, held: tuple[tarfile.TarInfo, str]) -> None:
        """Hard links of this layer to ``name``, a contentless entry that a later one replaces,
        keep it (as tar extraction leaves them the old inode): it moves to the first link's
        name, and the other links point there."""
        linkers = [n for n, t in lay.links.items() if t == name]
        if not linkers:
            return
        host = linkers[0]
        del lay.links[host]
        lay.held[host] = held
        lay.state[host] = _EMITTED
        for other in linkers[1:]:
            lay.links[other] = lay.state[other] = host
        lay.linked.add(host)

    def _replaced_symlink(self, lay: _Layer, path: str) -> None:
        """A later entry of layer ``lay`` replaced or took away its symlink at ``path``: no layer
        writes through it (an earlier pass, interrupted before the entry, may have thought so)."""
        if path in self.found:
            self.found[path] = [hit for hit in self.found[path] if hit.level != lay.level]
        if any(hit.level == lay.level for hit in self.through.get(path, ())):
            self.dropped.add((path, lay.level))

    def _linked_through(self, link: str, label: str, text: str) -> None:
        """The hard link ``link`` of the layer ``label`` (the topmost of that digest) to a lower
        symlink -> ``text`` is that symlink: the layers above it may write through it."""
        if label in self.levels and link in self.link_upto:
            self._found_through(self.levels[label], link, text, self.link_upto[link])

    def _upto(self, name: str) -> int:
        """The level of the lowest layer read so far that replaced or removed ``name`` (an
        entry or whiteout there, a whiteout, opaque marker or non-directory above it), or 0."""
        upto = self.touched.get(name, 0) >> 1
        for anc in ancestors(name):
            touched = self.touched.get(anc, 0)
            if not touched & 1:
                upto = max(upto, touched >> 1)
            upto = max(upto, self.opaque_at.get(anc, 0))
        return max(upto, self.opaque_at.get("", 0) if name else 0)

    def _found_through(self, level: int, name: str, text: str, upto: int | None = None) -> None:
        """Note the symlink ``name`` -> ``text`` of the layer at ``level`` if layers above put
        entries, whiteouts or hard-link targets below it after the nearest one that replaced or
        removed it (``upto``, if known then): extraction layer after layer (Apptainer's,
        containerd's) wrote those through the symlink, whatever the layers above did later.
        """
        upto = self._upto(name) if upto is None else upto
        hit = _Through(level, text, upto)
        below = self.below.get(name, 0)
        # that layer wrote below it before it replaced it; or a pass wrote through it more layers
        # than those, which it knew less of then: correct it
        stale = any(h.level == level and h != hit for h in self.through.get(name, ()))
        if (not below or below < upto) and not stale:
            return
        known = self.found.setdefault(name, [])
        if hit not in self.through.get(name, ()):  # a later symlink of the layer replaces an earlier one
            known[:] = [h for h in known if h.level != level] + [hit]

    def _link_target(self, lay: _Layer, name: str, ti: tarfile.TarInfo) -> str:
        """The root-relative path a hard link entry ultimately points at."""
        target = self._placed(
            normalise_name(ti.linkname, lay.blob, what=f"hard link target of {name!r}"), lay
        )
        lay.note_below(target)
        if target == name or not target:
            raise LayerError(f"layer {lay.label}: hard link {name!r} points at itself or the root")
        if target.startswith(name + "/"):  # extraction removes what is at name, target and all
            raise LayerError(f"layer {lay.label}: hard link {name!r} points at missing file {target!r}")
        error = f"layer {lay.label}: hard link {name!r} points at directory {target!r}"
        if name.startswith(target + "/"):  # its directory is the target, or replaced it …
            self.deferred.append(error)  # … unless a lower symlink there takes the link elsewhere
        seen = lay.state.get(target)
        if isinstance(seen, str):  # a hard link of the layer: the same file as its target
            target = seen
        elif target in self.dirs and self.dirs[target][0] == lay.level and self.dirs[target][1].isdir():
            raise LayerError(error)  # (a non-directory there only lends a directory its attributes)
        elif target in lay.parents or self.claims.get(target) == lay.level * 2 + 1:
            # a directory the layer's entries below it made, unless they went through a lower
            # symlink there (the link is then that symlink): the layers below tell
            self.deferred.append(error)
        if target == name:  # through hard links of the layer
            raise LayerError(f"layer {lay.label}: hard link {name!r} points at itself or the root")
        return target

    def _link(self, lay: _Layer, name: str, ti: tarfile.TarInfo) -> None:
        target = self._link_target(lay, name, ti)
        seen = lay.state.get(target)
        if seen == _DEVICE:
            lay.state[name] = _DEVICE
            self.stats.skip("device")
            return
        lay.state[name] = target
        if seen == _EMITTED:
            lay.links[name] = target
            lay.linked.add(target)
        elif seen == _HIDDEN:
            lay.rereads.setdefault(lay.hidden_at[target], []).append(name)
        elif self._removed_by(lay, target):  # tar extraction finds nothing to link to
            raise LayerError(f"layer {lay.label}: hard link {name!r} points at missing file {target!r}")
        else:  # not in this layer so far: the nearest lower layer that has it
            lay.awaiting.setdefault(target, []).append((name, lay.label))
            self.link_upto[name] = self._upto(name)

    def _require(self, lay: _Layer, name: str, ti: tarfile.TarInfo) -> str:
        """The target of hard link ``name`` (``ti``), which a later entry of its layer or an upper
        layer replaces: it was made, so its target must exist (Apptainer fails otherwise)
        though it needs no content."""
        target = self._link_target(lay, name, ti)
        if lay.state.get(target) is None:
            if self._removed_by(lay, target):
                raise LayerError(f"layer {lay.label}: hard link {name!r} points at missing file {target!r}")
            if target not in lay.skipped_live:  # not an earlier member of the layer, left out
                lay.required.setdefault(target, (name, lay.label))
                self.link_upto[name] = self._upto(name)
        return target

    def _removed_by(self, lay: _Layer, target: str) -> bool:
        """True if layer ``lay`` (so far) removed what the layers below have at ``target``: a
        whiteout of it or of a directory above it, an opaque directory above it, or a
        non-directory of its own (no symlink) in place of such a directory. Apptainer, which
        extracts layer after layer, then has no file to link to, and neither may hpcsif: the
        link would bring back a file that the image deleted."""
        if target in lay.whiteouts or "" in lay.opaque:
            return True
        for anc in ancestors(target):
            if anc in lay.whiteouts or anc in lay.opaque:
                return True
            state = lay.state.get(anc)
            if (state is not None or anc in lay.skipped_live) and anc not in lay.symlinks:  # (hidden or not)
                return True
        return False

    def _resolve_pending(
        self, lay: _Layer, name: str, ti: tarfile.TarInfo, kind: str, data: BinaryIO | None
    ) -> None:
        """A lower layer reached the target of hard links from upper layers."""
        users = self.pending.pop(name)
        names = [n for n, _ in users]
        lay.resolve(name, users[0])
        if kind == "sym":
            for link, label in users:
                self._linked_through(link, label, ti.linkname)
        if kind == "lnk":  # this layer links it onwards: follow
            target = self._link_target(lay, name, ti)
            seen = lay.state.get(target)
            if seen == _DEVICE:
                self.stats.skip("device", len(names))
            elif seen == _EMITTED:
                self.links += [(n, target) for n in names]
            elif seen == _HIDDEN:
                lay.rereads.setdefault(lay.hidden_at[target], []).extend(names)
            else:
                lay.awaiting.setdefault(target, []).extend((n, lay.label) for n in names)
            self.entry(lay, ti, data)
            return
        self.entry(lay, ti, data)
        if kind == "dev":  # dropped: so are the links
            self.stats.skip("device", len(names))
            return
        if lay.state.get(name) == _EMITTED:  # visible itself: link to it
            self.links += [(n, name) for n in names]
        else:  # hidden here (its content was not consumed): copy it under the first link
            self._materialise(lay, names, ti, kind, data)

    def _materialise(
        self, lay: _Layer, names: list[str], ti: tarfile.TarInfo, kind: str, data: BinaryIO | None
    ) -> None:
        """Write hidden entry ``ti`` under the first link name; the others link to it."""
        self.sink.emit(names[0], ti, kind, data, lay.label)
        self.links += [(n, names[0]) for n in names[1:]]

    def end_layer(self, lay: _Layer) -> None:
        """Write the held-back entries and apply the layer's whiteouts to the layers below."""
        for name in lay.pending_dirs & self.pending.keys():
            raise LayerError(
                f"layer {lay.label}: hard link {self.pending[name][0][0]!r} points at directory {name!r}"
            )
        for name, (ti, kind) in lay.held.items():
            self.sink.emit(name, ti, kind, None, lay.label)
        for name, (ti, kind) in lay.lent.items():  # no later entry of the layer below it
            self._directory_from(lay, name, ti, kind, right_below=name not in self.deep_first)
        self.links += lay.links.items()
        self.hidden |= lay.whiteouts
        self.opaque |= lay.opaque
        # the directories whose first entry in the nearest upper layer below them lay deeper
        self.deep_first = {n for n in self.deep_first if n not in lay.parents} | lay.deep_first
        self.below.update(dict.fromkeys(lay.below, lay.level))
        self.touched.update((path, lay.level * 2 + is_dir) for path, is_dir in lay.touched.items())
        self.touched.update(dict.fromkeys(lay.whiteouts, lay.level * 2))
        self.opaque_at.update(dict.fromkeys(lay.opaque, lay.level))
        # links of upper layers to a file this one removed
        for target, (name, label) in [(t, users[0]) for t, users in self.pending.items()] + list(
            self.required.items()
        ):
            if self._removed_by(lay, target):
                raise LayerError(f"layer {label}: hard link {name!r} points at missing file {target!r}")
        for target, user in lay.required.items():
            self.required.setdefault(target, user)
        for target, links in lay.awaiting.items():
            if links:
                self.pending.setdefault(target, []).extend(links)

    def reread(self, lay: _Layer) -> None:
        """Read ``lay`` again for link targets that an upper layer hides (the members that
        were there when the links were made)."""
        wanted = {ordinal: names for ordinal, names in lay.rereads.items() if names}  # some withdrawn
        if not wanted:
            return
        stream = LayerStream(lay.blob, verify=False)
        try:
            with open_tar(stream) as tf:
                for ordinal, ti in enumerate(tf):
                    tf.members.clear()
                    names = wanted.pop(ordinal, None)
                    if names is None:
                        continue
                    name = normalise_name(ti.name, lay.blob)
                    kind = member_kind(ti)
                    if kind == "dev":  # dropped: so are the links
                        self.stats.skip("device", len(names))
                        continue
                    if kind not in ("reg", "sym", "fifo"):
                        raise LayerError(
                            f"layer {lay.label}: hard link {names[0]!r} points at {name!r}, a {kind}"
                        )
                    data = member_data(tf, stream, ti)
                    self._materialise(lay, names, ti, kind, data)
                    if not wanted:
                        break
        finally:
            stream.close()
        if wanted:
            names = next(iter(wanted.values()))
            raise LayerError(
                f"layer {lay.label}: the target of hard link {names[0]!r} vanished on a second read"
            )

    def finish(self) -> None:
        """Write hard links, then every directory (deepest first), then the root."""
        missing = [(t, users[0]) for t, users in self.pending.items()] + list(self.required.items())
        if missing:
            target, (name, label) = missing[0]
            raise LayerError(f"layer {label}: hard link {name!r} points at missing file {target!r}")
        for name, target in self.links:
            self.sink.link(name, target)
        dirs = sorted((n for n, c in self.claims.items() if c & 1 and n), reverse=True)
        for name in dirs:
            ti = self.dirs.get(name, (0, _ROOT_DEFAULT))[1]
            self.sink.emit(name, ti, "dir", None, "")
        self.sink.emit("", self.dirs.get("", (0, _ROOT_DEFAULT))[1], "dir", None, "")

    # -- whole layers --------------------------------------------------------------------

    def layer(self, level: int, blob: LayerBlob, stream: LayerStream | None = None) -> None:
        """Merge one layer blob (level 1 is the topmost layer), from ``stream`` if already open."""
        lay = _Layer(level, blob)
        self.levels.setdefault(blob.label, level)
        stream = stream or LayerStream(blob)
        try:
            try:
                tf = open_tar(stream)  # the stream is closed below
                for ordinal, ti in enumerate(tf):
                    tf.members.clear()  # tarfile keeps every member; we need none of them
                    lay.ordinal = ordinal
                    if ordinal in lay.replaced:  # a later member of this layer replaces it
                        name = self._name(lay, ti)
                        # it went through the lower symlinks, and replaced them, all the same
                        if posixpath.basename(name).startswith(WHITEOUT_PREFIX):
                            lay.note_below(name)
                        else:
                            lay.note(name, ti.isdir())
                            kind = member_kind(ti)
                            _check_extractable(lay, ti, kind)
                            lay.track_symlink(name, kind, self._symlink_text(lay, ti, kind))
                        if not ti.isdir():  # a directory that replaces it later starts empty
                            lay.replaced_nondirs.add(name)
                            lay.skipped_live.add(name)
                            if ordinal in lay.repeats.parents:
                                right_below = lay.repeats.parents[ordinal]
                                self._directory_from(lay, name, ti, member_kind(ti), right_below=right_below)
                        host = lay.repeats.kept.get(ordinal)
                        if host is None:
                            self.stats.skip("duplicate")
                            if ti.islnk():  # replaced, yet made: its target must be there
                                self._require(lay, name, ti)
                            continue
                        ti.name = host  # hard links kept it: it goes under the first one's name
                    elif ordinal in lay.repeats.absorbed:  # that first link: it is the file now
                        continue
                    elif ordinal in lay.repeats.retarget:
                        ti.linkname = lay.repeats.retarget[ordinal]
                    self.entry(lay, ti, member_data(tf, stream, ti))
                    if self.progress:
                        self.progress(self.done_in + stream.bytes_in, self.total)
                stream.drain()  # the digests are checked at the very end of the stream
            except RefusedMember as e:
                raise LayerError(f"layer {blob.label}: {e}") from e
            except tarfile.TarError as e:
                raise LayerError(f"layer {blob.label}: not a valid tar archive or truncated ({e})") from e
            except RecursionError as e:  # tarfile reads chained extended headers recursively
                raise LayerError(f"layer {blob.label}: too many extended tar headers in a row") from e
            self.done_in += stream.bytes_in
            self.stats.bytes_in += stream.bytes_in
        finally:
            stream.close()
        self.end_layer(lay)
        if lay.rereads:
            self.reread(lay)


def _check_extractable(lay: _Layer, ti: tarfile.TarInfo, kind: str) -> None:
    """Fail where Apptainer's extraction (umoci) fails on member ``ti`` of ``lay`` itself, even
    if a later member replaces it."""
    if kind == "unknown":  # as Apptainer (umoci) does: never guess what such an entry is
        raise LayerError(f"layer {lay.label}: entry {ti.name!r} has an unknown type flag {ti.type!r}")
    if (
        kind == "sym"
        and len(ti.linkname) >= PATH_MAX // 4
        and len(ti.linkname.encode("utf-8", "surrogateescape")) >= PATH_MAX
    ):
        # symlink(2) refuses it (Apptainer fails there too); squashfuse reads it as an I/O error
        longest = PATH_MAX - 1
        raise LayerError(
            f"layer {lay.label}: symbolic link {ti.name!r:.200} has a target over {longest} bytes"
        )


def _extra_layer(merger: _Merger, extra: Sequence[ExtraFile], level: int) -> None:
    """Merge the extra files as one layer at ``level`` (0 is over everything)."""
    lay = _Layer(level, LayerBlob(Path("<extra files>"), "", None, None))
    for ef in extra:
        ti = tarfile.TarInfo(ef.path)
        ti.mode = ef.mode
        ti.mtime = 0
        if ef.symlink is not None:
            ti.type, ti.linkname = tarfile.SYMTYPE, ef.symlink
        elif ef.data is None:
            ti.type = tarfile.DIRTYPE
        else:
            ti.size = len(ef.data)
        merger.entry(lay, ti, io.BytesIO(ef.data or b""))
    merger.end_layer(lay)


def _learn_through(merger: _Merger, layers: Sequence[LayerBlob]) -> WriteThroughError | None:
    """Keep the lower symlinks that upper layers write through, found by this pass of the
    merge, for the next pass, and the error that asks for it (None if it found none).

    A symlink once learnt changes at most once more (dropped, or its layers corrected): each
    pass knows more than the one before, yet two passes could otherwise undo each other."""
    image = tuple((str(b.path), b.offset, b.digest) for b in layers)
    settled = _SETTLED.setdefault(image, set())
    known = {(path, hit.level) for path, hits in merger.through.items() for hit in hits}
    dropped = merger.dropped - settled
    found = {
        path: [hit for hit in hits if (path, hit.level) not in settled] for path, hits in merger.found.items()
    }
    found = {path: hits for path, hits in found.items() if hits}
    if not found and not dropped:
        return None
    settled |= dropped | {(path, hit.level) for path, hits in found.items() for hit in hits} & known
    if len(_THROUGH) >= _MAX_REPEATS:
        _THROUGH.clear()
        _SETTLED.clear()
        _SETTLED[image] = settled
    through = {
        path: [hit for hit in hits if (path, hit.level) not in dropped]
        for path, hits in merger.through.items()
    }
    for path, hits in found.items():  # a symlink found again, with the layers above known better
        levels = {hit.level for hit in hits}
        through[path] = [hit for hit in through.get(path, []) if hit.level not in levels] + hits
    _THROUGH[image] = through
    for blob in layers:  # their pre-scans placed names without these symlinks
        _REPEATS.pop((str(blob.path), blob.offset, blob.digest), None)
    shown = [f"{p!r} -> {hit.text!r}" for p, hits in found.items() for hit in hits]
    shown = ", ".join(shown + [f"not {p!r}" for p, _ in sorted(dropped)])
    return WriteThroughError(f"upper layers write through lower symlinks ({shown}); converting again")


def _merge(
    layers: Sequence[LayerBlob],
    sink: Sink,
    stats: FlattenStats,
    extra: Sequence[ExtraFile],
    progress: _Progress | None,
) -> None:
    total = sum(
        b.size if b.size is not None else os.stat(b.path).st_size for b in layers if os.path.exists(b.path)
    )
    merger = _Merger(sink, stats, total, progress)
    image = tuple((str(b.path), b.offset, b.digest) for b in layers)
    merger.through = {path: list(hits) for path, hits in _THROUGH.get(image, {}).items()}
    _extra_layer(merger, [ef for ef in extra if not ef.under], 0)
    order = list(reversed(layers))
    ahead: LayerStream | None = None
    try:
        for level, blob in enumerate(order, start=1):
            stream, ahead = ahead or LayerStream(blob), None
            try:
                # the next layer starts inflating (its child process starting) while this one merges
                ahead = LayerStream(order[level]) if level < len(order) else None
            except BaseException:
                stream.close()
                raise
            merger.layer(level, blob, stream)
    except MergeAgainError:  # the pass was cut short: what it found of lower symlinks may not hold
        raise
    except LayerError as e:  # maybe only for want of the lower symlinks this pass found
        again = _learn_through(merger, layers)
        if again is None:
            raise
        raise again from e
    finally:
        if ahead is not None:
            ahead.close()
    again = _learn_through(merger, layers)
    if again is not None:
        raise again
    if merger.deferred:
        raise LayerError(merger.deferred[0])
    # the image's whiteouts hide lower layers, not the base directories laid under them (Apptainer
    # creates those after extracting): an opaque root keeps its /proc, /dev, /tmp …
    merger.hidden.clear()
    merger.opaque.clear()
    _extra_layer(merger, [ef for ef in extra if ef.under], len(order) + 1)
    merger.finish()


def flatten(
    layers: Sequence[LayerBlob],
    out: BinaryIO,
    *,
    extra: Sequence[ExtraFile] = (),
    progress: Callable[[int, int], None] | None = None,
) -> FlattenStats:
    """Write the merged root filesystem of ``layers`` (bottom first) to ``out`` as one PAX tar.

    ``extra`` files are laid over all layers (under them where ``under``). ``progress(done,
    total)`` is called with compressed bytes read so far and in all. Raises
    :class:`LayerError` or :class:`IntegrityError` (after part of the stream may have been
    written).
    """
    stats = FlattenStats()
    sink = TarSink(out, stats)
    _merge(layers, sink, stats, extra, progress)
    sink.close()
    return stats


def extract_tree(layers: Sequence[LayerBlob], dest: Path, *, extra: Sequence[ExtraFile] = ()) -> FlattenStats:
    """Write the merged root filesystem into ``dest``, which must be new or empty.

    Nothing is ever written outside ``dest``; on failure what was written is removed.
    Files and directories stay writable by their owner (a sandbox is meant to be changed).
    """
    import shutil

    dest = Path(dest)
    created = not dest.exists()
    if created:
        dest.mkdir(mode=0o755)
    elif not dest.is_dir() or dest.is_symlink() or any(dest.iterdir()):
        raise LayerError(f"sandbox destination {dest} exists and is not an empty directory")
    try:
        return merge_passes(lambda: _extract(layers, dest, extra))
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise


#: most passes of one merge: each pass that asks for another (:class:`MergeAgainError`) has
#: learnt the repeated names of one more layer or the lower symlinks that layers write through
MERGE_PASSES = 16
_T = TypeVar("_T")


def merge_passes(merge: Callable[[], _T]) -> _T:
    """``merge()`` again while it raises :class:`MergeAgainError`, up to :data:`MERGE_PASSES`
    passes (an image with several layers that repeat names needs a pass for each)."""
    for _ in range(MERGE_PASSES - 1):
        try:
            return merge()
        except MergeAgainError as e:  # repeated names or lower symlinks are known now
            log.info("%s", e)
    try:
        return merge()
    except MergeAgainError as e:
        raise LayerError(f"the layers could not be merged in {MERGE_PASSES} passes: {e}") from e


def _extract(layers: Sequence[LayerBlob], dest: Path, extra: Sequence[ExtraFile]) -> FlattenStats:
    """One pass of :func:`extract_tree`; empties ``dest`` again when it fails."""
    import shutil

    stats = FlattenStats()
    sink = DirSink(dest, stats)
    try:
        _merge(layers, sink, stats, extra, None)
    except BaseException:
        sink.close()
        for child in dest.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()
        raise
    sink.close()
    return stats
