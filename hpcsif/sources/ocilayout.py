"""``oci://DIR[:REF]`` and ``oci-archive://FILE[:REF]`` sources."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hpcsif.errors import NotFoundError
from hpcsif.image.model import Descriptor, Image
from hpcsif.image.select import load_image, resolve_manifest, select_from_index
from hpcsif.image.store import OCIStore, load_json_object
from hpcsif.refs import Reference
from hpcsif.sources import Source

if TYPE_CHECKING:
    from hpcsif.image.model import Platform
    from hpcsif.sources.archive import ArchiveContents


class OCILayoutSource(Source):
    """An OCI image layout directory; its blobs are used in place, not copied."""

    def _layout(self, ref: Reference) -> OCIStore:
        path = Path(ref.path or "")
        if not path.is_dir():
            raise NotFoundError(f"{ref.raw}: no such directory {path}")
        return OCIStore(path, create=False)

    def _select(self, ref: Reference, layout: OCIStore) -> Descriptor:
        return select_from_index(layout.index(), ref.name, f"oci://{ref.path}")

    def resolve(self, ref: Reference) -> str:
        """The digest of the selected image manifest."""
        layout = self._layout(ref)
        desc, _ = resolve_manifest(
            self._select(ref, layout), lambda d: layout.read_json(d.digest), self.platform, ref.raw
        )
        return desc.digest

    def fetch(self, ref: Reference, store: OCIStore) -> Image:
        """Load the image from the layout itself (``store`` is not needed)."""
        layout = self._layout(ref)
        return load_image(layout, self._select(ref, layout), self.platform, str(ref))


class OCIArchiveSource(Source):
    """A tar of an OCI image layout (``skopeo copy … oci-archive:…``), plain or compressed.

    Layers of an uncompressed archive are read in place, not copied into the store.
    """

    def resolve(self, ref: Reference) -> str:
        """The digest of the archive's bytes (and of the chosen image's name)."""
        from hpcsif.sources.archive import selection_digest  # plain layouts never need the tar reader

        return selection_digest(ref.path or "", ref.name)

    def fetch(self, ref: Reference, store: OCIStore) -> Image:
        """Stream the archive's blobs into ``store`` and load the selected image."""
        from hpcsif.sources.archive import read_archive

        where = f"oci-archive://{ref.path}"
        contents = read_archive(ref.path or "", store, where)
        return image_from_layout_archive(contents, store, ref, self.platform, where)


def image_from_layout_archive(
    contents: ArchiveContents, store: OCIStore, ref: Reference, platform: Platform | None, where: str
) -> Image:
    """The image *ref* selects in an ingested OCI layout archive (its ``index.json``)."""
    index = load_json_object(contents.document("index.json", where), f"{where}: index.json")
    desc = select_from_index(index, ref.name, where)
    return load_image(store, desc, platform, str(ref), spans=contents.blob_spans())
