"""SIF v2 on-disk layout: constants, enums and the header/descriptor records.

Follows the layout of sylabs/sif v2 (``pkg/sif``), which Apptainer 1.4 reads and writes:

* a 128-byte global header at offset 0 (launch line, magic, version, architecture code,
  UUID, times, descriptor-table and data-section geometry), little-endian;
* a table of fixed 585-byte descriptors, by default 48 of them at offset 4096;
* the data objects after the table, partitions aligned to 4096 bytes.

Only this module knows byte offsets; :mod:`hpcsif.sif.reader` and :mod:`hpcsif.sif.writer`
work with the :class:`Header` and :class:`Descriptor` records defined here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from types import ModuleType

from hpcsif.errors import SIFError

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without loading typing
if TYPE_CHECKING:
    import uuid

#: the launch line Apptainer writes, so that ``./image.sif`` runs the image
LAUNCH_SCRIPT = "#!/usr/bin/env run-singularity\n"
MAGIC = b"SIF_MAGIC\x00"
VERSION = "01"

LAUNCH_LEN = 32
MAGIC_LEN = 10
VERSION_LEN = 3
ARCH_LEN = 3
NAME_LEN = 128
EXTRA_LEN = 384
ENTITY_LEN = 256

#: descriptor group/link fields carry this mask: set in every group id, and in a link id
#: when the link names a group rather than an object
GROUP_MASK = 0xF0000000

#: where sylabs/sif puts the descriptor table, and how many slots it reserves
DESCRIPTORS_OFFSET = 4096
DEFAULT_DESCRIPTOR_CAPACITY = 48
#: partitions are aligned so that they can be mounted at a page-aligned offset
PARTITION_ALIGNMENT = 4096
#: the group Apptainer puts every object of an image into
DEFAULT_GROUP = 1

# header: launch, magic, version, arch, uuid, ctime, mtime, free, total, descr off/size, data off/size
_HEADER = struct.Struct(f"<{LAUNCH_LEN}s{MAGIC_LEN}s{VERSION_LEN}s{ARCH_LEN}s16s8q")
# descriptor: datatype, used, id, group, link, offset, size, size+padding, ctime, mtime, uid, gid, name, extra
_DESCRIPTOR = struct.Struct(f"<i?III7q{NAME_LEN}s{EXTRA_LEN}s")
_PARTITION_EXTRA = struct.Struct(f"<ii{ARCH_LEN}s")
_SIGNATURE_EXTRA = struct.Struct(f"<i{ENTITY_LEN}s")
_PAIR_EXTRA = struct.Struct("<ii")
_SINGLE_EXTRA = struct.Struct("<i")

HEADER_SIZE = _HEADER.size  # 128
DESCRIPTOR_SIZE = _DESCRIPTOR.size  # 585

#: Go's time.Time{} (year 1) as Unix seconds: what deterministic sylabs/sif images store
GO_ZERO_TIME = -62135596800


class DataType(IntEnum):
    """Kind of a data object (``sif.DataType``)."""

    DEFFILE = 0x4001
    ENVVAR = 0x4002
    LABELS = 0x4003
    PARTITION = 0x4004
    SIGNATURE = 0x4005
    GENERIC_JSON = 0x4006
    GENERIC = 0x4007
    CRYPTO_MESSAGE = 0x4008
    SBOM = 0x4009
    OCI_ROOT_INDEX = 0x400A
    OCI_BLOB = 0x400B

    @property
    def label(self) -> str:
        """The name ``apptainer sif list`` prints for this type."""
        return _DATATYPE_LABELS[self]


_DATATYPE_LABELS = {
    DataType.DEFFILE: "Def.FILE",
    DataType.ENVVAR: "Env.Vars",
    DataType.LABELS: "JSON.Labels",
    DataType.PARTITION: "FS",
    DataType.SIGNATURE: "Signature",
    DataType.GENERIC_JSON: "JSON.Generic",
    DataType.GENERIC: "Generic/Raw",
    DataType.CRYPTO_MESSAGE: "Cryptographic Message",
    DataType.SBOM: "SBOM",
    DataType.OCI_ROOT_INDEX: "OCI.RootIndex",
    DataType.OCI_BLOB: "OCI.Blob",
}


class FSType(IntEnum):
    """File system of a partition object."""

    SQUASHFS = 1
    EXT3 = 2
    IMMUOBJ = 3
    RAW = 4
    ENCRYPTED_SQUASHFS = 5

    @property
    def label(self) -> str:
        """The name ``apptainer sif list`` prints."""
        return {
            FSType.SQUASHFS: "Squashfs",
            FSType.EXT3: "Ext3",
            FSType.IMMUOBJ: "Archive",
            FSType.RAW: "Raw",
            FSType.ENCRYPTED_SQUASHFS: "Encrypted squashfs",
        }[self]


class PartType(IntEnum):
    """Role of a partition object; an image has at most one PRIMSYS partition."""

    SYSTEM = 1
    PRIMSYS = 2
    DATA = 3
    OVERLAY = 4

    @property
    def label(self) -> str:
        """The name ``apptainer sif list`` prints (``*System`` marks the primary one)."""
        return {
            PartType.SYSTEM: "System",
            PartType.PRIMSYS: "*System",
            PartType.DATA: "Data",
            PartType.OVERLAY: "Overlay",
        }[self]


class HashType(IntEnum):
    """Hash function of a signature object."""

    SHA256 = 1
    SHA384 = 2
    SHA512 = 3
    BLAKE2S = 4
    BLAKE2B = 5

    @property
    def label(self) -> str:
        """The name Go's ``crypto.Hash.String()`` gives, as ``sif list`` prints it."""
        return {
            HashType.SHA256: "SHA-256",
            HashType.SHA384: "SHA-384",
            HashType.SHA512: "SHA-512",
            HashType.BLAKE2S: "BLAKE2s-256",
            HashType.BLAKE2B: "BLAKE2b-256",
        }[self]


class FormatType(IntEnum):
    """Format of a cryptographic message object."""

    OPENPGP = 1
    PEM = 2

    @property
    def label(self) -> str:
        """Display name."""
        return {FormatType.OPENPGP: "OpenPGP", FormatType.PEM: "PEM"}[self]


class MessageType(IntEnum):
    """Kind of a cryptographic message object."""

    CLEAR_SIGNATURE = 0x100
    RSA_OAEP = 0x200

    @property
    def label(self) -> str:
        """Display name."""
        return {MessageType.CLEAR_SIGNATURE: "Clear Signature", MessageType.RSA_OAEP: "RSA-OAEP"}[self]


class SBOMFormat(IntEnum):
    """Format of an SBOM object."""

    CYCLONEDX_JSON = 1
    CYCLONEDX_XML = 2
    GITHUB_JSON = 3
    SPDX_JSON = 4
    SPDX_RDF = 5
    SPDX_TAG_VALUE = 6
    SPDX_YAML = 7
    SYFT_JSON = 8

    @property
    def label(self) -> str:
        """Display name (``cyclonedx-json`` …)."""
        return self.name.lower().replace("_", "-")


#: GOARCH name -> two-digit SIF architecture code
ARCH_CODES: dict[str, str] = {
    "386": "01",
    "amd64": "02",
    "arm": "03",
    "arm64": "04",
    "ppc64": "05",
    "ppc64le": "06",
    "mips": "07",
    "mipsle": "08",
    "mips64": "09",
    "mips64le": "10",
    "s390x": "11",
    "riscv64": "12",
    "loong64": "13",
}
ARCH_UNKNOWN_CODE = "00"
_ARCH_NAMES = {code: name for name, code in ARCH_CODES.items()}


def arch_code(goarch: str) -> bytes:
    """Encode a GOARCH name (``amd64``, ``arm64`` …) as the 3-byte SIF arch field."""
    try:
        return ARCH_CODES[goarch].encode() + b"\x00"
    except KeyError:
        raise SIFError(f"unknown architecture {goarch!r} (expected one of {', '.join(ARCH_CODES)})") from None


def arch_name(code: bytes) -> str:
    """Decode a 3-byte SIF arch field to a GOARCH name, ``"unknown"`` when unmapped."""
    return _ARCH_NAMES.get(_cstr(code), "unknown")


def _cstr(raw: bytes) -> str:
    """Text of a NUL-padded byte field (trailing NULs dropped, like sylabs/sif)."""
    return raw.rstrip(b"\x00").decode("utf-8", errors="replace")


def _enum_or_int(enum_cls: type[IntEnum], value: int) -> IntEnum | int:
    """Map *value* to *enum_cls* when it is a known member, else keep the raw int."""
    try:
        return enum_cls(value)
    except ValueError:
        return value


def label_of(value: IntEnum | int) -> str:
    """Display name of an enum value, ``"Unknown"`` for values outside the enum."""
    return value.label if isinstance(value, IntEnum) else "Unknown"  # type: ignore[attr-defined]


def _uuid_module() -> ModuleType:
    import uuid

    return uuid


@dataclass
class Header:
    """The 128-byte global header."""

    arch: str = "unknown"  # GOARCH name of the primary partition
    # the 16 bytes of the image's UUID: the uuid module (which loads platform) is imported
    # only when the UUID is looked at, not on every open of a SIF (each exec opens one)
    uuid_bytes: bytes = field(default_factory=lambda: _uuid_module().uuid4().bytes)
    ctime: int = 0
    mtime: int = 0
    descriptors_free: int = DEFAULT_DESCRIPTOR_CAPACITY
    descriptors_total: int = DEFAULT_DESCRIPTOR_CAPACITY
    descriptors_offset: int = DESCRIPTORS_OFFSET
    descriptors_size: int = DEFAULT_DESCRIPTOR_CAPACITY * DESCRIPTOR_SIZE
    data_offset: int = DESCRIPTORS_OFFSET + DEFAULT_DESCRIPTOR_CAPACITY * DESCRIPTOR_SIZE
    data_size: int = 0
    launch: str = LAUNCH_SCRIPT
    magic: bytes = MAGIC
    version: str = VERSION

    @property
    def uuid(self) -> uuid.UUID:
        """The image's UUID."""
        return _uuid_module().UUID(bytes=self.uuid_bytes)

    def pack(self) -> bytes:
        """Encode as the 128 on-disk bytes."""
        launch = self.launch.encode()
        if len(launch) >= LAUNCH_LEN:  # one NUL must remain, as in sylabs/sif
            raise SIFError(f"launch script too long ({len(launch)} bytes, at most {LAUNCH_LEN - 1})")
        arch = arch_code(self.arch) if self.arch != "unknown" else ARCH_UNKNOWN_CODE.encode() + b"\x00"
        return _HEADER.pack(
            launch,
            self.magic,
            self.version.encode(),
            arch,
            self.uuid_bytes,
            self.ctime,
            self.mtime,
            self.descriptors_free,
            self.descriptors_total,
            self.descriptors_offset,
            self.descriptors_size,
            self.data_offset,
            self.data_size,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        """Decode the first 128 bytes of *raw*; checks magic and version."""
        if len(raw) < HEADER_SIZE:
            raise SIFError(f"not a SIF file (truncated header: {len(raw)} of {HEADER_SIZE} bytes)")
        launch, magic, version, arch, uid, *numbers = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise SIFError("not a SIF file (bad magic)")
        if version != VERSION.encode() + b"\x00":
            raise SIFError(f"unsupported SIF version {_cstr(version)!r} (expected {VERSION})")
        ctime, mtime, free, total, doff, dsize, data_off, data_size = numbers
        return cls(
            arch=arch_name(arch),
            uuid_bytes=uid,
            ctime=ctime,
            mtime=mtime,
            descriptors_free=free,
            descriptors_total=total,
            descriptors_offset=doff,
            descriptors_size=dsize,
            data_offset=data_off,
            data_size=data_size,
            launch=_cstr(launch),
            magic=magic,
            version=_cstr(version),
        )


def encode_name(name: str) -> bytes:
    """The UTF-8 bytes of an object name; :class:`SIFError` if longer than the 128-byte field."""
    raw = name.encode()
    if len(raw) > NAME_LEN:
        raise SIFError(f"object name {name!r} too long ({len(raw)} bytes, at most {NAME_LEN})")
    return raw


def partition_extra(fstype: FSType, parttype: PartType, arch: str) -> bytes:
    """The descriptor ``extra`` bytes of a partition: fs type, partition type, arch code."""
    return _PARTITION_EXTRA.pack(int(fstype), int(parttype), arch_code(arch))


def signature_extra(hashtype: HashType, entity: bytes) -> bytes:
    """The descriptor ``extra`` bytes of a signature: hash type, signer fingerprint (≤ 256 bytes)."""
    if len(entity) > ENTITY_LEN:
        raise SIFError(f"signature entity too long ({len(entity)} bytes, at most {ENTITY_LEN})")
    return _SIGNATURE_EXTRA.pack(int(hashtype), entity)


def retyped_partition_extra(extra: bytes, parttype: PartType) -> bytes:
    """A partition's ``extra`` bytes with its partition type set to *parttype*, the rest kept as is."""
    fstype, _, arch = _PARTITION_EXTRA.unpack_from(extra)
    return _PARTITION_EXTRA.pack(fstype, int(parttype), arch)


def sbom_extra(fmt: SBOMFormat) -> bytes:
    """The descriptor ``extra`` bytes of an SBOM object: its format."""
    return _SINGLE_EXTRA.pack(int(fmt))


def oci_digest_extra(digest: str) -> bytes:
    """The descriptor ``extra`` bytes of an OCI root-index or blob object: ``sha256:…`` as text."""
    return digest.encode()


@dataclass
class Descriptor:
    """One data object descriptor (585 bytes on disk).

    ``group_id`` and ``link_id`` are the values without :data:`GROUP_MASK`;
    ``link_is_group`` tells whether the link names a group. Type-specific metadata lives in
    ``extra`` and is decoded by the ``fstype``/``parttype``/``arch`` (partitions) and
    ``hashtype``/``entity`` (signatures) properties. ``datatype`` is a :class:`DataType`, or
    the raw int for types this module does not know.
    """

    datatype: DataType | int
    id: int
    group_id: int = DEFAULT_GROUP
    link_id: int = 0
    link_is_group: bool = False
    offset: int = 0
    size: int = 0
    size_with_padding: int = 0
    ctime: int = 0
    mtime: int = 0
    uid: int = 0
    gid: int = 0
    name: str = ""
    extra: bytes = b""
    used: bool = True

    def __post_init__(self) -> None:
        # keep extra at its on-disk size so that written and read-back descriptors compare equal
        if len(self.extra) > EXTRA_LEN:
            raise SIFError(f"descriptor extra data too long ({len(self.extra)} bytes, at most {EXTRA_LEN})")
        self.extra = self.extra.ljust(EXTRA_LEN, b"\x00")

    def pack(self) -> bytes:
        """Encode as the 585 on-disk bytes."""
        name = encode_name(self.name)
        link = self.link_id | (GROUP_MASK if self.link_is_group else 0)
        return _DESCRIPTOR.pack(
            int(self.datatype),
            self.used,
            self.id,
            self.group_id | GROUP_MASK,
            link,
            self.offset,
            self.size,
            self.size_with_padding,
            self.ctime,
            self.mtime,
            self.uid,
            self.gid,
            name,
            self.extra,
        )

    @classmethod
    def unpack(cls, raw: bytes, offset: int = 0) -> Descriptor:
        """Decode the descriptor at *offset* in *raw*."""
        (dtype, used, id_, group, link, off, size, padded, ctime, mtime, uid, gid, name, extra) = (
            _DESCRIPTOR.unpack_from(raw, offset)
        )
        return cls(
            datatype=_enum_or_int(DataType, dtype),
            id=id_,
            group_id=group & ~GROUP_MASK,
            link_id=link & ~GROUP_MASK,
            link_is_group=link & GROUP_MASK == GROUP_MASK,
            offset=off,
            size=size,
            size_with_padding=padded,
            ctime=ctime,
            mtime=mtime,
            uid=uid,
            gid=gid,
            name=_cstr(name),
            extra=extra,
            used=used,
        )

    def _partition(self) -> tuple[int, int, bytes] | None:
        if self.datatype != DataType.PARTITION:
            return None
        return _PARTITION_EXTRA.unpack_from(self.extra)

    @property
    def fstype(self) -> FSType | int | None:
        """File system type of a partition; None for other objects."""
        part = self._partition()
        return None if part is None else _enum_or_int(FSType, part[0])

    @property
    def parttype(self) -> PartType | int | None:
        """Partition type of a partition; None for other objects."""
        part = self._partition()
        return None if part is None else _enum_or_int(PartType, part[1])

    @property
    def arch(self) -> str | None:
        """GOARCH name of a partition (``"unknown"`` when unmapped); None for other objects."""
        part = self._partition()
        return None if part is None else arch_name(part[2])

    def _signature(self) -> tuple[int, bytes] | None:
        if self.datatype != DataType.SIGNATURE:
            return None
        return _SIGNATURE_EXTRA.unpack_from(self.extra)

    @property
    def hashtype(self) -> HashType | int | None:
        """Hash type of a signature; None for other objects."""
        sig = self._signature()
        return None if sig is None else _enum_or_int(HashType, sig[0])

    @property
    def entity(self) -> bytes | None:
        """Signer's 20-byte key fingerprint of a signature; None if absent or not a signature."""
        sig = self._signature()
        if sig is None or not any(sig[1][:20]):
            return None
        return sig[1][:20]

    def _pair(self, datatype: DataType, first: type[IntEnum], second: type[IntEnum]) -> tuple | None:
        if self.datatype != datatype:
            return None
        a, b = _PAIR_EXTRA.unpack_from(self.extra)
        return _enum_or_int(first, a), _enum_or_int(second, b)

    @property
    def crypto_message(self) -> tuple[FormatType | int, MessageType | int] | None:
        """(format, message type) of a cryptographic message object; None otherwise."""
        return self._pair(DataType.CRYPTO_MESSAGE, FormatType, MessageType)

    @property
    def sbom_format(self) -> SBOMFormat | int | None:
        """Format of an SBOM object; None otherwise."""
        if self.datatype != DataType.SBOM:
            return None
        return _enum_or_int(SBOMFormat, _SINGLE_EXTRA.unpack_from(self.extra)[0])

    @property
    def oci_digest(self) -> str | None:
        """``sha256:…`` digest recorded for OCI root-index and blob objects; None otherwise."""
        if self.datatype not in (DataType.OCI_ROOT_INDEX, DataType.OCI_BLOB):
            return None
        return _cstr(self.extra.split(b"\x00", 1)[0])


def next_aligned(offset: int, alignment: int) -> int:
    """Smallest offset >= *offset* that is a multiple of *alignment* (no-op for alignment <= 1)."""
    if alignment <= 1:
        return offset
    return -(-offset // alignment) * alignment
