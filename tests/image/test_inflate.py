"""The child-process inflater: same bytes as the thread, its errors, early stops and progress."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from hpcsif.errors import IntegrityError
from hpcsif.image import inflate
from hpcsif.image.layer_stream import LayerBlob, LayerStream
from tests.image.tarbuild import blob, d, file, tar_bytes

RAW = tar_bytes([d("etc"), file("etc/hostname", "box\n"), file("big", os.urandom(3_000_000))])


@pytest.mark.parametrize("compression", ["gzip", "zstd", "bz2", "xz"])
def test_child_process_yields_the_thread_bytes(tmp_path: Path, compression: str):
    lay = blob(tmp_path, RAW, compression)
    stream = LayerStream(lay, process=True)
    try:
        assert isinstance(stream._source, inflate.InflateProcess)
        assert stream.read(-1) == RAW
        assert stream.bytes_in == lay.path.stat().st_size  # read through the shared offset
    finally:
        stream.close()


def test_child_process_reports_a_digest_mismatch(tmp_path: Path):
    lay = blob(tmp_path, RAW, "gzip")
    lay = type(lay)(lay.path, lay.media_type, "sha256:" + "0" * 64, lay.diff_id)
    stream = LayerStream(lay, process=True)
    try:
        with pytest.raises(IntegrityError, match=r"blob digest mismatch: expected sha256:0{64}, got sha256:"):
            stream.read(-1)
    finally:
        stream.close()


def test_a_killed_child_is_an_integrity_error_not_a_short_layer(tmp_path: Path):
    lay = blob(tmp_path, RAW, "gzip")
    stream = LayerStream(lay, process=True)
    try:
        stream.read(1000)
        os.kill(stream._source._proc.pid, signal.SIGKILL)
        with pytest.raises(IntegrityError, match="decompressing process failed"):
            stream.read(-1)
    finally:
        stream.close()


def test_stopping_early_reaps_the_child(tmp_path: Path):
    lay = blob(tmp_path, RAW, "gzip")
    stream = LayerStream(lay, process=True)
    stream.read(1000)
    proc = stream._source._proc
    stream.close()
    assert proc.returncode is not None  # stopped and reaped, no zombie left behind


def test_large_compressed_layers_use_a_process_small_ones_a_thread(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(inflate, "MIN_BYTES", 1 << 20)
    for sub in ("big", "plain", "small"):
        (tmp_path / sub).mkdir()
    big = LayerStream(blob(tmp_path / "big", RAW, "gzip"))
    plain = LayerStream(blob(tmp_path / "plain", RAW, "none"))  # nothing to inflate
    small = LayerStream(blob(tmp_path / "small", tar_bytes([file("a", "x")]), "gzip"))
    try:
        assert isinstance(big._source, inflate.InflateProcess)
        assert not isinstance(plain._source, inflate.InflateProcess)
        assert not isinstance(small._source, inflate.InflateProcess)
        assert big.read(-1) == plain.read(-1) == RAW
    finally:
        for stream in (big, plain, small):
            stream.close()


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_a_window_inside_a_larger_file(tmp_path: Path, process: bool):
    """A compressed layer read in place from inside an archive: offset and size bound it."""
    lay = blob(tmp_path, RAW, "gzip")
    data = lay.path.read_bytes()
    container = tmp_path / "archive.tar"
    container.write_bytes(b"x" * 1536 + data + b"y" * 4096)  # other members around it
    window = LayerBlob(container, lay.media_type, lay.digest, lay.diff_id, offset=1536, size=len(data))
    stream = LayerStream(window, process=process)
    try:
        assert stream.read(-1) == RAW
        assert stream.bytes_in == len(data)
    finally:
        stream.close()


def test_xz_streams_padding_and_memory_limit(tmp_path: Path):
    """Concatenated xz streams and stream padding decode; a stream asking for a 1 GiB dictionary
    is refused before the decoder can fill it (``lzma.LZMAFile`` has no limit)."""
    import lzma

    from tests.image.tarbuild import sha

    tail = tar_bytes([file("tail", "t")])
    raw = tar_bytes([file("a", os.urandom(200_000))])
    data = lzma.compress(raw[:-1024], preset=0) + lzma.compress(raw[-1024:], preset=0) + bytes(8)
    path = tmp_path / "multi.xz"
    path.write_bytes(data)
    lay = LayerBlob(path, "", sha(data), sha(raw))
    stream = LayerStream(lay)
    try:
        assert stream.read(-1) == raw
    finally:
        stream.close()
    huge = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 30}]
    data = lzma.compress(tail, format=lzma.FORMAT_XZ, filters=huge)
    path = tmp_path / "huge.xz"
    path.write_bytes(data)
    stream = LayerStream(LayerBlob(path, "", sha(data), sha(tail)))
    try:
        with pytest.raises(IntegrityError, match="needs more than 256 MiB"):
            stream.read(-1)
    finally:
        stream.close()
