"""What a SIF signature covers: the image metadata of one object group.

Apptainer (1.1+, through the ``pkg/integrity`` package of sylabs/apptainer sif) signs, per
object group, a JSON document::

    {"version":1,
     "header":{"digest":"sha256:…"},
     "objects":[{"relativeId":0,"descriptorDigest":"sha256:…","objectDigest":"sha256:…"}, …]}

* the header digest covers the launch line, magic, version and image UUID (not the
  architecture, times or descriptor-table geometry, which change when objects are added);
* each descriptor digest covers the data type, the used flag, the object's id relative to the
  lowest id in its group, the link, the size, the creation time, uid, gid, and the raw name and
  extra bytes (not the absolute id, group, offset, padding or modification time, so that a
  signature object can be appended without invalidating the others);
* each object digest covers the object's bytes.

This module computes that document and checks an image against one, naming the object that no
longer matches. It reads raw bytes from the file itself so that fields it does not decode
(odd names, unknown extra data) are covered exactly as Apptainer covers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from hpcsif.errors import SignatureError
from hpcsif.sif.format import DESCRIPTOR_SIZE, DataType, Descriptor, PartType, label_of
from hpcsif.sif.reader import SIFImage

METADATA_VERSION = 1

#: digest names used in the metadata JSON, as sylabs/sif spells them, mapped to hashlib names
DIGEST_ALGORITHMS = {
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sha512_224": "sha512_224",
    "sha512_256": "sha512_256",
}

# byte ranges of the global header that are signed: launch line + magic + version, then the UUID
_HEADER_SIGNED = ((0, 45), (48, 64))
_HEADER_SPAN = 64
# byte ranges of a raw descriptor (see hpcsif.sif.format._DESCRIPTOR)
_D_TYPE = slice(0, 4)
_D_USED = 4
_D_LINK = slice(13, 17)
_D_SIZE = slice(25, 33)
_D_CTIME = slice(41, 49)
_D_UID_GID = slice(57, 73)
_D_NAME_EXTRA = slice(73, DESCRIPTOR_SIZE)
_D_ID = struct.Struct("<I")


def describe(desc: Descriptor) -> str:
    """A short name for a data object in messages: ``object 4 (FS *System)``."""
    kind = desc.datatype.label if isinstance(desc.datatype, DataType) else hex(int(desc.datatype))
    if desc.datatype == DataType.PARTITION:
        kind += f" {label_of(desc.parttype)}"
    if desc.name:
        kind += f" {desc.name!r}"
    return f"object {desc.id} ({kind})"


def holds_system_partition(img: SIFImage, group_id: int) -> bool:
    """True if object group *group_id* holds the primary system partition."""
    return any(
        d.group_id == group_id and d.parttype == PartType.PRIMSYS for d in img.find(DataType.PARTITION)
    )


def group_label(img: SIFImage, group_id: int) -> str:
    """``object group 1``, plus ``(system partition)`` when it holds the primary partition."""
    return f"object group {group_id}" + (
        " (system partition)" if holds_system_partition(img, group_id) else ""
    )


class Digester:
    """Digests (``"sha256:hex"``) of the signed parts of one open image."""

    def __init__(self, img: SIFImage) -> None:
        self.img = img
        table = os.pread(
            img.fd, img.header.descriptors_total * DESCRIPTOR_SIZE, img.header.descriptors_offset
        )
        raws = (table[i : i + DESCRIPTOR_SIZE] for i in range(0, len(table), DESCRIPTOR_SIZE))
        # id -> raw descriptor bytes of every used slot
        self._raw = {_D_ID.unpack_from(r, 5)[0]: r for r in raws if r[_D_USED]}
        # (object id, algorithm) -> digest: several signatures over one group hash a partition once
        self._objects: dict[tuple[int, str], str] = {}

    @staticmethod
    def _digest(algorithm: str, chunks: Iterable[bytes]) -> str:
        if algorithm not in DIGEST_ALGORITHMS:
            raise SignatureError(f"unsupported digest algorithm {algorithm!r}")
        h = hashlib.new(DIGEST_ALGORITHMS[algorithm])
        for chunk in chunks:
            h.update(chunk)
        return f"{algorithm}:{h.hexdigest()}"

    def header(self, algorithm: str = "sha256") -> str:
        """Digest of the launch line, magic, version and UUID."""
        raw = os.pread(self.img.fd, _HEADER_SPAN, 0)
        return self._digest(algorithm, (raw[a:b] for a, b in _HEADER_SIGNED))

    def descriptor(self, desc: Descriptor, min_id: int, algorithm: str = "sha256") -> str:
        """Digest of the signed fields of *desc*, whose group's lowest object id is *min_id*."""
        raw = self._raw[desc.id]
        return self._digest(
            algorithm,
            (
                raw[_D_TYPE],
                b"\x01" if raw[_D_USED] else b"\x00",
                _D_ID.pack(desc.id - min_id),
                raw[_D_LINK],
                raw[_D_SIZE],
                raw[_D_CTIME],
                raw[_D_UID_GID],
                raw[_D_NAME_EXTRA],
            ),
        )

    def object(self, desc: Descriptor, algorithm: str = "sha256") -> str:
        """Digest of the content of *desc* (read in chunks: partitions can be large)."""
        key = (desc.id, algorithm)
        if key not in self._objects:
            self._objects[key] = self._digest(algorithm, self.img.iter_object(desc))
        return self._objects[key]


def group_ids(img: SIFImage) -> list[int]:
    """The sorted ids of the object groups of *img* (group 0, "no group", excluded)."""
    return sorted({d.group_id for d in img.descriptors if d.group_id})


def group_objects(img: SIFImage, group_id: int) -> list[Descriptor]:
    """The objects of group *group_id*, by ascending id."""
    objs = sorted((d for d in img.descriptors if d.group_id == group_id), key=lambda d: d.id)
    if not objs:
        raise SignatureError(f"{img.path}: object group {group_id} not found")
    return objs


def image_metadata(
    img: SIFImage, group_id: int, algorithm: str = "sha256", objects: list[Descriptor] | None = None
) -> bytes:
    """The JSON document a signature of group *group_id* signs (compact, as Go encodes it).

    It covers *objects* (Apptainer's ``sign --sif-id``), by default every object of the group;
    ids are relative to the group's lowest id either way.
    """
    group = group_objects(img, group_id)
    min_id = group[0].id
    dig = Digester(img)
    doc = {
        "version": METADATA_VERSION,
        "header": {"digest": dig.header(algorithm)},
        "objects": [
            {
                "relativeId": d.id - min_id,
                "descriptorDigest": dig.descriptor(d, min_id, algorithm),
                "objectDigest": dig.object(d, algorithm),
            }
            for d in sorted(objects or group, key=lambda d: d.id)
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class _SignedObject:
    relative_id: int
    descriptor_digest: str
    object_digest: str


def _parse(payload: bytes) -> tuple[str, list[_SignedObject]]:
    """Header digest and object entries of a metadata document; :class:`SignatureError` if malformed."""
    try:
        doc = json.loads(payload)
        if doc["version"] != METADATA_VERSION:
            raise SignatureError(f"unsupported signed metadata version {doc['version']!r}")
        header = doc["header"]["digest"]
        objects = [
            _SignedObject(int(o["relativeId"]), o["descriptorDigest"], o["objectDigest"])
            for o in doc["objects"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"signed metadata is malformed: {exc}") from None
    return header, objects


def _algorithm(digest: str) -> str:
    name, _, value = digest.partition(":")
    if name not in DIGEST_ALGORITHMS or not value:
        raise SignatureError(f"signed metadata holds an unsupported digest {digest!r}")
    return name


def check_metadata(
    img: SIFImage,
    group_id: int,
    payload: bytes,
    digester: Digester | None = None,
    required: list[Descriptor] | None = None,
) -> list[Descriptor]:
    """Check group *group_id* of *img* against the signed metadata *payload*.

    Every object in *required* (default: the whole group) must be covered by the signature,
    and every object it covers must match. Returns the *required* descriptors; raises
    :class:`SignatureError` naming the header or the object whose descriptor or content
    differs, or an object added to or removed from the group. Pass one *digester* for several
    checks of the same open image to hash each object once.
    """
    header_digest, signed = _parse(payload)
    objs = group_objects(img, group_id)
    min_id = objs[0].id
    by_id = {min_id + s.relative_id: s for s in signed}
    wanted = objs if required is None else sorted(required, key=lambda d: d.id)
    for desc in wanted:
        if desc.id not in by_id:
            raise SignatureError(f"{describe(desc)}: object not signed")
    missing = sorted(set(by_id) - {d.id for d in objs})
    if missing:
        raise SignatureError(f"object {missing[0]}: signed object not found (removed after signing)")
    dig = digester or Digester(img)
    if dig.header(_algorithm(header_digest)) != header_digest:
        raise SignatureError("header integrity compromised (launch line, magic, version or UUID changed)")
    for desc in objs:
        entry = by_id.get(desc.id)
        if entry is None:
            continue
        if dig.descriptor(desc, min_id, _algorithm(entry.descriptor_digest)) != entry.descriptor_digest:
            raise SignatureError(f"data object descriptor integrity compromised: {describe(desc)}")
        if dig.object(desc, _algorithm(entry.object_digest)) != entry.object_digest:
            raise SignatureError(f"data object integrity compromised: {describe(desc)}")
    return wanted
