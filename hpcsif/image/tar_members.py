"""The members of a layer's tar stream, read as Apptainer (Go's archive/tar) reads them.

Names are normalised into the root and their symlinks followed inside it; modes are made
Apptainer's (:func:`fix_mode`); PAX and GNU extension records are checked and applied as Go
applies them (a global or Solaris header, a malformed record: the layer fails in one line).
A regular member's content is read straight from the layer stream (:func:`member_data`), a
sparse member's as its stored regions only. :mod:`hpcsif.image.layers` merges the members of
all layers.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

from hpcsif.errors import LayerError
from hpcsif.image.layer_stream import LayerBlob, LayerStream

BLOCK = tarfile.BLOCKSIZE
_NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX; squashfs refuses longer names)
PATH_MAX = 4096  # bytes in a symlink target, with its NUL (Linux PATH_MAX)
# symlinks followed to place one entry, as Apptainer (filepath-securejoin) follows them
_MAX_SYMLINKS = 255


def normalise_name(name: str, layer: LayerBlob, what: str = "entry") -> str:
    """``name`` relative to the root ("" is the root).

    A ``..`` at the root stays at the root, as Apptainer (umoci, securejoin) and Docker
    extract layers: ``../../etc/x`` is ``etc/x``. A component longer than the 255 bytes
    any Linux file system (and squashfs) allows is a ``LayerError``, and so is a path of
    4096 bytes or more, which no system call takes (Apptainer fails on it too); its
    thousands of parent directories made the merge's memory grow with the square of its length.
    """
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
        else:
            # 63 characters or fewer are at most 252 bytes: encode only the rare long ones
            if len(comp) > _NAME_MAX // 4 and len(comp.encode("utf-8", "surrogateescape")) > _NAME_MAX:
                raise LayerError(
                    f"layer {layer.label}: {what} {name[:80]!r}... has a name component longer than "
                    f"{_NAME_MAX} bytes"
                )
            parts.append(comp)
    path = "/".join(parts)
    if len(path) >= PATH_MAX // 4 and len(path.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise LayerError(
            f"layer {layer.label}: {what} {name[:80]!r}... has a path of {PATH_MAX} bytes or more"
        )
    return path


def ancestors(path: str) -> Iterator[str]:
    """The strict ancestors of ``path`` from the top: "a", "a/b" for "a/b/c"."""
    i = path.find("/")
    while i != -1:
        yield path[:i]
        i = path.find("/", i + 1)


def fix_mode(mode: int, is_dir: bool) -> int:
    """Readable (and traversable) by all, no setuid/setgid; sticky bits stay."""
    mode &= 0o1777
    if is_dir:
        return mode | 0o555
    mode |= 0o444
    return mode | 0o111 if mode & 0o111 else mode


# PAX and GNU long-name headers are read whole into memory: refuse bigger ones, as Go's
# archive/tar (Apptainer) does, instead of reading a hostile gigabyte header
_MAX_EXT_HEADER = 1 << 20
_EXT_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_EMPTY_TAR = bytes(2 * BLOCK)


# PAX records that Go's archive/tar (Apptainer) refuses when they hold a NUL byte; tarfile
# would cut the name there and write another file than the one named
_NO_NUL_RECORDS = ("path", "linkpath", "uname", "gname")


_REFUSED_HEADERS = {tarfile.XGLTYPE: "PAX global header", tarfile.SOLARIS_XHDTYPE: "Solaris extended header"}


class RefusedMember(tarfile.ReadError):
    """A member that the tar format allows but a layer may not hold (its message says why)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar member whose extended headers are checked for size before they are read, and
    whose damaged headers fail the layer as they fail it in Apptainer."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        obj = super().frombuf(buf, encoding, errors)
        posix = buf[257:265] == b"ustar\x0000"
        old_style = buf[156:157] == tarfile.AREGTYPE
        if old_style or (buf[345:346] != b"\0" and not posix and obj.type not in tarfile.GNU_TYPES):
            # only POSIX ustar headers have a name prefix there, as Go's archive/tar reads them:
            # GNU ones keep times (incremental dumps), V7 ones nothing, yet tarfile joined it;
            # and whether a type '\0' member is a directory waits for its final name
            # (:func:`_old_style_directory`): tarfile decided on the header's own
            prefix = tarfile.nts(buf[345:500], encoding, errors) if posix else ""
            name = tarfile.nts(buf[:100], encoding, errors)
            obj.name = f"{prefix}/{name}" if prefix else name
            if old_style:
                obj.type = tarfile.AREGTYPE
            elif obj.isdir():
                obj.name = obj.name.rstrip("/")
        return obj

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        depth = getattr(tf, "_hpcsif_depth", 0)  # extended headers read the member they describe
        tf._hpcsif_depth = depth + 1  # type: ignore[attr-defined]
        try:
            member = super().fromtarfile(tf)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            # tarfile takes a bad header after the first member for the end of the archive,
            # which would drop the rest of the layer without a word
            raise tarfile.ReadError(f"invalid tar header at offset {tf.offset}: {e}") from None
        finally:
            tf._hpcsif_depth = depth  # type: ignore[attr-defined]
        if not depth:
            _old_style_directory(member, tf)
        return member

    # the GNU long name/link records of this member, field -> value (the later ones, see below)
    _gnu: dict[str, str] = {}

    def _proc_gnulong(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        """A GNU long name or link record and the member it names, read as Go's archive/tar
        (Apptainer) reads them: the record's ``size`` bytes up to a NUL (tarfile read its
        padding too), an empty record names nothing (the member kept no name at all), of two
        records of a kind in a row the later one wins (tarfile took the first), and they win
        over a PAX path of the same member (see :meth:`_proc_member`)."""
        value = tarfile.nts(tf.fileobj.read(self._block(self.size))[: self.size], tf.encoding, tf.errors)
        try:
            member = self.fromtarfile(tf)  # the following records are applied first
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None
        member.offset = self.offset
        field = "name" if self.type == tarfile.GNUTYPE_LONGNAME else "linkname"
        if value and field not in member._gnu:
            member._gnu = {**member._gnu, field: value}
        _apply_gnu(member)
        return member

    def _proc_pax(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        """An extended header and the member it describes; its records are checked first as
        Go's archive/tar (Apptainer) checks them (tarfile read a record whose length is wrong,
        or has no newline, as best it could, and a number it could not parse as 0), and its
        GNU sparse records are applied as Go applies them (:func:`_apply_gnu_sparse`)."""
        if not isinstance(tf.fileobj, LayerStream):
            return super()._proc_pax(tf)
        records = _check_pax_records(tf.fileobj.peek(self.size), self.offset)
        member = super()._proc_pax(tf)
        if self.type == tarfile.XHDTYPE:
            _apply_gnu_sparse(member, records, tf.fileobj)
        return member

    # tarfile's own readings of the GNU sparse records differ from Go's (it failed on an empty
    # map, took records Go ignores): :func:`_apply_gnu_sparse` does that work instead
    def _proc_gnusparse_00(self, *_: object) -> None:
        pass

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00

    def _apply_pax_info(self, pax_headers: dict[str, str], encoding: str, errors: str) -> None:
        # as in Go's archive/tar, an empty record keeps the header's value (an empty path
        # made the member the root, and the build failed); the sparse ones are applied later
        kept = {
            key: value
            for key, value in pax_headers.items()
            if value != "" and not key.startswith(_SPARSE_RECORD)
        }
        super()._apply_pax_info(kept, encoding, errors)  # type: ignore[misc]
        if self.type == tarfile.AREGTYPE and "path" in kept:  # its '/' tells (_old_style_directory)
            self.name = kept["path"]
        if "mtime" in kept:  # tarfile's float rounded 1700000000.999999999 up a second
            self.mtime = _pax_seconds(kept["mtime"])
        self.pax_headers = pax_headers.copy()

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _REFUSED_HEADERS:
            # tarfile would give a global header's records (a path, an owner) to every later
            # member, so a layer's files all became one, and a Solaris header's to the next one;
            # Apptainer refuses both as members of an unknown type
            raise RefusedMember(
                f"the member at offset {self.offset} is a {_REFUSED_HEADERS[self.type]} "
                f"(type {self.type.decode()!r}), which Apptainer does not extract either"
            )
        if self.type in _EXT_TYPES and self.size > _MAX_EXT_HEADER:
            raise tarfile.ReadError(
                f"an extended header of {self.size} bytes at offset {self.offset} (the limit is 1 MiB)"
            )
        member = super()._proc_member(tf)
        _apply_gnu(member)  # a PAX header before the GNU records set its path over theirs
        # owners are 32-bit (uid_t): base-256 or PAX values beyond that wrap as they do in
        # Apptainer's chown (the sandbox's chown raised OverflowError)
        member.uid &= 0xFFFFFFFF
        member.gid &= 0xFFFFFFFF
        for key in _NO_NUL_RECORDS:
            if "\0" in member.pax_headers.get(key, ""):
                raise tarfile.ReadError(f"the PAX {key} record at offset {self.offset} holds a NUL byte")
        return member


_PAX_INTEGER = re.compile(rb"[+-]?[0-9]+")
_PAX_TIME = re.compile(rb"[+-]?[0-9]+(\.[0-9]*)?")
# the records whose values Go's archive/tar parses as numbers (a bad one fails the header)
_PAX_NUMBERS = {b"uid": _PAX_INTEGER, b"gid": _PAX_INTEGER, b"size": _PAX_INTEGER}
_PAX_NUMBERS.update(dict.fromkeys((b"mtime", b"atime", b"ctime"), _PAX_TIME))


def _check_pax_records(data: bytes, offset: int) -> list[tuple[str, str]]:
    """The records of the extended header ``data``, in order, as (key, value); refused unless
    each record is ``LEN KEY=VALUE\\n`` with LEN its exact length, and the numbers are
    numbers, as Go's archive/tar refuses it."""
    records = []
    pos = 0
    while pos < len(data):
        length, space, _ = data[pos : pos + 24].partition(b" ")
        end = pos + int(length) if space and _PAX_INTEGER.fullmatch(length) else 0
        record = data[pos:end]
        key, equals, value = record[len(length) + 1 : -1].partition(b"=")
        if end - pos < 5 or end > len(data) or record[-1:] != b"\n" or not equals or not key:
            raise tarfile.ReadError(f"a malformed extended header record at offset {offset + pos}")
        number = _PAX_NUMBERS.get(key)
        if number is not None and value and not number.fullmatch(value):
            raise tarfile.ReadError(f"the PAX {key.decode()} record at offset {offset} is no number")
        records.append((key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))
        pos = end
    return records


def _pax_seconds(value: str) -> int:
    """The whole seconds of the PAX time ``value`` (checked by :func:`_check_pax_records`),
    as Go's archive/tar reads them and a file system keeps them: rounded down."""
    seconds, _, fraction = value.partition(".")
    whole = int(seconds)
    return whole - 1 if seconds.startswith("-") and fraction.strip("0") else whole


_SPARSE_RECORD = "GNU.sparse."
# a PAX 1.0 sparse map is read whole into memory: refuse a bigger one (65535 regions, which
# tar2sqfs takes at most, need under 3 MiB)
_MAX_SPARSE_MAP = 16 << 20
_HEADER_ONLY = frozenset(
    {tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE}
)


def _go_int(text: str, what: str, offset: int) -> int:
    """``text`` as Go's strconv.ParseInt reads a base-10 number, else the layer fails."""
    if not _PAX_INTEGER.fullmatch(text.encode()):
        raise tarfile.ReadError(f"the sparse file at offset {offset} has a {what} that is no number")
    return int(text)


def _sparse_version(records: dict[str, str]) -> str | None:
    """The GNU sparse format (``0.x`` or ``1.0``) that Go's archive/tar reads in ``records``,
    None where it takes the member for no sparse file."""
    version = (records.get("GNU.sparse.major", ""), records.get("GNU.sparse.minor", ""))
    if version in (("0", "0"), ("0", "1")):
        return "0.x"
    if version == ("1", "0"):
        return "1.0"
    if version == ("", "") and records.get("GNU.sparse.map"):
        return "0.x"  # 0.0 and 0.1 have no version records
    return None


def _read_map_1x0(stream: LayerStream, room: int, offset: int) -> tuple[list[int], int]:
    """The numbers of a PAX 1.0 sparse map at the start of a member's data, and the bytes
    (whole blocks) the map takes there, read as Go's archive/tar reads them."""
    text = b""
    wanted = 1  # newlines: the count, then two per region
    while text.count(b"\n") < wanted:
        if len(text) + BLOCK > min(room, _MAX_SPARSE_MAP):
            raise tarfile.ReadError(
                f"the sparse map of the member at offset {offset} is cut short or too long"
            )
        text += stream.read(BLOCK)
        if wanted == 1 and b"\n" in text:
            count = _go_int(text.partition(b"\n")[0].decode("latin-1"), "region count", offset)
            if count < 0:
                raise tarfile.ReadError(f"the sparse file at offset {offset} has a negative region count")
            wanted = 1 + 2 * count
    tokens = text.split(b"\n")[1:wanted]
    return [_go_int(t.decode("latin-1"), "sparse map entry", offset) for t in tokens], len(text)


def _apply_gnu_sparse(member: tarfile.TarInfo, records: list[tuple[str, str]], stream: LayerStream) -> None:
    """Make ``member`` the sparse file that the GNU sparse ``records`` of its extended header
    describe, as Go's archive/tar (Apptainer) does: the map of format 0.0 (offset and numbytes
    records), 0.1 (a map record) or 1.0 (at the start of the data), the name and real size;
    records that Go takes for no sparse file are ignored, and a map that is malformed, or does
    not cover the stored data exactly, fails the layer."""
    latest: dict[str, str] = {}
    numbers: list[str] = []
    for key, value in records:
        if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):  # format 0.0: pairs in order
            expected = "GNU.sparse.numbytes" if len(numbers) % 2 else "GNU.sparse.offset"
            if key != expected or "," in value:
                raise tarfile.ReadError(
                    f"the sparse records of the member at offset {member.offset} are out of order"
                )
            numbers.append(value)
        else:
            latest[key] = value
    if numbers:
        latest["GNU.sparse.map"] = ",".join(numbers)
    version = _sparse_version(latest)
    if version is None:
        return
    offset = member.offset
    if latest.get("GNU.sparse.name"):
        member._name_before_sparse = member.name  # type: ignore[attr-defined]
        member.name = latest["GNU.sparse.name"]
    stored = member.size
    real = latest.get("GNU.sparse.size") or latest.get("GNU.sparse.realsize")
    if real:
        member.size = _go_int(real, "size", offset)
    if version == "1.0":
        stream.seek(member.offset_data)
        values, used = _read_map_1x0(stream, stored, offset)
        member.offset_data += used
        stored -= used
    else:
        count = _go_int(latest.get("GNU.sparse.numblocks", ""), "region count", offset)
        text = latest.get("GNU.sparse.map", "")
        values = [_go_int(v, "sparse map entry", offset) for v in text.split(",")] if text else []
        if count < 0 or len(values) != 2 * count:
            raise tarfile.ReadError(
                f"the sparse map of the member at offset {offset} has not {count} regions"
            )
    regions = list(zip(values[::2], values[1::2], strict=True))
    end = 0
    for start, length in regions:
        if start < end or length < 0 or start + length > member.size:
            raise tarfile.ReadError(
                f"the sparse map of the member at offset {offset} is out of order or too long"
            )
        end = start + length
    if member.type in _HEADER_ONLY or member.size < 0:
        raise tarfile.ReadError(f"the member at offset {offset} is a sparse {member_kind(member)}")
    if sum(length for _, length in regions) != stored:
        raise tarfile.ReadError(
            f"the sparse file at offset {offset} stores {stored} bytes, its map covers another number"
        )
    member.sparse = regions


def _apply_gnu(member: tarfile.TarInfo) -> None:
    """Give ``member`` the GNU long name/link its records hold (:class:`_BoundedTarInfo`)."""
    for key, value in getattr(member, "_gnu", {}).items():
        setattr(member, key, value)
    if member.isdir():
        member.name = member.name.removesuffix("/")


def _old_style_directory(member: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
    """Make a type '\\0' member whose final name (its PAX path or GNU long name, where it has
    one) ends in '/' a directory, with no data, as Go's archive/tar (Apptainer) does."""
    if member.type != tarfile.AREGTYPE:
        return
    name = getattr(member, "_name_before_sparse", member.name)  # Go renames sparse files later
    if not name.endswith("/"):
        return
    if member.sparse is not None:
        raise tarfile.ReadError(f"the member at offset {member.offset} is a sparse directory")
    member.type = tarfile.DIRTYPE
    member.name = member.name.rstrip("/")
    tf.offset = member.offset_data  # Go skips none of a directory's size


def open_tar(stream: LayerStream) -> tarfile.TarFile:
    """``stream`` as a tar archive; an empty stream is an empty layer, as in Apptainer."""
    try:
        return tarfile.open(fileobj=stream, mode="r:", tarinfo=_BoundedTarInfo)
    except tarfile.ReadError:
        if stream.tell():
            raise
        return tarfile.open(fileobj=io.BytesIO(_EMPTY_TAR), mode="r:")


def follow_links(
    name: str, symlink: Callable[[str], str | None], label: str, left: list[str] | None = None
) -> str:
    """``name`` with the symlinks among its parents followed inside the root, component by
    component as Apptainer (filepath-securejoin) follows them: ``..`` after a symlink leaves
    the directory the symlink named, and ``..`` at the root is the root.

    ``symlink(path)`` is the target (as written) of the symlink at root-relative ``path``, None
    if there is none to follow there. The directories that a ``..`` left are added to ``left``
    (they were passed through, and may be symlinks that only a later pass knows).
    """
    parent, slash, base = name.rpartition("/")
    if not slash:
        return name
    todo = parent.split("/")
    todo.reverse()  # a stack: the next component last
    here = ""  # the directory resolved so far
    followed = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if here and left is not None:
                left.append(here)
            here = here.rpartition("/")[0]
            continue
        path = f"{here}/{part}" if here else part
        target = symlink(path)
        if target is None:
            here = path
            continue
        followed += 1
        if followed > _MAX_SYMLINKS:
            raise LayerError(f"layer {label}: {name!r}: too many levels of symbolic links among its parents")
        if target.startswith("/"):
            here = ""
        todo.extend(reversed(target.split("/")))
    return f"{here}/{base}" if here else base


_REG_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE})


def member_kind(ti: tarfile.TarInfo) -> str:
    """One of "reg", "dir", "sym", "lnk", "fifo", "dev" or "unknown" for a tar member."""
    t = ti.type
    if t in _REG_TYPES:
        return "reg"
    if t == tarfile.DIRTYPE:
        return "dir"
    if t == tarfile.SYMTYPE:
        return "sym"
    if t == tarfile.LNKTYPE:
        return "lnk"
    if t == tarfile.FIFOTYPE:
        return "fifo"
    if t in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        return "dev"
    return "unknown"


class MemberContent:
    """The content of a regular tar member read straight from the layer stream."""

    def __init__(self, stream: LayerStream, size: int) -> None:
        self._stream = stream
        self._left = size

    def read(self, size: int) -> bytes:
        data = self._stream.read_some(min(size, self._left))
        self._left -= len(data)
        return data


# tar2sqfs 1.2 reads sparse maps of at most 65536 entries, the closing (size, 0) one included
_MAX_REGIONS = 65535


class SparseContent(MemberContent):
    """The stored regions of a sparse member, one after the other; ``regions`` are their
    (offset, length) in the file, in order, and ``stored`` their total length."""

    def __init__(self, stream: LayerStream, regions: list[tuple[int, int]]) -> None:
        self.regions = regions
        self.stored = sum(length for _, length in regions)
        super().__init__(stream, self.stored)


def _regions(ti: tarfile.TarInfo, room: int) -> list[tuple[int, int]] | None:
    """``ti``'s sparse map without empty regions, or None unless the regions are in order,
    inside the file and inside the ``room`` bytes the member's data has in the archive, and
    few enough for ``tar2sqfs`` (:data:`_MAX_REGIONS`)."""
    regions: list[tuple[int, int]] = []
    end = 0
    for offset, length in ti.sparse or ():
        if not length:  # old GNU maps end in (0, 0) entries
            continue
        if offset < end or length < 0 or offset + length > ti.size:
            return None
        regions.append((offset, length))
        end = offset + length
    if len(regions) > _MAX_REGIONS or sum(length for _, length in regions) > room:
        return None
    return regions


def member_data(tf: tarfile.TarFile, stream: LayerStream, ti: tarfile.TarInfo) -> BinaryIO | None:
    """A reader of ``ti``'s content (None for non-files): for a sparse member, its stored
    regions only (the holes are never read or written out), or, where its map is odd, all of
    its bytes as tarfile expands them."""
    if not ti.isreg():
        return None
    if ti.sparse is not None:
        regions = _regions(ti, tf.offset - ti.offset_data)  # tf.offset: the next member's header
        if regions is None:
            return tf.extractfile(ti)
        stream.seek(ti.offset_data)
        return SparseContent(stream, regions)  # type: ignore[return-value]
    stream.seek(ti.offset_data)
    return MemberContent(stream, ti.size)  # type: ignore[return-value]
