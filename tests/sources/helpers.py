"""Assertions shared by the source tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hpcsif.config import Config, set_config


def assert_store_sound(root: Path, partials: bool = False) -> int:
    """Every blob under ``root`` hashes to its name and no temp file is left; returns the count.

    ``partials``: interrupted downloads may remain in ``.partial/`` (kept for a resume).
    """
    blobs = root / "blobs" / "sha256"
    names = sorted(p.name for p in blobs.iterdir())
    if (root / ".partial").is_dir():
        # a failed download keeps its lock (and maybe its part); a stored blob keeps neither
        left = [p.name for p in (root / ".partial").iterdir()]
        done = [n for n in left if n.split(".", 1)[0] in names]
        assert not done, f"partial downloads or locks left for stored blobs: {done}"
        if not partials:
            data = [n for n in left if not n.endswith((".lock", ".lock.holder"))]
            assert not data, f"leftover partial downloads: {data}"
    assert not [n for n in names if n.startswith(".")], f"leftover temporary files: {names}"
    for name in names:
        assert hashlib.sha256((blobs / name).read_bytes()).hexdigest() == name, f"corrupt blob {name}"
    return len(names)


def use_config(**registry: object) -> None:
    """Install a fresh process config with ``registry.*`` overrides (undone by ``set_config(None)``)."""
    cfg = Config.load()
    for key, value in registry.items():
        cfg.override(f"registry.{key}", value)
    set_config(cfg)
