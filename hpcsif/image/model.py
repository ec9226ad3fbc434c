"""Plain values handed between stages: descriptors, platforms and images."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcsif.errors import SourceError

if TYPE_CHECKING:
    from hpcsif.image.layer_stream import LayerBlob
    from hpcsif.image.store import OCIStore

_MACHINE_TO_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
    "i386": "386",
    "armv7l": "arm",
}


def host_arch() -> str:
    """The host's architecture as a GOARCH name (``amd64``, ``arm64`` …)."""
    machine = os.uname().machine  # platform.machine(), without importing platform
    return _MACHINE_TO_GOARCH.get(machine, machine)


@dataclass(frozen=True)
class Platform:
    """An OCI platform (os/architecture/variant)."""

    os: str = "linux"
    architecture: str = field(default_factory=host_arch)
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``arch``, ``os/arch`` or ``os/arch/variant``."""
        parts = text.split("/")
        if len(parts) == 1:
            return cls(architecture=parts[0])
        if len(parts) in (2, 3):
            return cls(os=parts[0], architecture=parts[1], variant=parts[2] if len(parts) == 3 else None)
        raise SourceError(f"invalid platform {text!r}: expected ARCH, OS/ARCH or OS/ARCH/VARIANT")

    def matches(self, spec: dict[str, Any] | None) -> bool:
        """True if an index entry's ``platform`` object fits this platform."""
        if not spec:
            return False
        if spec.get("os") != self.os or spec.get("architecture") != self.architecture:
            return False
        return self.variant is None or spec.get("variant") in (None, self.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Descriptor:
        """Build from a descriptor JSON object (manifest layers, index entries)."""
        if not isinstance(obj, dict):
            raise SourceError(f"malformed descriptor {str(obj)[:100]}: not a JSON object")
        try:
            return cls(
                media_type=obj.get("mediaType", ""),
                digest=obj["digest"],
                size=int(obj["size"]),
                annotations=dict(obj.get("annotations") or {}),
                platform=obj.get("platform"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"malformed descriptor {obj!r}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The descriptor as an OCI JSON object."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


@dataclass(frozen=True)
class BlobSpan:
    """A blob that is a byte range of another file (a layer inside an uncompressed archive)."""

    path: Path
    offset: int
    size: int


@dataclass
class Image:
    """An OCI image whose manifest and config are in ``store``; layers there or in ``spans``."""

    store: OCIStore
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]
    layers: list[Descriptor]
    source: str = ""  # the reference it came from, for labels and messages
    spans: dict[str, BlobSpan] = field(default_factory=dict)  # layer digest -> where it is read

    @property
    def container_config(self) -> dict[str, Any]:
        """The image's runtime config (``Env``, ``Entrypoint``, ``Cmd`` …), possibly empty."""
        return self.config.get("config") or self.config.get("container_config") or {}

    @property
    def architecture(self) -> str:
        """The image's GOARCH name; the host's where the config names none, or a name that is
        no GOARCH name (``x86_64``, ``AMD64``), as Apptainer builds such images for the host."""
        from hpcsif.sif.format import ARCH_CODES

        arch = self.config.get("architecture")
        return arch if isinstance(arch, str) and arch in ARCH_CODES else host_arch()

    def layer_blobs(self) -> list[LayerBlob]:
        """The layers as :class:`LayerBlob` values, with diff_ids from the config when present."""
        from hpcsif.image.layer_stream import LayerBlob

        if not self.layers:  # as Apptainer: a config alone is no root file system to run
            raise SourceError(f"image {self.source or self.manifest_digest} has no layers")
        rootfs = self.config.get("rootfs") or {}
        diff_ids = rootfs.get("diff_ids") or [] if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            # Apptainer's decoder refuses it too; read on, it would end in a traceback
            raise SourceError(
                f"image {self.source or self.manifest_digest}: config rootfs is not an object "
                f"with a list of diff_id digests: {self.config.get('rootfs')!r:.80}"
            )
        if diff_ids and len(diff_ids) != len(self.layers):
            raise SourceError(
                f"image {self.source or self.manifest_digest}: config lists {len(diff_ids)} diff_ids "
                f"for {len(self.layers)} layers"
            )
        blobs = []
        for i, d in enumerate(self.layers):
            diff_id = diff_ids[i] if diff_ids else None
            span = self.spans.get(d.digest)
            if span:
                where = {"offset": span.offset, "size": span.size}
                blob = LayerBlob(span.path, d.media_type, d.digest, diff_id, **where)
            else:
                blob = LayerBlob(self.store.blob_path(d.digest), d.media_type, d.digest, diff_id)
            blobs.append(blob)
        return blobs
