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
_SUPERBLOCK = struct.Struct("<4sIIIIHHHHHHQQQQQQQQ")  # 96 bytes


def superblock_ok(path: Path, offset: int = 0) -> bool:
    """True if a plausible squashfs 4.0 superblock sits at ``offset`` and its data fits the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            raw = f.read(_SUPERBLOCK.size)
    except OSError:
        return False
    if len(raw) < _SUPERBLOCK.size:
        return False
    fields = _SUPERBLOCK.unpack(raw)
    magic, inodes, _mtime, block_size, _frags, comp, block_log, _flags, _ids, major, minor = fields[:11]
    root_inode, bytes_used = fields[11], fields[12]
    table_starts = fields[13:]
    return (
        magic == SQUASHFS_MAGIC
        and (major, minor) == (4, 0)
        and comp in _COMPRESSION_IDS
        and 12 <= block_log <= 20
        and block_size == 1 << block_log
        and inodes > 0
        and _SUPERBLOCK.size <= bytes_used <= size - offset
        and root_inode >> 16 < bytes_used
        and all(t == 0xFFFFFFFFFFFFFFFF or t < bytes_used for t in table_starts)
    )
