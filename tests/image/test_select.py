"""Choosing the image from multi-platform and nested indexes of a real OCI layout on disk."""

from __future__ import annotations

import json
from pathlib import Path

from hpcsif.image import mediatypes as mt
from hpcsif.image.model import Descriptor, Platform
from hpcsif.image.select import load_image
from hpcsif.image.store import OCIStore
from tests.image.tarbuild import file, layer, oci_layout, sha


def _put(layout: Path, doc: dict) -> dict:
    data = json.dumps(doc).encode()
    digest = sha(data)
    (layout / "blobs/sha256" / digest.split(":")[1]).write_bytes(data)
    return {"mediaType": doc["mediaType"], "digest": digest, "size": len(data)}


def test_nested_index_without_platform_is_followed(tmp_path: Path):
    """An index whose only entry is another index (no platform on it) leads to the host image."""
    layout = oci_layout(tmp_path / "img", [layer(tmp_path, [file("hello", "x")])])
    manifest = json.loads((layout / "index.json").read_text())["manifests"][0]
    amd64 = {**manifest, "platform": {"os": "linux", "architecture": "amd64"}}
    amd64.pop("annotations")
    inner = _put(layout, {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [amd64]})
    outer = _put(layout, {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [inner]})

    store = OCIStore(layout, create=False)
    image = load_image(store, Descriptor.from_json(outer), Platform("linux", "amd64"), "t")
    assert image.manifest_digest == manifest["digest"]
