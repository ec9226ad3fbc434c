"""hpcsif.fsutil.read_regular: only regular files are read; anything else is None, never a hang."""

from __future__ import annotations

import os
from pathlib import Path

from hpcsif.fsutil import read_regular


def test_read_regular_reads_only_regular_files(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"0123456789")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("f")
    assert read_regular(tmp_path / "f", 4) == b"01234"  # limit + 1: the caller sees it is too large
    assert read_regular(tmp_path / "link", 100) == b"0123456789"
    assert read_regular(tmp_path / "link", 100, follow=False) is None
    assert read_regular(tmp_path / "fifo", 100) is None
    assert read_regular(tmp_path / "dir", 100) is None
