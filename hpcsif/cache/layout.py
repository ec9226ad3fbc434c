"""Where the cache lives: roots and their subdirectories.

A root holds ``oci/`` (the OCI blob cache shared by every image), ``sif/<key>/`` (one
converted image: ``<name>.sif`` and ``meta.json``), ``locks/``, ``leases/<key>/``,
``tmp/`` (work in progress, never read) and ``tags/`` (tag -> digest records). Every
root also keeps ``journal.jsonl``, one JSON line per conversion, copy and eviction.

Roots, in lookup order: the system cache (``cache.system_dir``, filled by the prolog as
root, read-only to users), the user cache (:meth:`Config.cache_dir`), and an optional
shared tier (``cache.shared_dir``). ``*_DISABLE_CACHE`` replaces the user cache with a
temporary directory removed when the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from hpcsif.config import Config, get_config
from hpcsif.errors import CacheError

SUBDIRS = ("oci", "sif", "locks", "leases", "tmp", "tags")
JOURNAL = "journal.jsonl"

_disabled_root: Path | None = None


@dataclass(frozen=True)
class CacheRoot:
    """One cache directory tree; ``writable`` is False for the system cache seen by a user."""

    path: Path
    writable: bool = True

    def ensure(self, *, private: bool = True) -> CacheRoot:
        """Create the subdirectories (writable roots only); returns self.

        ``private``: a root created here is made 0700, as Apptainer makes a user's cache (it
        holds the images of private repositories); an existing root keeps its mode. The
        prolog opens the system cache to the job users itself; a shared tier is not private.
        """
        if self.writable:
            try:
                if private and not self.path.is_dir():
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(FileExistsError):  # another process was first
                        self.path.mkdir(mode=0o700)
                for name in SUBDIRS:
                    (self.path / name).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CacheError(f"cannot create cache directory {self.path}: {exc.strerror}") from None
        return self

    @property
    def oci(self) -> Path:
        """The OCI image layout holding every fetched blob."""
        return self.path / "oci"

    def entry_dir(self, key: str) -> Path:
        """The published directory of the image with ``key``."""
        return self.path / "sif" / key

    def lock_path(self, key: str) -> Path:
        """The lock file guarding conversion and removal of ``key``."""
        return self.path / "locks" / f"{key}.lock"

    def lease_dir(self, key: str) -> Path:
        """Where the leases on ``key`` live."""
        return self.path / "leases" / key

    @property
    def tmp(self) -> Path:
        """Work area: conversions in progress and entries being removed."""
        return self.path / "tmp"

    @property
    def tags(self) -> Path:
        """Tag -> digest records."""
        return self.path / "tags"

    def journal(self, event: str, **fields: Any) -> None:
        """Append one event line to the root's journal (O_APPEND: lines never interleave)."""
        if not self.writable:
            return
        record = {"event": event, "time": round(time.time(), 3), "pid": os.getpid(), "host": hostname()}
        line = (json.dumps({**record, **fields}, sort_keys=True) + "\n").encode()
        fd = os.open(self.path / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def rotate_journal(self, max_bytes: int = 4 << 20) -> None:
        """Start a new journal once it exceeds ``max_bytes``, keeping one old generation."""
        path = self.path / JOURNAL
        with contextlib.suppress(OSError):
            if path.stat().st_size > max_bytes:
                os.replace(path, path.with_name(JOURNAL + ".1"))

    def read_journal(self) -> list[dict[str, Any]]:
        """Every journal record, oldest first (unparsable lines are skipped)."""
        try:
            lines = (self.path / JOURNAL).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


@dataclass(frozen=True)
class CacheLayout:
    """The roots one process uses."""

    user: CacheRoot
    system: CacheRoot | None = None
    shared: str | None = None  # path or fsspec URL of the shared tier

    @cached_property
    def lookup_roots(self) -> list[CacheRoot]:
        """Roots searched for a published image, system cache first."""
        return [r for r in (self.system, self.user) if r is not None]


def hostname() -> str:
    """This node's short host name (as Slurm names nodes)."""
    return os.uname().nodename.split(".", 1)[0]  # gethostname(), without importing socket


def _temporary_root() -> Path:
    """A per-process throw-away cache root, removed at exit (``*_DISABLE_CACHE``)."""
    global _disabled_root
    if _disabled_root is None:
        _disabled_root = Path(tempfile.mkdtemp(prefix="hpcsif-cache-"))
        atexit.register(shutil.rmtree, _disabled_root, True)
    return _disabled_root


def cache_layout(cfg: Config | None = None) -> CacheLayout:
    """The cache roots from the configuration (creating the user root's subdirectories)."""
    cfg = cfg or get_config()
    user_path = _temporary_root() if cfg.cache_disabled() else cfg.cache_dir()
    user = CacheRoot(user_path.absolute()).ensure()
    system = None
    sys_dir = cfg.get("cache.system_dir")
    if sys_dir and not cfg.cache_disabled():
        sys_path = Path(sys_dir).absolute()
        if sys_path != user.path and (sys_path / "sif").is_dir():
            system = CacheRoot(sys_path, writable=os.access(sys_path / "sif", os.W_OK))
    shared = cfg.get("cache.shared_dir") or None
    return CacheLayout(user=user, system=system, shared=shared)
