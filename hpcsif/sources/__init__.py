"""Sources: one module per transport behind one interface.

A source turns a :class:`~hpcsif.refs.Reference` into an :class:`~hpcsif.image.model.Image`
whose blobs are in an :class:`~hpcsif.image.store.OCIStore`. ``resolve`` names the content
(a manifest digest, or the digest of the input bytes) without fetching layers, so the cache
can key on it. Modules register themselves in :data:`_REGISTRY` by transport name and are
imported only when a reference needs them.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcsif.errors import ReferenceError

if TYPE_CHECKING:
    from hpcsif.image.model import Image, Platform
    from hpcsif.image.store import OCIStore
    from hpcsif.refs import Reference

# transport -> "module:Class"; modules are imported lazily
_REGISTRY: dict[str, str] = {
    "oci": "hpcsif.sources.ocilayout:OCILayoutSource",
    "oci-archive": "hpcsif.sources.ocilayout:OCIArchiveSource",
    "docker-archive": "hpcsif.sources.dockerarchive:DockerArchiveSource",
    "docker": "hpcsif.sources.registry:RegistrySource",
    "docker-daemon": "hpcsif.sources.daemon:DockerDaemonSource",
}


class Source(ABC):
    """Interface every transport implements."""

    def __init__(self, *, platform: Platform | None = None, **options: object) -> None:
        from hpcsif.image.model import Platform

        self.platform = platform or Platform()
        self.options = options

    @abstractmethod
    def resolve(self, ref: Reference) -> str:
        """A digest naming the image's content (manifest digest or input-bytes digest)."""

    @abstractmethod
    def fetch(self, ref: Reference, store: OCIStore) -> Image:
        """Bring manifest, config and layers into ``store`` and return the image."""


def register(transport: str, target: str) -> None:
    """Register ``module:Class`` as the source for ``transport``."""
    _REGISTRY[transport] = target


def get_source(ref: Reference, **options: object) -> Source:
    """The source object for ``ref``'s transport."""
    target = _REGISTRY.get(ref.transport)
    if target is None:
        raise ReferenceError(f"{ref.raw!r}: transport {ref.transport!r} cannot be converted to an image")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(**options)


#: transports whose references name a SIF file itself: it is downloaded, not converted
SIF_TRANSPORTS = ("oras", "http", "https")


def sif_digest(ref: Reference, source_options: dict[str, Any]) -> str:
    """A digest naming what the SIF reference *ref* holds now (its SIF layer's, or the file's validators)."""
    if ref.transport == "oras":
        from hpcsif.sources import oras

        return oras.resolve(ref, **oras.oras_options(source_options))
    from hpcsif.sources.remote import fingerprint

    return fingerprint(ref.path or ref.raw)


def download_sif(
    ref: Reference, dest: str | os.PathLike[str], source_options: dict[str, Any], digest: str | None = None
) -> Path:
    """Download the SIF *ref* names (``oras://``, ``http(s)://``) to *dest*.

    The ``notify`` of *source_options* hears Apptainer's line ("Downloading oras image" …).
    ``digest``: what :func:`sif_digest` said; for ``oras://``, the SIF fetched even if the tag
    has moved on since (an http(s) server can only be asked for what it serves now).
    """
    notify = source_options.get("notify")
    if ref.transport == "oras":
        from hpcsif.sources import oras

        opts = oras.oras_options(source_options)
        return oras.download_sif(ref, dest, layer=digest, **opts, notify=notify)
    from hpcsif.sources.remote import download_sif as download

    if notify:
        notify("Downloading network image")
    return download(ref.path or ref.raw, dest)
