"""Build layer blobs for tests with Python's tarfile, and read merged results back.

``layer(dir, [entries…], compression)`` writes a tar (gzip/zstd/bz2/xz/plain) and returns a
:class:`LayerBlob` whose digest and diff_id are the real ones. Results are checked with
the real tools: :func:`squash_and_unpack` packs with ``tar2sqfs`` and unpacks with
``unsquashfs``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from hpcsif.image import mediatypes as mt
from hpcsif.image.layers import ExtraFile, LayerBlob, flatten
from hpcsif.sif.squashfs import squashfs_from_tar

MEDIA = {
    "gzip": mt.OCI_LAYER_GZIP,
    "zstd": mt.OCI_LAYER_ZSTD,
    "none": mt.OCI_LAYER,
    "bz2": mt.OCI_LAYER,
    "xz": mt.OCI_LAYER,
}


@dataclass
class E:
    """One tar member: ``kind`` is file, dir, sym, link, fifo, chr, blk."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    target: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.name)
        ti.type = {
            "file": tarfile.REGTYPE,
            "dir": tarfile.DIRTYPE,
            "sym": tarfile.SYMTYPE,
            "link": tarfile.LNKTYPE,
            "fifo": tarfile.FIFOTYPE,
            "chr": tarfile.CHRTYPE,
            "blk": tarfile.BLKTYPE,
        }[self.kind]
        ti.mode = self.mode if self.mode is not None else (0o755 if self.kind == "dir" else 0o644)
        ti.linkname = self.target
        ti.uid, ti.gid, ti.mtime = self.uid, self.gid, self.mtime
        ti.size = len(self.data) if self.kind == "file" else 0
        return ti


def file(name: str, data: bytes | str = b"", mode: int = 0o644, **kw) -> E:
    return E(name, "file", data.encode() if isinstance(data, str) else data, mode, **kw)


def d(name: str, mode: int = 0o755, **kw) -> E:
    return E(name, "dir", mode=mode, **kw)


def sym(name: str, target: str) -> E:
    return E(name, "sym", target=target, mode=0o777)


def link(name: str, target: str) -> E:
    return E(name, "link", target=target)


def whiteout(path: str) -> E:
    parent, _, base = path.rpartition("/")
    return file(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(directory: str) -> E:
    return file(f"{directory}/.wh..wh..opq")


def tar_bytes(
    entries: Sequence[E | tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    """An uncompressed tar archive of ``entries`` (TarInfo values are written as given, with
    zeros or the bytes paired with them as content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            if isinstance(e, tuple):
                tf.addfile(e[0], io.BytesIO(e[1]))
            elif isinstance(e, tarfile.TarInfo):
                tf.addfile(e, io.BytesIO(bytes(e.size)) if e.isreg() else None)
            else:
                tf.addfile(e.tarinfo(), io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    if compression == "bz2":
        return bz2.compress(raw)
    if compression == "xz":
        return lzma.compress(raw)
    return raw


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(directory: Path, raw_tar: bytes, compression: str = "gzip", *, digests: bool = True) -> LayerBlob:
    """Store ``raw_tar`` compressed as a blob under ``directory``; real digest and diff_id."""
    data = compress(raw_tar, compression)
    digest = sha(data)
    path = Path(directory) / digest.split(":")[1]
    path.write_bytes(data)
    return LayerBlob(path, MEDIA[compression], digest if digests else None, sha(raw_tar) if digests else None)


def layer(
    directory: Path,
    entries: Sequence[E | tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]],
    compression: str = "gzip",
) -> LayerBlob:
    """A layer blob holding ``entries``."""
    return blob(directory, tar_bytes(entries), compression)


def squash_and_unpack(
    layers: Sequence[LayerBlob], work: Path, extra: Sequence[ExtraFile] = ()
) -> tuple[Path, dict[str, int]]:
    """Flatten into a real squashfs with tar2sqfs, unpack it with unsquashfs; (root, skipped)."""
    image = work / "image.sqfs"
    stats = {}

    def writer(pipe):
        stats.update(flatten(layers, pipe, extra=extra).skipped)

    squashfs_from_tar(writer, image)
    root = work / "unpacked"
    cmd = ["unsquashfs", "-q", "-no-progress", "-d", str(root), str(image)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return root, stats


def oci_layout(directory: Path, layers: Sequence[LayerBlob], tag: str = "test") -> Path:
    """An OCI image layout at ``directory`` holding ``layers`` (for umoci/skopeo)."""
    import json
    import shutil

    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return digest

    for lay in layers:
        shutil.copyfile(lay.path, blobs / lay.digest.split(":")[1])
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [lay.diff_id for lay in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": put(config), "size": len(config)},
            "layers": [
                {"mediaType": lay.media_type, "digest": lay.digest, "size": lay.path.stat().st_size}
                for lay in layers
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {mt.REF_NAME: tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return directory
