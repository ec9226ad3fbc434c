"""Compose small OCI images from local files, with no registry or daemon.

Used by ``hpcsif.demo`` (the offline demo image) and by the tests to build their images.
Layers are tar streams made with :mod:`tarfile`; the result is written as an OCI image
layout or as a ``docker save`` archive.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcsif.image import mediatypes as mt

MTIME = 1_700_000_000  # fixed timestamps: the same inputs give the same digests


@dataclass(frozen=True)
class Entry:
    """One tar member: a file (``data``), a directory (neither), a symlink or a hardlink."""

    path: str
    data: bytes | None = None
    mode: int = 0o644
    symlink: str | None = None
    hardlink: str | None = None
    uid: int = 0
    gid: int = 0


def layer_tar(entries: Sequence[Entry]) -> bytes:
    """An uncompressed PAX tar holding ``entries`` in order."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.mtime, info.mode, info.uid, info.gid = MTIME, e.mode, e.uid, e.gid
            if e.symlink is not None:
                info.type, info.linkname = tarfile.SYMTYPE, e.symlink
                tar.addfile(info)
            elif e.hardlink is not None:
                info.type, info.linkname = tarfile.LNKTYPE, e.hardlink
                tar.addfile(info)
            elif e.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    return raw.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class ImageSpec:
    """Layers (uncompressed tars, bottom first) and the runtime config of an image."""

    layers: list[bytes]
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/local/bin:/usr/bin:/bin"])
    labels: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    architecture: str = "amd64"

    def config(self) -> dict[str, Any]:
        """The OCI image config JSON object."""
        cfg: dict[str, Any] = {"Env": self.env}
        for key, value in (("Entrypoint", self.entrypoint), ("Cmd", self.cmd), ("Labels", self.labels)):
            if value:
                cfg[key] = value
        if self.workdir:
            cfg["WorkingDir"] = self.workdir
        return {
            "architecture": self.architecture,
            "os": "linux",
            "created": "2023-11-14T22:13:20Z",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [_digest(t) for t in self.layers]},
            "history": [{"created_by": f"layer {i}"} for i in range(len(self.layers))],
        }


def write_oci_layout(dest: Path, spec: ImageSpec, tag: str = "latest", *, compress: str = "gzip") -> str:
    """Add the image to the OCI layout ``dest`` (made if needed) as ``tag``; return its manifest digest."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = _digest(data)
        (blobs / d[7:]).write_bytes(data)
        return d

    layer_descs = []
    for tar in spec.layers:
        if compress == "gzip":
            blob, media = gzip.compress(tar, mtime=0), mt.OCI_LAYER_GZIP
        else:
            blob, media = tar, mt.OCI_LAYER
        layer_descs.append({"mediaType": media, "digest": put(blob), "size": len(blob)})
    config = json.dumps(spec.config(), sort_keys=True).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": put(config), "size": len(config)},
            "layers": layer_descs,
        },
        sort_keys=True,
    ).encode()
    mdigest = put(manifest)
    index_path = dest / "index.json"
    index = (
        json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    )
    index["manifests"] = [
        m for m in index["manifests"] if (m.get("annotations") or {}).get(mt.REF_NAME) != tag
    ] + [
        {
            "mediaType": mt.OCI_MANIFEST,
            "digest": mdigest,
            "size": len(manifest),
            "annotations": {mt.REF_NAME: tag},
        }
    ]
    index_path.write_text(json.dumps(index))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}))
    return mdigest


def write_docker_archive(dest: Path, images: Sequence[tuple[str, ImageSpec]]) -> Path:
    """Write a ``docker save`` archive holding each (``repo:tag``, image)."""
    manifest = []
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as out:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), MTIME
            out.addfile(info, io.BytesIO(data))

        seen: set[str] = set()
        for repo_tag, spec in images:
            config = json.dumps(spec.config(), sort_keys=True).encode()
            config_name = _digest(config)[7:] + ".json"
            layer_names = []
            for tar in spec.layers:
                name = f"{_digest(tar)[7:]}/layer.tar"
                if name not in seen:
                    add(name, tar)
                    seen.add(name)
                layer_names.append(name)
            add(config_name, config)
            manifest.append({"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names})
        add("manifest.json", json.dumps(manifest).encode())
    return dest
