"""``oras://registry/repo:tag``: SIF files stored in a registry as OCI artifacts.

The layout is Apptainer's: an OCI image manifest whose config has media type
``application/vnd.sylabs.sif.config.v1+json`` (content ``{}``) and whose single layer is the
SIF file, media type ``application/vnd.sylabs.sif.layer.v1.sif``, titled with the file name.
An index of such manifests (a multi-architecture artifact) gives the one for the platform asked.
As Apptainer's oras cache, a pulled SIF is known by its layer's digest (:func:`resolve`): the
SIF cache keeps it under that key, so another tag or manifest naming the same file is a hit.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcsif.errors import NotFoundError, RegistryError, SourceError
from hpcsif.fsutil import fsync_dir
from hpcsif.image import mediatypes as mt
from hpcsif.image.digest import check_digest, sha256_bytes, sha256_file
from hpcsif.image.model import Descriptor, Platform
from hpcsif.image.select import resolve_manifest
from hpcsif.image.store import OCIStore, load_json_object
from hpcsif.refs import Reference
from hpcsif.sources.credentials import Credentials
from hpcsif.sources.remote import is_sif, umasked

log = logging.getLogger(__name__)

TITLE = "org.opencontainers.image.title"
_CONFIG = b"{}"
#: the SIF layer media types Apptainer pulls: the current one and its prototype's (sic)
_SIF_LAYERS = (mt.SIF_LAYER, "appliciation/vnd.sylabs.sif.layer.tar")
#: the source options (as the CLI gathers them for every registry) that oras:// takes
_OPTIONS = ("credentials", "insecure", "authfile", "platform")


def oras_options(source_options: dict[str, Any]) -> dict[str, Any]:
    """The options of *source_options* that :func:`resolve` and :func:`download_sif` take."""
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
    if not path.exists():
        raise SourceError(f"{path}: no such SIF file")
    if not path.is_file() or not is_sif(path):  # a sandbox directory too: Apptainer's words
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


def _sif_layer(client: Any, ref: Reference, platform: Platform | None) -> Descriptor:
    """The descriptor of the one SIF layer of the artifact manifest ``ref`` names (from an index:
    the manifest for ``platform``, by default this host's, as Apptainer picks it)."""
    repo, docs = ref.repository or "", {}

    def get(reference: str) -> Descriptor:
        data, media_type, digest = client.get_manifest(repo, reference)
        docs[digest] = load_json_object(data, f"{ref}: manifest")  # hostile nesting, lists: one line
        return Descriptor(docs[digest].get("mediaType") or media_type, digest, len(data))

    def read(desc: Descriptor) -> dict[str, Any]:
        return docs[desc.digest] if desc.digest in docs else docs[get(desc.digest).digest]

    _, manifest = resolve_manifest(get(ref.digest or ref.reference), read, platform or Platform(), str(ref))
    try:
        layers = [Descriptor.from_json(layer) for layer in manifest.get("layers") or []]
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise SourceError(f"{ref}: unreadable manifest: {exc}") from None
    sifs = [d for d in layers if d.media_type in _SIF_LAYERS]
    if len(sifs) != 1:
        found = ", ".join(sorted({d.media_type for d in layers})) or "no layers"
        raise SourceError(f"{ref}: not a SIF artifact (expected one {mt.SIF_LAYER} layer, found {found})")
    return sifs[0]


def _blob(client: Any, ref: Reference, digest: str) -> Descriptor:
    """The SIF blob ``digest`` of ``ref``'s repository, which the tag no longer names (its size: HEAD)."""
    repo = ref.repository or ""
    resp = client.request("HEAD", f"{repo}/blobs/{check_digest(digest)}", scope=f"repository:{repo}:pull")
    resp.close()
    if resp.status_code == 404:
        raise NotFoundError(f"{ref}: the SIF {digest} it named is gone from the registry; pull it again")
    try:
        size = int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        raise RegistryError(f"{ref}: the registry gives no size for blob {digest}") from None
    return Descriptor(mt.SIF_LAYER, digest, size)


def resolve(
    ref: Reference,
    *,
    credentials: Credentials | None = None,
    insecure: bool = False,
    authfile: str | os.PathLike[str] | None = None,
    platform: Platform | None = None,
) -> str:
    """The digest of the SIF layer of the artifact ``ref`` names (what a cached SIF of it is keyed on)."""
    return _sif_layer(_client(ref, credentials, insecure, authfile), ref, platform).digest


def download_sif(
    ref: Reference,
    dest: str | os.PathLike[str],
    *,
    layer: str | None = None,
    credentials: Credentials | None = None,
    insecure: bool = False,
    authfile: str | os.PathLike[str] | None = None,
    platform: Platform | None = None,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Download the SIF artifact at ``ref`` to ``dest`` atomically (mode 0777 less the umask).

    ``layer``: the SIF's digest, as :func:`resolve` gave it; that file is fetched even where the
    tag has moved on since (the cache keeps it under that digest). ``notify`` hears
    Apptainer's "Downloading oras image".
    """
    client = _client(ref, credentials, insecure, authfile)
    desc = _sif_layer(client, ref, platform)
    if layer and desc.digest != layer:
        log.info("%s now names %s; fetching the %s it named", ref, desc.digest, layer)
        desc = _blob(client, ref, layer)
    if notify:
        notify("Downloading oras image")
    dest = Path(dest)
    # the blob is fetched (resumably, verified) beside dest, then renamed there: no second copy
    with tempfile.TemporaryDirectory(prefix=".hpcsif-oras-", dir=dest.parent) as tmp:
        store = OCIStore(tmp)
        client.fetch_blob(ref.repository or "", desc, store)
        blob = store.blob_path(desc.digest)
        if not is_sif(blob):
            raise SourceError(f"{ref}: the artifact's {mt.SIF_LAYER} layer is not a SIF file")
        os.chmod(blob, umasked(0o777))
        os.replace(blob, dest)
    fsync_dir(dest.parent)
    return dest
