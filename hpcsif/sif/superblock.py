"""The squashfs 4.0 superblock: is there a plausible file system at an offset of a file?

Kept apart from :mod:`hpcsif.sif.squashfs` (which runs the squashfs tools) so that checking a
SIF before publishing or using it loads no more than :mod:`struct`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

# squashfs superblock compression ids (squashfs_fs.h)
_COMPRESSION_IDS = {1: "gzip", 2: "lzma", 3: "lzo", 4: "xz", 5: "lz4", 6: "zstd"}
SQUASHFS_MAGIC = b"hsqs"
_SUPERBLOCK = struct.Struct("<4sIIIIHHHHHHQQQQQQQQ")
SUPERBLOCK_SIZE = _SUPERBLOCK.size  # 96


def superblock_ok(path: Path, offset: int = 0) -> bool:
    """True if a plausible squashfs 4.0 superblock sits at ``offset`` and its data fits the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            raw = f.read(SUPERBLOCK_SIZE)
    except OSError:
        return False
    used = squashfs_bytes_used(raw)
    return used is not None and used <= size - offset


def squashfs_bytes_used(raw: bytes) -> int | None:
    """Size of the squashfs 4.0 file system whose superblock is the start of *raw*.

    None unless *raw* holds a plausible superblock (magic, version, compressor, block size,
    and table offsets that lie within the file system it describes).
    """
    if len(raw) < SUPERBLOCK_SIZE:
        return None
    fields = _SUPERBLOCK.unpack_from(raw)
    magic, inodes, _mtime, block_size, _frags, comp, block_log, _flags, _ids, major, minor = fields[:11]
    root_inode, bytes_used = fields[11], fields[12]
    table_starts = fields[13:]
    plausible = (
        magic == SQUASHFS_MAGIC
        and (major, minor) == (4, 0)
        and comp in _COMPRESSION_IDS
        and 12 <= block_log <= 20
        and block_size == 1 << block_log
        and inodes > 0
        and bytes_used >= SUPERBLOCK_SIZE
        and root_inode >> 16 < bytes_used
        and all(t == 0xFFFFFFFFFFFFFFFF or t < bytes_used for t in table_starts)
    )
    return bytes_used if plausible else None
