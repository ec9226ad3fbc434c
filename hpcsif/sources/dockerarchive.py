"""``docker-archive://FILE[:NAME:TAG]``: the ``docker save`` format (``manifest.json``).

Works for archives written by ``docker save`` (legacy ``<id>/layer.tar`` and the newer
OCI-layout flavour), ``podman save`` and ``skopeo copy … docker-archive:``, plain or
gzip-compressed. The archive's layers and config are stored as blobs and an OCI manifest
is written for them, so the rest of the pipeline sees an ordinary OCI image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any

from hpcsif.errors import AmbiguousImageError, IntegrityError, NotFoundError, SourceError
from hpcsif.image import mediatypes as mt
from hpcsif.image.digest import CHUNK
from hpcsif.image.model import BlobSpan, Descriptor, Image
from hpcsif.image.store import OCIStore, document_too_large, load_json_object
from hpcsif.refs import Reference
from hpcsif.sources import Source
from hpcsif.sources.archive import ArchiveContents, member_name, read_archive, selection_digest

_MAGIC_TYPES = ((b"\x1f\x8b", mt.OCI_LAYER_GZIP), (b"\x28\xb5\x2f\xfd", mt.OCI_LAYER_ZSTD))


def _media_type_at(path: Path, offset: int) -> str:
    """The layer media type from the magic bytes at ``offset`` of ``path``."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(4)
    return next((t for magic, t in _MAGIC_TYPES if head.startswith(magic)), mt.OCI_LAYER)


def _span_digest(span: BlobSpan) -> str:
    """The digest of a byte range (a compressed layer inside an uncompressed archive)."""
    h = hashlib.sha256()
    with open(span.path, "rb") as f:
        f.seek(span.offset)
        left = span.size
        while left and (block := f.read(min(CHUNK, left))):
            h.update(block)
            left -= len(block)
    return "sha256:" + h.hexdigest()


def _normalise_tag(tag: str) -> str:
    # docker save writes "team/app:1.2" for Docker Hub images, skopeo "docker.io/team/app:1.2"
    for prefix in ("docker.io/library/", "docker.io/", "index.docker.io/library/", "index.docker.io/"):
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return tag


def choose_entry(manifest: list[dict[str, Any]], name: str | None, where: str) -> dict[str, Any]:
    """The ``manifest.json`` entry for ``name``: ``repo:tag``, or ``@N`` (the N-th image, from 0, as
    containers/image numbers them); the only one if ``name`` is None."""
    if not manifest:
        raise NotFoundError(f"{where}: manifest.json lists no images")
    count = f"@0 to @{len(manifest) - 1}"
    if name is None:
        if len(manifest) == 1:
            return manifest[0]
        tags = [t for e in manifest for t in e.get("RepoTags") or []]
        raise AmbiguousImageError(
            f"{where} holds {len(manifest)} images and no name:tag chose one; "
            f"use {where}:NAME:TAG with one of: {', '.join(tags) or '(untagged)'}, or {where}:@N ({count})"
        )
    if name.startswith("@") and name[1:].isdigit():
        if int(name[1:]) < len(manifest):
            return manifest[int(name[1:])]
        raise NotFoundError(f"{where}: no image {name} (it holds {len(manifest)}: {count})")
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
        if not isinstance(manifest, list) or not all(isinstance(e, dict) for e in manifest):
            raise TypeError("not a list of objects")
        for tags in (e.get("RepoTags") for e in manifest):  # as containers/image (Apptainer) reads them
            if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                raise TypeError("RepoTags must be a list of names")
        entry = choose_entry(manifest, name, where)
        config_name, layer_names = entry.get("Config"), entry.get("Layers") or []
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise TypeError("Config must be a path and Layers a list of paths")
        if not all(isinstance(n, str) for n in layer_names):
            raise TypeError("Layers must be a list of paths")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise IntegrityError(f"{where}: malformed manifest.json ({exc})") from None
    config_member = member_name(config_name)
    if config_member in contents.spans:
        raise document_too_large(f"{where}: image config {config_name}")
    if config_member not in contents.blobs:
        raise NotFoundError(f"{where}: archive has no {config_name}")
    config_digest = contents.blobs[config_member]
    config_bytes = store.read_blob(config_digest)
    config = load_json_object(config_bytes, f"{where}: image config {config_name}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layer_names):
        raise IntegrityError(f"{where}: config lists {len(diff_ids)} diff_ids for {len(layer_names)} layers")
    layers, spans = [], {}
    for layer_name, diff_id in zip(layer_names, diff_ids, strict=True):
        name = member_name(layer_name)
        if name in contents.spans:  # a large layer left in place in an uncompressed archive
            span = contents.spans[name]
            media = _media_type_at(span.path, span.offset)
            # an uncompressed layer's blob digest is its diff_id, verified while it streams
            digest = diff_id if media == mt.OCI_LAYER else _span_digest(span)
            spans[digest] = span
            layers.append(Descriptor(media, digest, span.size))
        elif name in contents.blobs:
            digest = contents.blobs[name]
            path = store.blob_path(digest)
            layers.append(Descriptor(_media_type_at(path, 0), digest, path.stat().st_size))
        else:
            raise NotFoundError(f"{where}: layer {layer_name} named in manifest.json is missing")
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
        spans=spans,
    )


class DockerArchiveSource(Source):
    """A ``docker save`` tar file."""

    def resolve(self, ref: Reference) -> str:
        """The digest of the archive's bytes (and of the chosen image's name)."""
        return selection_digest(ref.path or "", ref.name)

    def fetch(self, ref: Reference, store: OCIStore) -> Image:
        """Stream the archive into ``store`` and build the selected image."""
        where = f"docker-archive://{ref.path}"
        contents = read_archive(ref.path or "", store, where)
        if "manifest.json" not in contents.documents and "index.json" in contents.documents:
            # an OCI archive (podman save's default format), which Apptainer's docker-archive: reads too
            from hpcsif.sources.ocilayout import image_from_layout_archive

            return image_from_layout_archive(contents, store, ref, self.platform, where)
        return image_from_contents(contents, store, ref.name, where)


def fetch_stream(stream: IO[bytes], store: OCIStore, name: str | None, where: str) -> Image:
    """Ingest a ``docker save`` stream (e.g. from the Docker Engine API) into ``store``."""
    from hpcsif.sources.archive import ingest_fileobj

    contents = ingest_fileobj(stream, store, where)
    if "manifest.json" not in contents.documents:
        raise SourceError(f"{where}: the stream is not a docker save archive (no manifest.json)")
    return image_from_contents(contents, store, name, where)
