"""Human-readable views of a SIF, in the format of ``apptainer sif list|header|info``."""

from __future__ import annotations

import datetime as dt

from hpcsif.sif.format import GO_ZERO_TIME, DataType, Descriptor, label_of
from hpcsif.sif.reader import SIFImage

_RULE = "-" * 78


def readable_size(size: int) -> str:
    """Size as ``sif header`` prints it: ``27 KiB``, ``1 MiB``, ``512 B`` (rounded half away from 0)."""
    if -1024 < size < 1024:
        return f"{size} B"
    div, exp = 1024, 0
    n = int(size / 1024)
    while n <= -1024 or n >= 1024:
        div *= 1024
        exp += 1
        n = int(n / 1024)
    value = abs(size) / div
    rounded = int(value + 0.5) * (1 if size > 0 else -1)
    return f"{rounded} {'KMGTPE'[exp]}iB"


def format_time(seconds: int) -> str | None:
    """A Unix time as Go prints a UTC ``time.Time``; None for Go's zero time (not shown)."""
    if seconds == GO_ZERO_TIME:
        return None
    try:
        stamp = dt.datetime.fromtimestamp(seconds, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return str(seconds)
    return stamp.strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def _aligned(rows: list[tuple[str, str]], padding: int, indent: str = "") -> str:
    """Rows of ``label<pad>value`` with the values in one column, like Go's tabwriter."""
    width = max(len(label) for label, _ in rows) + padding
    return "".join(f"{indent}{label.ljust(width)}{value}\n" for label, value in rows)


def format_header(img: SIFImage) -> str:
    """The global header, as ``apptainer sif header FILE`` prints it."""
    h = img.header
    rows: list[tuple[str, str]] = []
    if h.launch:
        rows.append(("Launch Script:", h.launch.removesuffix("\n")))
    rows.append(("Version:", h.version))
    if h.arch != "unknown":
        rows.append(("Primary Architecture:", h.arch))
    if h.uuid.int:
        rows.append(("ID:", str(h.uuid)))
    for label, seconds in (("Created At:", h.ctime), ("Modified At:", h.mtime)):
        if (text := format_time(seconds)) is not None:
            rows.append((label, text))
    rows += [
        ("Descriptors Free:", str(h.descriptors_free)),
        ("Descriptors Total:", str(h.descriptors_total)),
        ("Descriptors Offset:", str(h.descriptors_offset)),
        ("Descriptors Size:", readable_size(h.descriptors_size)),
        ("Data Offset:", str(h.data_offset)),
        ("Data Size:", readable_size(h.data_size)),
    ]
    return _aligned(rows, padding=1)


def _link_text(desc: Descriptor) -> str:
    if desc.link_id == 0:
        return "NONE"
    return f"{desc.link_id} (G)" if desc.link_is_group else str(desc.link_id)


def type_text(desc: Descriptor) -> str:
    """The TYPE column of ``sif list``: ``FS (Squashfs/*System/amd64)``, ``Signature (SHA-256)`` …"""
    kind = label_of(desc.datatype)
    if desc.datatype == DataType.PARTITION:
        return f"{kind} ({label_of(desc.fstype)}/{label_of(desc.parttype)}/{desc.arch})"
    if desc.datatype == DataType.SIGNATURE:
        return f"{kind} ({label_of(desc.hashtype)})"
    if desc.crypto_message is not None:
        fmt, msg = desc.crypto_message
        return f"{kind} ({label_of(fmt)}/{label_of(msg)})"
    if desc.sbom_format is not None:
        return f"{kind} ({label_of(desc.sbom_format).lower()})"
    return kind


def format_list(img: SIFImage) -> str:
    """The descriptor table, as ``apptainer sif list FILE`` prints it."""
    lines = [_RULE, f"{'ID':<4} {'|GROUP':<8} {'|LINK':<8} {'|SIF POSITION (start-end)':<26} |TYPE", _RULE]
    for d in img.descriptors:
        group = str(d.group_id) if d.group_id else "NONE"
        link = f"{d.link_id:<3d} (G)" if d.link_is_group and d.link_id else _link_text(d)
        position = f"|{d.offset}-{d.offset + d.size} "
        lines.append(f"{d.id:<4d} |{group:<7} |{link:<7} {position:<26} |{type_text(d)}")
    return "\n".join(lines) + "\n"


def format_info(desc: Descriptor) -> str:
    """One descriptor in detail, as ``apptainer sif info ID FILE`` prints it."""
    rows = [
        ("Data Type:", label_of(desc.datatype)),
        ("ID:", str(desc.id)),
        ("Group ID:", str(desc.group_id) if desc.group_id else "NONE"),
        ("Linked ID:", _link_text(desc)),
        ("Offset:", str(desc.offset)),
        ("Size:", str(desc.size)),
    ]
    for label, seconds in (("Created At:", desc.ctime), ("Modified At:", desc.mtime)):
        if (text := format_time(seconds)) is not None:
            rows.append((label, text))
    if desc.name:
        rows.append(("Name:", desc.name))
    if desc.datatype == DataType.PARTITION:
        rows += [
            ("Filesystem Type:", label_of(desc.fstype)),
            ("Partition Type:", label_of(desc.parttype)),
            ("Architecture:", str(desc.arch)),
        ]
    elif desc.datatype == DataType.SIGNATURE:
        rows.append(("Hash Type:", label_of(desc.hashtype)))
        if desc.entity:
            rows.append(("Entity:", desc.entity.hex().upper()))
    elif desc.crypto_message is not None:
        fmt, msg = desc.crypto_message
        rows += [("Format Type:", label_of(fmt)), ("Message Type:", label_of(msg))]
    elif desc.sbom_format is not None:
        rows.append(("Format:", label_of(desc.sbom_format).lower()))
    elif desc.oci_digest is not None:
        rows.append(("Digest:", desc.oci_digest))
    return _aligned(rows, padding=2, indent="  ")
