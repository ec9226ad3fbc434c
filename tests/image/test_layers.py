"""open_layer: compression detection and digest/diff_id verification while streaming."""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path

import pytest

from hpcsif.errors import IntegrityError, LayerError
from hpcsif.image import mediatypes as mt
from hpcsif.image.layer_stream import LayerBlob, open_layer
from hpcsif.image.layers import flatten
from hpcsif.sif.squashfs import squashfs_from_tar
from tests.image.tarbuild import blob, compress, d, file, sha, tar_bytes

RAW = tar_bytes([d("etc"), file("etc/hostname", "box\n"), file("big", os.urandom(300_000))])


def _read_all(lay: LayerBlob) -> bytes:
    stream = open_layer(lay)
    try:
        return b"".join(iter(lambda: stream.read(65536), b""))
    finally:
        stream.close()


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none", "bz2", "xz"])
def test_decompresses_and_verifies(tmp_path: Path, compression: str):
    lay = blob(tmp_path, RAW, compression)
    assert _read_all(lay) == RAW


def test_compression_detected_by_magic_not_media_type(tmp_path: Path):
    lay = dataclasses.replace(blob(tmp_path, RAW, "zstd"), media_type=mt.DOCKER_LAYER_GZIP)
    assert _read_all(lay) == RAW
    plain = dataclasses.replace(blob(tmp_path, RAW, "none"), media_type=mt.OCI_LAYER_GZIP)
    assert _read_all(plain) == RAW


def test_multi_member_gzip(tmp_path: Path):
    half = len(RAW) // 2
    data = gzip.compress(RAW[:half]) + gzip.compress(RAW[half:])
    path = tmp_path / "multi"
    path.write_bytes(data)
    assert _read_all(LayerBlob(path, mt.OCI_LAYER_GZIP, sha(data), sha(RAW))) == RAW


def test_multi_frame_zstd(tmp_path: Path):
    half = len(RAW) // 2
    data = compress(RAW[:half], "zstd") + compress(RAW[half:], "zstd")
    path = tmp_path / "multi"
    path.write_bytes(data)
    assert _read_all(LayerBlob(path, mt.OCI_LAYER_ZSTD, sha(data), sha(RAW))) == RAW


def test_blob_digest_mismatch_names_layer_expected_and_actual(tmp_path: Path):
    lay = blob(tmp_path, RAW, "gzip")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(IntegrityError) as err:
        _read_all(dataclasses.replace(lay, digest=wrong))
    msg = str(err.value)
    assert "blob digest mismatch" in msg and wrong in msg and lay.digest in msg


def test_diff_id_mismatch(tmp_path: Path):
    lay = dataclasses.replace(blob(tmp_path, RAW, "zstd"), diff_id="sha256:" + "1" * 64)
    with pytest.raises(IntegrityError, match=r"diff_id mismatch: expected sha256:1{64}, got " + sha(RAW)):
        _read_all(lay)


def test_digests_optional(tmp_path: Path):
    lay = blob(tmp_path, RAW, "gzip", digests=False)
    assert lay.digest is None and _read_all(lay) == RAW


@pytest.mark.parametrize("compression", ["gzip", "zstd", "xz"])
def test_truncated_compressed_stream(tmp_path: Path, compression: str):
    lay = blob(tmp_path, RAW, compression, digests=False)
    data = lay.path.read_bytes()
    lay.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="corrupt or truncated"):
        _read_all(lay)


def test_truncated_plain_tar_fails_flatten(tmp_path: Path):
    lay = blob(tmp_path, RAW, "none", digests=False)
    lay.path.write_bytes(RAW[:150_000])
    with open(os.devnull, "wb") as out, pytest.raises(LayerError, match="truncated"):
        flatten([lay], out)


def test_not_a_tar(tmp_path: Path):
    path = tmp_path / "junk"
    path.write_bytes(b"this is not a tar archive" * 100)
    with open(os.devnull, "wb") as out, pytest.raises(LayerError, match="not a valid tar"):
        flatten([LayerBlob(path, mt.OCI_LAYER, None, None)], out)


def test_missing_blob(tmp_path: Path):
    with pytest.raises(LayerError, match="cannot open blob"):
        open_layer(LayerBlob(tmp_path / "nope", mt.OCI_LAYER, "sha256:" + "2" * 64, None))


def test_corrupt_layer_leaves_no_squashfs(tmp_path: Path):
    good = blob(tmp_path, RAW, "gzip")
    bad = dataclasses.replace(
        blob(tmp_path, tar_bytes([file("x", "y")]), "zstd"), diff_id="sha256:" + "3" * 64
    )
    dest = tmp_path / "out.sqfs"
    with pytest.raises(IntegrityError, match="diff_id mismatch"):
        squashfs_from_tar(lambda pipe: flatten([good, bad], pipe), dest)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
