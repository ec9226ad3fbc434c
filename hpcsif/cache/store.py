"""Content-addressed SIF store with exactly-once publication.

``sif/<key>/`` holds ``<name>.sif``, ``meta.json`` and ``last_used`` (its mtime is the last
use). The key is the image's content digest plus a hash of the conversion options. An entry
is built in a private directory under ``tmp/``, validated (SIF header and descriptors,
squashfs superblock), fsynced and renamed into ``sif/`` in one step, under the key's lock,
so a reader sees a complete entry or none. A builder killed mid-way leaves only ``tmp/``
garbage, which the next holder of the key's lock removes.

An entry copied from another tier (``via: copy``) is not fsynced, so staging costs what a
``cp`` costs: its source stays durable elsewhere. Its ``meta.json`` (still written durably)
records the boot it was made in as ``unsynced_boot``; after a crash and reboot the data may be
incomplete, so such an entry counts as absent and the next request replaces it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcsif.cache.layout import CacheRoot, hostname
from hpcsif.cache.locking import KeyLock, key_lock
from hpcsif.errors import CacheError, SIFError
from hpcsif.fsutil import copy_file, fsync_dir
from hpcsif.image.store import atomic_write_bytes
from hpcsif.sources import SIF_TRANSPORTS

log = logging.getLogger(__name__)

META = "meta.json"
LAST_USED = "last_used"
UNSYNCED_BOOT = "unsynced_boot"

#: ``produce(dest)`` writes the SIF at ``dest`` and returns extra meta.json fields;
#: its ``via`` field ("convert", "copy" …) names the journal event
Producer = Callable[[Path], dict[str, Any]]


@dataclass(frozen=True)
class Entry:
    """A published image."""

    root: CacheRoot
    key: str
    meta: dict[str, Any]

    @property
    def dir(self) -> Path:
        """The entry's directory."""
        return self.root.entry_dir(self.key)

    @property
    def path(self) -> Path:
        """The SIF file."""
        return self.dir / self.meta["name"]

    @property
    def size(self) -> int:
        """Bytes of the SIF file."""
        return int(self.meta.get("size", 0))

    @property
    def last_used(self) -> float:
        """Unix time of the last use (publication if never used since)."""
        try:
            return (self.dir / LAST_USED).stat().st_mtime
        except OSError:
            return float(self.meta.get("created", 0))


def validate_sif(path: Path) -> None:
    """Raise :class:`SIFError` unless ``path`` is a SIF whose primary squashfs partition is sound."""
    from hpcsif.sif.reader import SIFImage
    from hpcsif.sif.superblock import superblock_ok

    with SIFImage.open(path) as img:
        part = img.primary_partition()
    if not superblock_ok(path, part.offset):
        raise SIFError(f"{path}: the primary partition has no valid squashfs superblock")


@functools.cache
def boot_id() -> str | None:
    """This boot's id (it changes at every reboot), or None where the kernel does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _is_stale(meta: dict[str, Any]) -> bool:
    """True for an entry published unsynced in an earlier boot: a crash may have cut its data."""
    boot = meta.get(UNSYNCED_BOOT)
    return boot is not None and boot != boot_id()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SIFStore:
    """The ``sif/`` part of one cache root."""

    def __init__(self, root: CacheRoot, *, lock_mode: str | None = None) -> None:
        self.root = root
        self.lock_mode = lock_mode

    def lock(self, key: str, what: str) -> KeyLock:
        """The lock that guards building and removing ``key``."""
        return key_lock(self.root.lock_path(key), what, mode=self.lock_mode)

    def _read_meta(self, key: str) -> dict[str, Any] | None:
        """The entry's meta.json, or None if there is none."""
        try:
            meta = json.loads((self.root.entry_dir(key) / META).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CacheError(f"cache entry {self.root.entry_dir(key)} is unreadable: {exc}") from None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise CacheError(f"cache entry {self.root.entry_dir(key)} has a corrupt meta.json")
        return meta

    def lookup(self, key: str) -> Entry | None:
        """The published entry for ``key``, or None (also for one a reboot made stale)."""
        meta = self._read_meta(key)
        if meta is None or _is_stale(meta):
            return None
        entry = Entry(self.root, key, meta)
        return entry if entry.path.is_file() else None

    def keys(self) -> list[str]:
        """The keys of every directory under ``sif/``, readable or not."""
        try:
            return sorted(p.name for p in (self.root.path / "sif").iterdir())
        except FileNotFoundError:
            return []

    def entries(self) -> Iterator[Entry]:
        """Every published entry (unreadable ones are skipped)."""
        for key in self.keys():
            with contextlib.suppress(CacheError):
                if entry := self.lookup(key):
                    yield entry

    def touch(self, entry: Entry) -> None:
        """Record a use of ``entry`` (read-only roots are left alone)."""
        with contextlib.suppress(OSError):
            os.utime(entry.dir / LAST_USED)

    def get_or_create(self, key: str, name: str, produce: Producer, *, what: str) -> tuple[Entry, bool]:
        """The entry for ``key``, built by ``produce`` exactly once; True if this call built it."""
        while True:
            if entry := self.lookup(key):
                return entry, False
            if not self.root.writable:
                raise CacheError(f"{self.root.path} is read-only: cannot add {what}")
            lock = self.lock(key, f"conversion of {what}")
            # waiters return as soon as the entry appears (or retry if it was evicted meanwhile)
            if not lock.acquire(done=lambda: self.lookup(key) is not None):
                continue
            try:
                if entry := self.lookup(key):
                    return entry, False
                self.clean_tmp(key)
                return self._build(key, name, produce, lock, what), True
            finally:
                lock.release()

    def _build(self, key: str, name: str, produce: Producer, lock: KeyLock, what: str) -> Entry:
        work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.root.tmp))
        try:
            started = time.time()
            info = produce(work / name)
            # a downloaded SIF is kept as it is, whatever it holds (Apptainer pulls one without
            # a root file system too); a conversion's output must have a sound partition
            if info.get("transport") not in SIF_TRANSPORTS:
                validate_sif(work / name)
            meta = {
                **info,
                "key": key,
                "name": name,
                "size": (work / name).stat().st_size,
                "created": time.time(),
                "seconds": round(time.time() - started, 3),
                "host": hostname(),
                "pid": os.getpid(),
            }
            # a copy need not reach the disk now: a crash only makes it stale (see lookup)
            unsynced = info.get("via") == "copy" and boot_id() is not None
            if unsynced:
                meta[UNSYNCED_BOOT] = boot_id()
            else:
                _fsync_file(work / name)
            atomic_write_bytes(work / META, json.dumps(meta, indent=1, sort_keys=True).encode())
            (work / LAST_USED).touch()
            os.chmod(work, 0o755)
            if not unsynced:
                fsync_dir(work)
            if not lock.still_held():
                raise CacheError(f"lost the lock on {what} while building it; not publishing")
            # lookup found nothing, yet a stale entry (or a crash's empty directory) may be there
            stale = self._set_aside(key)
            os.rename(work, self.root.entry_dir(key))
            if not unsynced:
                fsync_dir(self.root.path / "sif")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if stale:
            log.info("replaced the stale cache entry %s", self.root.entry_dir(key))
            self.root.journal("discard-stale", key=key)
            shutil.rmtree(stale, ignore_errors=True)
        self.root.journal(meta.get("via", "publish"), key=key, name=name, what=what, seconds=meta["seconds"])
        log.info("cached %s as %s", what, self.root.entry_dir(key) / name)
        return Entry(self.root, key, meta)

    def _set_aside(self, key: str) -> Path | None:
        """Move ``key``'s directory into ``tmp/`` (call with the key's lock held); returns where to.

        Readers see the whole directory or nothing, never a half-deleted one. None if there
        was no directory.
        """
        src = self.root.entry_dir(key)
        if not os.path.lexists(src):
            return None
        doomed = Path(tempfile.mkdtemp(prefix=f"{key}.remove-", dir=self.root.tmp))
        try:
            os.rename(src, doomed / "entry")
        except OSError as exc:
            shutil.rmtree(doomed, ignore_errors=True)
            raise CacheError(f"cannot remove {src}: {exc.strerror}") from None
        return doomed

    def clean_tmp(self, key: str) -> None:
        """Remove what dead builders of ``key`` left in ``tmp/`` (call with the key's lock held)."""
        with contextlib.suppress(FileNotFoundError):
            for leftover in self.root.tmp.glob(f"{key}.*"):
                log.info("removing leftovers of an interrupted build: %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)

    def clean_all_tmp(self) -> int:
        """Remove ``tmp/`` leftovers of every key whose lock is free, and the entries a reboot made
        stale (unsynced copies of an earlier boot); returns how many."""
        removed = sum(
            self.remove(key, respect_leases=False, stale_only=True, reason="discard-stale")
            for key in self.keys()
            if self.is_stale(key)
        )
        with contextlib.suppress(FileNotFoundError):
            for key in {p.name.split(".", 1)[0] for p in self.root.tmp.iterdir()}:
                lock = self.lock(key, f"cleanup of {key}")
                if lock.try_acquire():
                    try:
                        before = len(list(self.root.tmp.glob(f"{key}.*")))
                        self.clean_tmp(key)
                        removed += before
                    finally:
                        lock.release()
        return removed

    def remove(
        self, key: str, *, respect_leases: bool = True, stale_only: bool = False, reason: str = "remove"
    ) -> bool:
        """Remove ``key`` unless it is being built or (by default) leased; True if removed.

        ``stale_only``: only if it is an entry a reboot made stale (checked under the lock).
        """
        from hpcsif.cache.leases import active_leases

        lock = self.lock(key, f"removal of {key}")
        if not lock.try_acquire():
            return False
        try:
            if respect_leases and active_leases(self.root, key):
                return False
            if stale_only and not self.is_stale(key):
                return False
            doomed = self._set_aside(key)
            if doomed is None:
                return False
            shutil.rmtree(doomed, ignore_errors=True)
            self.root.journal(reason, key=key)
            return True
        finally:
            lock.release()

    def is_stale(self, key: str) -> bool:
        """True if ``key`` is an entry a reboot made stale (False for an unreadable one)."""
        try:
            meta = self._read_meta(key)
        except CacheError:
            return False
        return meta is not None and _is_stale(meta)


def produce_copy(entry: Entry) -> Producer:
    """A producer that copies ``entry`` (from another cache tier), keeping its provenance."""

    def produce(dest: Path) -> dict[str, Any]:
        try:
            copy_file(entry.path, dest)
        except OSError as exc:
            raise CacheError(f"cannot copy {entry.path} into the cache: {exc.strerror}") from None
        kept = {k: v for k, v in entry.meta.items() if k in ("ref", "digest", "options", "transport")}
        return {**kept, "via": "copy", "origin": str(entry.root.path)}

    return produce
