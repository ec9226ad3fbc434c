"""``docker-archive://FILE[:NAME:TAG]``: the ``docker save`` format (``manifest.json``).

Works for archives written by ``docker save`` (legacy ``<id>/layer.tar`` and the newer
OCI-layout flavour), ``podman save`` and ``skopeo copy … docker-archive:``, plain or
gzip-compressed. The archive's layers and config are stored as blobs and an OCI manifest
is written for them, so the rest of the pipeline sees an ordinary OCI image.
"""

from __future__ import annotations

import json
from typing import IO, Any

from hpcsif.errors import AmbiguousImageError, IntegrityError, NotFoundError, SourceError
from hpcsif.image import mediatypes as mt
from hpcsif.image.model import Descriptor, Image
from hpcsif.image.store import OCIStore
from hpcsif.refs import Reference
from hpcsif.sources import Source
from hpcsif.sources.archive import ArchiveContents, ingest_archive, input_digest

_MAGIC_TYPES = ((b"\x1f\x8b", mt.OCI_LAYER_GZIP), (b"\x28\xb5\x2f\xfd", mt.OCI_LAYER_ZSTD))


def _layer_media_type(store: OCIStore, digest: str) -> str:
    with open(store.blob_path(digest), "rb") as f:
        head = f.read(4)
    return next((t for magic, t in _MAGIC_TYPES if head.startswith(magic)), mt.OCI_LAYER)


def _normalise_tag(tag: str) -> str:
    # docker save writes "team/app:1.2" for Docker Hub images, skopeo "docker.io/team/app:1.2"
    for prefix in ("docker.io/library/", "docker.io/", "index.docker.io/library/", "index.docker.io/"):
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return tag


def choose_entry(manifest: list[dict[str, Any]], name: str | None, where: str) -> dict[str, Any]:
    """The ``manifest.json`` entry for ``name`` (``repo:tag``); the only one if ``name`` is None."""
    if not manifest:
        raise NotFoundError(f"{where}: manifest.json lists no images")
    if name is None:
        if len(manifest) == 1:
            return manifest[0]
        tags = [t for e in manifest for t in e.get("RepoTags") or []]
        raise AmbiguousImageError(
            f"{where} holds {len(manifest)} images and no name:tag chose one; "
            f"use {where}:NAME:TAG with one of: {', '.join(tags) or '(untagged)'}"
        )
    want = _normalise_tag(name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest")
    for entry in manifest:
        if any(_normalise_tag(t) == want for t in entry.get("RepoTags") or []):
            return entry
    tags = [t for e in manifest for t in e.get("RepoTags") or []]
    raise NotFoundError(f"{where}: no image tagged {name!r} (it has: {', '.join(tags) or 'no tags'})")


def image_from_contents(contents: ArchiveContents, store: OCIStore, name: str | None, where: str) -> Image:
    """Build an OCI image in ``store`` from an ingested ``docker save`` archive."""
    try:
        manifest = json.loads(contents.document("manifest.json", where))
        entry = choose_entry(manifest, name, where)
        config_name, layer_names = entry["Config"], list(entry.get("Layers") or [])
        config_bytes = contents.document(config_name, where)
        config = json.loads(config_bytes)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{where}: malformed manifest.json or image config ({exc})") from None
    config_digest = contents.blobs[config_name.removeprefix("./")]
    layers = []
    for layer_name in layer_names:
        digest = contents.blobs.get(layer_name.removeprefix("./"))
        if digest is None:
            raise NotFoundError(f"{where}: layer {layer_name} named in manifest.json is missing")
        size = store.blob_path(digest).stat().st_size
        layers.append(Descriptor(_layer_media_type(store, digest), digest, size))
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise IntegrityError(f"{where}: config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    oci_manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [d.to_json() for d in layers],
    }
    mdesc = store.put_json(oci_manifest, mt.OCI_MANIFEST)
    return Image(
        store=store,
        manifest_digest=mdesc.digest,
        manifest=oci_manifest,
        config_digest=config_digest,
        config=config,
        layers=layers,
        source=where + (f":{name}" if name else ""),
    )


class DockerArchiveSource(Source):
    """A ``docker save`` tar file."""

    def resolve(self, ref: Reference) -> str:
        """The digest of the archive's bytes."""
        return input_digest(ref.path or "")

    def fetch(self, ref: Reference, store: OCIStore) -> Image:
        """Stream the archive into ``store`` and build the selected image."""
        where = f"docker-archive://{ref.path}"
        contents = ingest_archive(ref.path or "", store, where)
        return image_from_contents(contents, store, ref.name, where)


def fetch_stream(stream: IO[bytes], store: OCIStore, name: str | None, where: str) -> Image:
    """Ingest a ``docker save`` stream (e.g. from the Docker Engine API) into ``store``."""
    from hpcsif.sources.archive import ingest_fileobj

    contents = ingest_fileobj(stream, store, where)
    if "manifest.json" not in contents.documents:
        raise SourceError(f"{where}: the stream is not a docker save archive (no manifest.json)")
    return image_from_contents(contents, store, name, where)
