"""Decompressing and verifying one layer blob, chunk by chunk.

:class:`LayerDecoder` reads a blob (or a byte range of a file), hashes the compressed bytes
(the blob digest) and the decompressed ones (the config's ``diff_id``), and raises
:class:`~hpcsif.errors.IntegrityError` at the end of the stream when either differs or the
compressed stream is truncated. The compression is detected from the magic bytes (gzip,
zstd, bzip2, xz or plain tar), whatever the media type says.

It runs either in a thread of the converting process or, for large compressed layers, in a
child process (:mod:`hpcsif.image.inflate`); this module imports only what both need.
"""

from __future__ import annotations

import hashlib

from hpcsif.errors import IntegrityError, LayerError

TYPE_CHECKING = False  # as typing.TYPE_CHECKING: the inflating child process never loads typing
if TYPE_CHECKING:
    from typing import BinaryIO

try:  # ISA-L inflates gzip about twice as fast as zlib, with the same API
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is an install requirement; zlib still works
    import zlib as _zlib

CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
# bzip2 expands a run of zeros over a million times (1 GiB from 785 bytes, decoded at about
# 400 MiB/s): past what zstd reaches (32768 times) a bzip2 layer is a decompression bomb.
# Apptainer reads no bzip2 layers at all; gzip cannot pass 1032 times.
_BZIP2_MAX_RATIO = 32768
_BZIP2_SLACK = 64 << 20  # what any small bzip2 layer may hold


def is_compressed(head: bytes) -> bool:
    """True if a blob starting with ``head`` is compressed in a format we decode."""
    return head.startswith((_GZIP_MAGIC, _ZSTD_MAGIC, _BZIP2_MAGIC, _XZ_MAGIC))


class HashingReader:
    """Reads a window of an open blob file, hashing and counting the (compressed) bytes."""

    def __init__(self, f: BinaryIO, hashed: bool, offset: int = 0, size: int | None = None) -> None:
        self._f = f
        self._start = offset
        self._left = size  # bytes left in the window (None: to the end of the file)
        self._f.seek(offset)
        self.hash = hashlib.sha256() if hashed else None
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = size if size is not None and size >= 0 else -1
        if self._left is not None:
            want = self._left if want < 0 else min(want, self._left)
        data = self._f.read(want)
        if self._left is not None:
            self._left -= len(data)
        self.count += len(data)
        if self.hash is not None:
            self.hash.update(data)
        return data

    def peek(self, size: int) -> bytes:
        """The first ``size`` bytes of the window, without consuming them (before any read)."""
        head = self._f.read(size if self._left is None else min(size, self._left))
        self._f.seek(self._start)
        return head

    def close(self) -> None:
        self._f.close()


class _GzipReader:
    """Multi-member gzip decoding with bounded output (inflate checks each member's CRC).

    Faster than :class:`gzip.GzipFile`, which checks the CRC in a second pass. Bytes after
    the last member that do not start another one (zero padding, junk) end the stream, as
    in Apptainer, Docker and ``gzip -d``; they are still read for the blob digest.
    """

    def __init__(self, raw: HashingReader) -> None:
        self._raw = raw
        self._dec = _zlib.decompressobj(31)
        self._fed = False

    def read(self, size: int) -> bytes:
        while True:
            dec = self._dec
            data = dec.unconsumed_tail
            if dec.eof:  # next member, if any
                data = dec.unused_data or self._raw.read(CHUNK // 4)
                while 0 < len(data) < len(_GZIP_MAGIC) and (more := self._raw.read(CHUNK // 4)):
                    data += more
                if not data.startswith(_GZIP_MAGIC):  # the end, or trailing bytes that start no member
                    while self._raw.read(CHUNK):
                        pass
                    return b""
                dec = self._dec = _zlib.decompressobj(31)
                self._fed = False
            data = data or self._raw.read(CHUNK // 4)
            if not data:
                if self._fed and not dec.eof:
                    raise EOFError("compressed stream ended before the end-of-stream marker")
                return b""
            self._fed = True
            out = dec.decompress(data, size)
            if out:
                return out


class _ZstdReader:
    """Multi-frame zstd decoding that notices a truncated last frame.

    ``zstandard``'s stream reader ends silently on truncation and its decompressobj has
    no output limit, so input goes in small pieces: output per piece stays bounded
    (at most 64 MiB even for a decompression bomb). Skippable frames are skipped here, by
    their length, without a decoder each (a million of them in 8 MB took 20 s). Bytes after
    a frame that start no frame (zero padding, junk) end the stream, as for gzip.
    """

    _PIECE = 2048

    def __init__(self, raw: HashingReader) -> None:
        try:
            import zstandard
        except ImportError:
            raise LayerError("zstd-compressed layers need the Python package 'zstandard'") from None
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._raw = raw
        self._dec = self._new()
        self._fed = False
        self._buf = b""  # compressed bytes read, fed to the decoder up to _pos
        self._pos = 0
        self._ended = False

    def _fill(self, want: int) -> bool:
        """At least ``want`` unfed bytes in the buffer; False if the blob ends before."""
        while len(self._buf) - self._pos < want:
            more = self._raw.read(CHUNK // 4)
            if not more:
                return False
            self._buf, self._pos = self._buf[self._pos :] + more, 0
        return True

    def _next_frame(self) -> bool:
        """At a frame boundary, past any skippable frames: whether a frame (or the end) follows;
        if other bytes follow, read them all (for the blob digest) and end the stream."""
        while True:
            self._fill(8)
            head = self._buf[self._pos : self._pos + 8]
            if len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
                if len(head) < 8:
                    raise EOFError("compressed stream ended in a skippable zstd frame")
                skip = 8 + int.from_bytes(head[4:8], "little")
                while skip:
                    if not self._fill(1):
                        raise EOFError("compressed stream ended in a skippable zstd frame")
                    step = min(skip, len(self._buf) - self._pos)
                    self._pos += step
                    skip -= step
                continue
            if not head or head.startswith(_ZSTD_MAGIC):
                return True
            while self._raw.read(CHUNK):  # still read for the blob digest
                pass
            self._buf, self._pos, self._ended = b"", 0, True
            return False

    def read(self, size: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < size and not self._ended:
            if self._dec.eof:  # next frame, if any
                # the decoder's unused bytes are the end of the last piece: feed them again
                self._pos -= len(self._dec.unused_data)
                self._dec, self._fed = self._new(), False
                if not self._next_frame():
                    break
            if self._pos >= len(self._buf) and not self._fill(1):
                if self._fed and not self._dec.eof:
                    raise EOFError("compressed stream ended in the middle of a zstd frame")
                break
            piece = self._buf[self._pos : self._pos + self._PIECE]
            self._pos += len(piece)
            self._fed = True
            out = self._dec.decompress(piece)
            if out:
                parts.append(out)
                got += len(out)
        return b"".join(parts)


class _XzReader:
    """Multi-stream xz decoding with bounded output and memory.

    An xz header may ask for a dictionary of up to 4 GiB, which the decoder fills as it
    goes; ``xz -9`` needs 65 MiB. :class:`lzma.LZMAFile` has no memory limit.
    """

    MEMLIMIT = 256 << 20

    def __init__(self, raw: HashingReader) -> None:
        import lzma

        self._lzma = lzma
        self._raw = raw
        self._dec = self._new()
        self._streams = 0  # xz streams decoded to their end
        self._produced = False  # whether the current stream gave output

    def _new(self):
        return self._lzma.LZMADecompressor(self._lzma.FORMAT_XZ, memlimit=self.MEMLIMIT)

    def read(self, size: int) -> bytes:
        while True:
            data = b""
            if self._dec.eof:  # the next stream, if any
                self._streams += 1
                data = self._dec.unused_data or self._raw.read(CHUNK // 4)
                if not data:
                    return b""
                self._dec, self._produced = self._new(), False
            elif self._dec.needs_input:
                data = self._raw.read(CHUNK // 4)
                if not data:
                    if self._streams and not self._produced:  # stream padding after the last stream
                        return b""
                    raise EOFError("compressed stream ended before the end-of-stream marker")
            try:
                out = self._dec.decompress(data, size)
            except self._lzma.LZMAError as e:
                if "memory" in str(e).lower():
                    raise ValueError(
                        f"the xz stream needs more than {self.MEMLIMIT >> 20} MiB to decode"
                    ) from e
                if self._streams and not self._produced:
                    return b""  # trailing bytes after the last stream, as lzma.LZMAFile ignores them
                raise
            if out:
                self._produced = True
                return out


class _Bzip2Reader:
    """bzip2 decoding that stops a stream expanding more than :data:`_BZIP2_MAX_RATIO` times."""

    def __init__(self, raw: HashingReader) -> None:
        import bz2

        self._raw = raw
        self._file = bz2.BZ2File(raw)
        self._out = 0

    def read(self, size: int) -> bytes:
        out = self._file.read(size)
        self._out += len(out)
        if self._out > _BZIP2_MAX_RATIO * self._raw.count + _BZIP2_SLACK:
            raise ValueError(f"the bzip2 stream expands over {_BZIP2_MAX_RATIO} times: a decompression bomb")
        return out


def _decoder(raw: HashingReader):
    """A reader of the decompressed bytes, chosen by the blob's magic bytes."""
    head = raw.peek(8)
    if head.startswith(_GZIP_MAGIC):
        return _GzipReader(raw)
    if head.startswith(_ZSTD_MAGIC):
        return _ZstdReader(raw)
    if head.startswith(_BZIP2_MAGIC):
        return _Bzip2Reader(raw)
    if head.startswith(_XZ_MAGIC):
        return _XzReader(raw)
    return raw


class Window:
    """Where a layer blob lies in its file, and what it must hash to.

    ``digest`` and ``diff_id`` are the expected values (None: not checked); ``label`` names the
    layer in error messages; ``size`` None reaches to the end of the file.
    """

    __slots__ = ("diff_id", "digest", "label", "offset", "size")

    def __init__(
        self, label: str, digest: str | None, diff_id: str | None, offset: int = 0, size: int | None = None
    ) -> None:
        self.label, self.digest, self.diff_id = label, digest, diff_id
        self.offset, self.size = offset, size


class LayerDecoder:
    """The decompressed bytes of one layer blob's ``window``; verifies its digests at the end."""

    def __init__(self, f: BinaryIO, window: Window) -> None:
        self.label = window.label
        self.digest = window.digest
        self.diff_id = window.diff_id
        self.raw = HashingReader(f, window.digest is not None, window.offset, window.size)
        self._diff_hash = hashlib.sha256() if window.diff_id else None
        self._dec = _decoder(self.raw)

    def produce(self) -> bytes:
        """The next decompressed chunk; b"" at the end of the stream, after verification."""
        try:
            out = self._dec.read(CHUNK)
        except Exception as e:  # EOFError, zlib/isal errors, ZstdError, LZMAError, OSError
            raise IntegrityError(f"layer {self.label}: corrupt or truncated compressed data ({e})") from e
        if out:
            if self._diff_hash is not None:
                self._diff_hash.update(out)
            return out
        for kind, want, h in (
            ("blob digest", self.digest, self.raw.hash),
            ("diff_id", self.diff_id, self._diff_hash),
        ):
            if h is not None and (got := "sha256:" + h.hexdigest()) != want:
                raise IntegrityError(f"layer {self.label}: {kind} mismatch: expected {want}, got {got}")
        return b""

    def close(self) -> None:
        """Close the blob file."""
        self.raw.close()
