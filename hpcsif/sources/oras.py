"""``oras://registry/repo:tag``: SIF files stored in a registry as OCI artifacts.

The layout is Apptainer's: an OCI image manifest whose config has media type
``application/vnd.sylabs.sif.config.v1+json`` (content ``{}``) and whose single layer is the
SIF file, media type ``application/vnd.sylabs.sif.layer.v1.sif``, titled with the file name.
Pulled SIFs pass through the blob cache, so a second pull of the same digest is a local copy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcsif.errors import SourceError
from hpcsif.image import mediatypes as mt
from hpcsif.image.digest import sha256_bytes, sha256_file
from hpcsif.image.model import Descriptor
from hpcsif.image.store import OCIStore, load_json_object
from hpcsif.refs import Reference
from hpcsif.sources.credentials import Credentials
from hpcsif.sources.remote import atomic_output, is_sif, umasked

log = logging.getLogger(__name__)

TITLE = "org.opencontainers.image.title"
_CONFIG = b"{}"
#: the source options (as the CLI gathers them for every registry) that oras:// takes
_OPTIONS = ("credentials", "insecure", "authfile")


def oras_options(source_options: dict[str, Any]) -> dict[str, Any]:
    """The options of *source_options* that :func:`resolve` (and :func:`pull_sif`, with ``notify``) take."""
    return {k: v for k, v in source_options.items() if k in _OPTIONS}


def _client(
    ref: Reference, credentials: Credentials | None, insecure: bool, authfile: str | os.PathLike[str] | None
):  # -> RegistryClient
    from hpcsif.sources.registry import shared_clients

    if not ref.registry or not ref.repository:
        raise SourceError(f"{ref.raw}: not an oras://registry/repository[:tag] reference")
    return shared_clients(
        ref.registry, credentials=credentials, insecure=insecure, authfile=authfile, repository=ref.repository
    )[-1]


def push_sif(
    sif: str | os.PathLike[str],
    ref: Reference,
    *,
    credentials: Credentials | None = None,
    insecure: bool = False,
    authfile: str | os.PathLike[str] | None = None,
) -> str:
    """Push the SIF file to ``ref`` as an ORAS artifact; returns the manifest digest."""
    path = Path(sif)
    if not path.is_file():
        raise SourceError(f"{path}: no such SIF file")
    if not is_sif(path):
        raise SourceError(f"{path}: not a SIF file")
    client = _client(ref, credentials, insecure, authfile)
    repo = ref.repository or ""
    size = path.stat().st_size
    digest = sha256_file(str(path))
    log.info("Uploading %s (%d bytes) to %s", path, size, ref)
    client.push_blob(repo, digest, size, lambda: open(path, "rb"))  # noqa: SIM115 - closed by the client
    config_digest = sha256_bytes(_CONFIG)
    client.push_blob(repo, config_digest, len(_CONFIG), _CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.SIF_CONFIG, "digest": config_digest, "size": len(_CONFIG)},
        "layers": [
            {"mediaType": mt.SIF_LAYER, "digest": digest, "size": size, "annotations": {TITLE: path.name}}
        ],
    }
    data = json.dumps(manifest, separators=(",", ":")).encode()
    return client.put_manifest(repo, ref.digest or ref.tag or "latest", data, mt.OCI_MANIFEST)


def pull_sif(
    ref: Reference,
    dest: str | os.PathLike[str],
    store: OCIStore,
    *,
    credentials: Credentials | None = None,
    insecure: bool = False,
    authfile: str | os.PathLike[str] | None = None,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Pull the SIF artifact at ``ref`` through ``store`` and copy it to ``dest`` atomically.

    ``notify`` hears Apptainer's "Downloading oras image" or "Using cached SIF image".
    """
    client = _client(ref, credentials, insecure, authfile)
    repo = ref.repository or ""
    data, _media_type, _digest = client.get_manifest(repo, ref.digest or ref.reference)
    manifest = load_json_object(data, f"{ref}: manifest")  # hostile nesting, lists: one line
    try:
        layers = [Descriptor.from_json(layer) for layer in manifest.get("layers") or []]
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise SourceError(f"{ref}: unreadable manifest: {exc}") from None
    sifs = [d for d in layers if d.media_type == mt.SIF_LAYER]
    if len(sifs) != 1:
        found = ", ".join(sorted({d.media_type for d in layers})) or "no layers"
        raise SourceError(f"{ref}: not a SIF artifact (expected one {mt.SIF_LAYER} layer, found {found})")
    if notify:
        cached = store.has_blob(sifs[0].digest, sifs[0].size)
        notify("Using cached SIF image" if cached else "Downloading oras image")
    client.fetch_blob(repo, sifs[0], store)
    if not is_sif(store.blob_path(sifs[0].digest)):
        raise SourceError(f"{ref}: the artifact's {mt.SIF_LAYER} layer is not a SIF file")
    dest = Path(dest)
    with atomic_output(dest, umasked(0o777)) as out, open(store.blob_path(sifs[0].digest), "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
    return dest


def resolve(
    ref: Reference,
    *,
    credentials: Credentials | None = None,
    insecure: bool = False,
    authfile: str | os.PathLike[str] | None = None,
) -> str:
    """The digest of the artifact manifest ``ref`` names (what a cached SIF of it is keyed on)."""
    if ref.digest:
        return ref.digest
    client = _client(ref, credentials, insecure, authfile)
    return client.get_manifest(ref.repository or "", ref.reference)[2]


def download_sif(ref: Reference, dest: str | os.PathLike[str], **options: Any) -> Path:
    """:func:`pull_sif` without a blob cache: the artifact passes through a throw-away store beside *dest*."""
    with tempfile.TemporaryDirectory(prefix=".hpcsif-oras-", dir=Path(dest).parent) as tmp:
        return pull_sif(ref, dest, OCIStore(tmp), **options)
