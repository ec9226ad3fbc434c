"""Reading one layer blob: its bytes decompressed and verified while they stream.

:func:`open_layer` hashes the compressed bytes (the blob digest) and the decompressed bytes
(the config's ``diff_id``) while streaming and raises :class:`~hpcsif.errors.IntegrityError`
at end of stream when either differs or the compressed stream is truncated. The compression
is detected from the magic bytes (gzip, zstd, bzip2, xz or plain tar), whatever the media type
says. Large compressed layers are inflated in a child process (:mod:`hpcsif.image.inflate`),
others in a thread a few chunks ahead of the reader.
"""

from __future__ import annotations

import io
import os
import queue
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hpcsif.errors import LayerError
from hpcsif.image import inflate
from hpcsif.image.decode import CHUNK, LayerDecoder, Window, is_compressed


@dataclass(frozen=True)
class LayerBlob:
    """A layer blob on disk, with the digests to verify while reading it."""

    path: Path
    media_type: str
    digest: str | None
    diff_id: str | None
    # a byte range of ``path`` (a layer inside an uncompressed archive, read in place)
    offset: int = 0
    size: int | None = None

    @property
    def label(self) -> str:
        """How messages name this layer: its digest, or its file name."""
        return self.digest or str(self.path)


class _ThreadInflater:
    """Runs a :class:`LayerDecoder` in a thread, a few chunks ahead of the reader (bounded memory).

    For small and uncompressed layers, where a child process (:mod:`hpcsif.image.inflate`)
    would cost more than it saves.
    """

    _DEPTH = 4

    def __init__(self, decoder: LayerDecoder, name: str) -> None:
        self._decoder = decoder
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(self._DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def bytes_in(self) -> int:
        """Compressed bytes read so far."""
        return self._decoder.raw.count

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._decoder.produce()
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as e:  # handed to the reader, raised in its thread
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> bytes:
        """The next chunk (b"" at the end); re-raises what the decoder raised."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the decoder thread (the reader may stop early), wait for it, close the blob."""
        self._stop.set()
        self._thread.join()
        self._decoder.close()


class LayerStream(io.RawIOBase):
    """Decompressed bytes of a layer blob; verifies digest and diff_id at end of stream.

    Supports ``tell`` and forward ``seek`` so :mod:`tarfile` can read it in its
    random-access mode, which copies far less than its stream mode. Large compressed
    layers are inflated by a child process, the rest by a thread.
    """

    def __init__(self, layer: LayerBlob, verify: bool = True, *, process: bool | None = None) -> None:
        super().__init__()
        self.layer = layer
        digest = layer.digest if verify else None
        diff_id = layer.diff_id if verify else None
        try:  # without blocking: a FIFO is refused below, not waited on for ever
            fd = os.open(layer.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise LayerError(f"layer {layer.label}: cannot open blob {layer.path}: {e.strerror}") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LayerError(f"layer {layer.label}: blob {layer.path} is not a regular file")
        f = open(fd, "rb", buffering=0)  # noqa: SIM115 - the inflater closes it
        self._source: _ThreadInflater | inflate.InflateProcess
        try:
            if process is None:
                size = layer.size if layer.size is not None else os.fstat(f.fileno()).st_size - layer.offset
                process = inflate.worthwhile(size) and is_compressed(os.pread(f.fileno(), 8, layer.offset))
            window = Window(layer.label, digest, diff_id, layer.offset, layer.size)
            if process:
                self._source = inflate.InflateProcess(f.fileno(), window)
                self._file = f
            else:
                decoder = LayerDecoder(f, window)
                self._source = _ThreadInflater(decoder, f"hpcsif-layer-{layer.label[7:19]}")
                self._file = None
        except OSError as e:
            f.close()
            raise LayerError(f"layer {layer.label}: cannot read blob {layer.path}: {e.strerror}") from e
        self._buf = b""
        self._pos = 0  # position in _buf
        self._offset = 0  # stream position of _buf[0]
        self._eof = False

    @property
    def bytes_in(self) -> int:
        """Compressed bytes read so far."""
        return self._source.bytes_in

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._offset + self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        """Move forward only (skipping is reading)."""
        if whence == io.SEEK_CUR:
            pos += self.tell()
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a layer stream seeks forward only")
        skip = pos - self.tell()
        if skip < 0:
            raise io.UnsupportedOperation("a layer stream seeks forward only")
        while skip:
            n = len(self.read(min(skip, CHUNK)))
            if not n:
                break
            skip -= n
        return self.tell()

    def _fill(self) -> bool:
        """Refill the buffer; False at end of stream."""
        if self._eof:
            return False
        out = self._source.get()
        self._offset += len(self._buf)
        self._buf, self._pos = out, 0
        self._eof = not out
        return bool(out)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes: fewer only at end of stream (tarfile relies on that)."""
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        if self._pos >= len(self._buf) and not self._fill():
            return b""
        if self._pos == 0 and size == len(self._buf):
            self._pos = len(self._buf)
            return self._buf
        data = self._buf[self._pos : self._pos + size]
        self._pos += len(data)
        if len(data) == size:
            return data
        parts = [data]
        need = size - len(data)
        while need and self._fill():
            part = self._buf[:need]
            self._pos = len(part)
            parts.append(part)
            need -= len(part)
        return b"".join(parts)

    def peek(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer only at end of stream), left to be read."""
        while len(self._buf) - self._pos < size and not self._eof:
            out = self._source.get()
            self._eof = not out
            self._offset += self._pos
            self._buf, self._pos = self._buf[self._pos :] + out, 0
        return self._buf[self._pos : self._pos + size]

    def read_some(self, size: int) -> bytes:
        """Up to ``size`` bytes without copying across buffers (short reads allowed)."""
        if self._pos >= len(self._buf) and not self._fill():
            return b""
        if self._pos == 0 and size >= len(self._buf):
            self._pos = len(self._buf)
            return self._buf
        data = self._buf[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end of the stream, which verifies the digests."""
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        self._source.close()
        if self._file is not None:  # the child process's blob: ours to close
            self._file.close()
        super().close()


def open_layer(layer: LayerBlob) -> BinaryIO:
    """Open ``layer`` as a stream of uncompressed tar bytes.

    The blob digest and the diff_id (when given) are verified as the bytes go by; reading
    to the end raises :class:`IntegrityError` on a mismatch or a truncated stream.
    """
    return LayerStream(layer)  # type: ignore[return-value]
