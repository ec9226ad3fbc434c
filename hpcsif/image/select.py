"""Choose one image manifest from an OCI index / manifest list and load it from a store."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from typing import Any

from hpcsif.errors import AmbiguousImageError, IntegrityError, NotFoundError, SourceError
from hpcsif.image import mediatypes as mt
from hpcsif.image.model import BlobSpan, Descriptor, Image, Platform
from hpcsif.image.store import OCIStore

_MAX_NESTING = 4


def ref_names(index: dict[str, Any]) -> list[str]:
    """The tags (``org.opencontainers.image.ref.name``) an index lists."""
    return [
        m["annotations"][mt.REF_NAME]
        for m in index.get("manifests", [])
        if (m.get("annotations") or {}).get(mt.REF_NAME)
    ]


def _matches_ref(entry: dict[str, Any], ref: str) -> bool:
    name = (entry.get("annotations") or {}).get(mt.REF_NAME)
    if ref.startswith("sha256:"):
        return entry.get("digest") == ref
    # umoci/skopeo store "latest"; other tools store "name:latest" or a full reference
    return name is not None and (name == ref or name.endswith((":" + ref, "/" + ref)))


def select_from_index(index: dict[str, Any], ref: str | None, where: str) -> Descriptor:
    """The index entry for ``ref`` (a tag or digest); the only entry when ``ref`` is None."""
    check_descriptors(index, f"{where}: index.json")
    manifests = index.get("manifests") or []
    if not manifests:
        raise NotFoundError(f"{where}: the index lists no images")
    if ref is None:
        if len(manifests) == 1:
            return Descriptor.from_json(manifests[0])
        names = ref_names(index) or [m.get("digest", "?") for m in manifests]
        raise AmbiguousImageError(
            f"{where} holds {len(manifests)} images and no reference chose one; "
            f"use {where}:REF with REF one of: {', '.join(names)}"
        )
    hits = [m for m in manifests if _matches_ref(m, ref)]
    if not hits:
        names = ref_names(index)
        known = f" (it has: {', '.join(names)})" if names else ""
        raise NotFoundError(f"{where}: no image with reference {ref!r}{known}")
    return Descriptor.from_json(hits[-1])


def select_platform(index: dict[str, Any], platform: Platform, where: str) -> Descriptor:
    """The manifest for ``platform`` in a multi-platform index / manifest list."""
    entries = index.get("manifests") or []
    for m in entries:
        if platform.matches(m.get("platform")):
            return Descriptor.from_json(m)
    # An index may list another index without a platform (nested indexes): look inside it.
    for m in entries:
        if not m.get("platform") and m.get("mediaType") in mt.INDEX_TYPES:
            return Descriptor.from_json(m)
    available = sorted(
        {
            str(Platform(p.get("os", "?"), p.get("architecture", "?"), p.get("variant")))
            for p in (m.get("platform") for m in entries)
            if p
        }
    )
    raise NotFoundError(
        f"{where}: no image for platform {platform} (available: {', '.join(available) or 'none'}); "
        "use --arch to choose another"
    )


def check_descriptors(doc: dict[str, Any], where: str) -> None:
    """Refuse a manifest or index whose descriptors are not what the OCI spec says they are.

    A registry, a layout or an archive holds what it likes: ``"layers": "x"``, ``"config": null``,
    a ``"platform"`` string or a size of ``1.5``, ``true`` or ``-1`` must be one line naming the
    document, not a crash later on.
    """
    descriptors = [("config", doc["config"])] if "config" in doc else []
    for key in ("layers", "manifests"):
        items = doc.get(key) or []
        if not isinstance(items, list):
            raise SourceError(f"{where}: {key!r} is not a list")
        descriptors += [(key, item) for item in items]
    for key, desc in descriptors:
        if not isinstance(desc, dict):
            raise SourceError(f"{where}: a {key!r} descriptor is not a JSON object: {json.dumps(desc)[:100]}")
        if not isinstance(desc.get("digest"), str):
            raise SourceError(f"{where}: a descriptor has no digest: {json.dumps(desc)[:100]}")
        size = desc.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise SourceError(
                f"{where}: descriptor size {json.dumps(size)[:40]} is not an integer byte count"
            )
        if not isinstance(desc.get("platform") or {}, dict):
            raise SourceError(
                f"{where}: descriptor platform {json.dumps(desc['platform'])[:60]} is not an object"
            )


def resolve_manifest(
    desc: Descriptor, read_json: Callable[[Descriptor], dict[str, Any]], platform: Platform, where: str
) -> tuple[Descriptor, dict[str, Any]]:
    """Follow indexes down to an image manifest; return its descriptor and parsed JSON."""
    for _ in range(_MAX_NESTING):
        doc = read_json(desc)
        check_descriptors(doc, f"{where}: manifest {desc.digest}")
        media_type = doc.get("mediaType") or desc.media_type
        if media_type in mt.SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
            raise SourceError(
                f"{where}: Docker schema 1 manifests are not supported (deprecated by Docker); "
                "re-push the image with a current client"
            )
        if media_type in mt.INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            desc = select_platform(doc, platform, where)
            continue
        if "layers" not in doc or "config" not in doc:
            kind = media_type or "no media type"
            raise SourceError(f"{where}: manifest {desc.digest} is not an image manifest ({kind})")
        return desc, doc
    raise SourceError(f"{where}: indexes nested more than {_MAX_NESTING} deep")


def load_image(
    store: OCIStore,
    desc: Descriptor,
    platform: Platform,
    source: str,
    spans: dict[str, BlobSpan] | None = None,
) -> Image:
    """Load the image that ``desc`` (a manifest or index in ``store``) names.

    Layers are in ``store`` or, when listed in ``spans``, read in place from another file.
    """
    spans = spans or {}
    mdesc, manifest = resolve_manifest(desc, lambda d: store.read_json(d.digest), platform, source)
    config_desc = Descriptor.from_json(manifest["config"])
    config = store.read_json(config_desc.digest)
    layers = [Descriptor.from_json(layer) for layer in manifest.get("layers") or []]
    for layer in layers:
        if layer.digest in spans:
            actual = spans[layer.digest].size
        elif store.has_blob(layer.digest):
            st = store.blob_path(layer.digest).stat()
            # a FIFO or device has no size to compare; its digest is still checked while streaming
            actual = st.st_size if stat.S_ISREG(st.st_mode) else layer.size
        else:
            # (the source names the archive or layout: the store may be the cache it went to)
            raise NotFoundError(f"{source}: layer {layer.digest} is missing")
        if actual != layer.size:  # a lying size field; Apptainer refuses it too
            raise IntegrityError(f"{source}: layer {layer.digest} has {actual} bytes, not {layer.size}")
    return Image(
        store=store,
        manifest_digest=mdesc.digest,
        manifest=manifest,
        config_digest=config_desc.digest,
        config=config,
        layers=layers,
        source=source,
        spans={d.digest: spans[d.digest] for d in layers if d.digest in spans},
    )
