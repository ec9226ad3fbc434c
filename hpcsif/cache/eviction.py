"""Eviction: least recently used first, within a size quota and an optional maximum age.

:func:`plan_eviction` is pure accounting (tested with hypothesis); :func:`collect_garbage`
applies it to a cache root. A leased image is never evicted, nor one being built. Downloaded
blobs count towards the quota too, and go first (:mod:`hpcsif.cache.blobs`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from hpcsif.cache.blobs import Blob, evict_blobs, stored_blobs
from hpcsif.cache.layout import CacheRoot
from hpcsif.cache.leases import active_leases
from hpcsif.cache.store import Entry, SIFStore
from hpcsif.config import get_config, parse_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """What eviction needs to know about one cached image."""

    key: str
    size: int
    last_used: float
    leased: bool = False


def plan_eviction(
    items: Iterable[Item], *, quota: int | None, max_age: float | None = None, now: float | None = None
) -> list[str]:
    """Keys to evict, in order: first unleased items unused for longer than ``max_age`` seconds,
    then unleased items, least recently used first, until the total size is within ``quota``.

    Leased items count towards the quota but are never chosen, so the result may leave the
    cache above its quota when leased images alone exceed it.
    """
    items = list(items)
    now = time.time() if now is None else now
    victims: list[str] = []
    if max_age is not None:
        victims = [i.key for i in items if not i.leased and now - i.last_used > max_age]
    if quota is None:
        return victims
    gone = set(victims)
    total = sum(i.size for i in items if i.key not in gone)
    candidates = sorted(
        (i for i in items if not i.leased and i.key not in gone), key=lambda i: (i.last_used, i.key)
    )
    for item in candidates:
        if total <= quota:
            break
        victims.append(item.key)
        total -= item.size
    return victims


@dataclass
class GCResult:
    """What a garbage collection did (or, for a dry run, would do)."""

    evicted: list[Entry]
    kept_busy: list[Entry]  # chosen, but leased or locked by the time we got to them
    tmp_removed: int
    bytes_freed: int  # by the evicted images
    blobs_removed: list[Blob] = field(default_factory=list)


def collect_garbage(
    root: CacheRoot,
    *,
    quota: int | None = None,
    max_age_days: float | None = None,
    protect: Iterable[str] = (),
    dry_run: bool = False,
) -> GCResult:
    """Evict from ``root`` by the configured (or given) quota and age; never ``protect`` keys."""
    cfg = get_config()
    quota = parse_size(cfg.get("cache.quota")) if quota is None else quota
    if max_age_days is None:
        max_age_days = float(cfg.get("cache.max_age_days") or 0)
    store = SIFStore(root)
    tmp_removed = 0 if dry_run else store.clean_all_tmp()
    if not dry_run:
        root.rotate_journal()
    protected = set(protect)
    entries = {e.key: e for e in store.entries()}
    items = [
        Item(
            e.key,
            e.size,
            e.last_used,
            leased=e.key in protected or bool(active_leases(root, e.key, reap=not dry_run)),
        )
        for e in entries.values()
    ]
    quota = quota or None
    blobs_removed: list[Blob] = []
    if quota is not None:
        blobs = stored_blobs(root) if root.writable else []
        blob_bytes = sum(b.size for b in blobs)
        excess = sum(i.size for i in items) + blob_bytes - quota
        if blobs and excess > 0:
            removed = evict_blobs(root, blobs, excess, dry_run=dry_run)
            # blobs in use right now are left out of this round's accounting: evicting images
            # for layers that the next collection removes would lose conversions for nothing
            blobs_removed = removed or []
            if removed is not None:
                freed = sum(b.size for b in removed)
                quota -= blob_bytes - freed
                if removed and not dry_run:
                    log.info("removed %d blob(s) of %d bytes from %s", len(removed), freed, root.oci)
                    root.journal("evict-blobs", count=len(removed), bytes=freed)
    victims = plan_eviction(items, quota=quota, max_age=max_age_days * 86400 if max_age_days else None)
    evicted, busy = [], []
    for key in victims:
        entry = entries[key]
        if dry_run or store.remove(key, reason="evict"):
            evicted.append(entry)
            log.info("evicted %s (%s)", entry.meta.get("ref", key), entry.path)
        else:
            busy.append(entry)
    return GCResult(evicted, busy, tmp_removed, sum(e.size for e in evicted), blobs_removed)
