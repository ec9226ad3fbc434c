"""``hpcsif cache list|clean|gc``: look at and trim the SIF and blob cache."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcsif.cache.layout import CacheRoot


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cache`` command group."""
    parser = subparsers.add_parser("cache", help="list, clean or garbage-collect the image cache")
    sub = parser.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("list", help="list cached images and blob usage")
    # Apptainer's flags; the table of images is always shown, -v is accepted for its users' sake
    p.add_argument("-v", "--verbose", action="store_true", help="list every cached image (the default here)")
    p.add_argument("-T", "--type", choices=("blob", "sif", "all"), default="all", help="what to count")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("clean", help="remove cached images and/or blobs (images in use are kept)")
    p.add_argument("-n", "--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("-T", "--type", choices=("blob", "sif", "all"), default="all", help="what to remove")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("gc", help="evict least recently used images beyond the quota or maximum age")
    p.add_argument("-n", "--dry-run", action="store_true", help="list what would be evicted, evict nothing")
    p.add_argument("--quota", help="size limit for this run (default: cache.quota)")
    p.add_argument(
        "--max-age-days", type=float, help="evict images unused for longer (default: cache.max_age_days)"
    )
    p.set_defaults(func=cmd_gc)


def _size(n: float) -> str:
    """Sizes as Apptainer's cache commands print them: at least KiB, two decimals (``0.34 KiB``)."""
    n /= 1024
    for unit in ("KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _blob_usage(root: CacheRoot) -> tuple[int, int]:
    """(count, bytes) of the blobs in ``root``'s OCI layout."""
    from hpcsif.image.store import OCIStore

    if not (root.oci / "oci-layout").is_file():
        return 0, 0
    sizes = [size for _, size in OCIStore(root.oci).blobs()]
    return len(sizes), sum(sizes)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the table of cached images, then Apptainer's summary line per cache root and its total."""
    from hpcsif.cache.layout import cache_layout
    from hpcsif.cache.leases import active_leases, describe_lease
    from hpcsif.cache.store import SIFStore

    layout = cache_layout()
    rows, summary, total = [], [], 0
    for root in layout.lookup_roots:
        entries = list(SIFStore(root).entries()) if args.type in ("sif", "all") else []
        nblobs, blob_bytes = _blob_usage(root) if args.type in ("blob", "all") else (0, 0)
        sif_bytes = sum(e.size for e in entries)
        total += sif_bytes + blob_bytes
        counts = {
            "sif": f"{len(entries)} container file(s) using {_size(sif_bytes)}",
            "blob": f"{nblobs} oci blob file(s) using {_size(blob_bytes)}",
        }
        what = " and ".join(counts.values()) if args.type == "all" else counts[args.type]
        where = "" if root is layout.user else f" in the system cache {root.path}"
        summary.append(f"There are {what} of space{where}")
        for e in sorted(entries, key=lambda e: -e.last_used):
            leases = ", ".join(describe_lease(r) for r in active_leases(root, e.key, reap=root.writable))
            digest = str(e.meta.get("digest", e.key))[:19]
            name = e.meta.get("ref", e.meta["name"])
            rows.append((name, digest, _size(e.size), _when(e.last_used), leases or "-"))
    if rows:  # laid out as Apptainer's `cache list -v`: the table, a blank line, the summary
        header = ("IMAGE", "DIGEST", "SIZE", "LAST USED", "LEASES")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        print()
    print("\n".join(summary))
    print(f"Total space used: {_size(total)}")
    return 0


def _confirm(what: str) -> bool:
    sys.stdout.write(f"This will delete {what} from your cache.\nDo you want to continue? [y/N] ")
    sys.stdout.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove images (not those in use) and/or the blob cache, after confirmation."""
    import os
    import shutil
    import tempfile

    from hpcsif.cache.layout import cache_layout
    from hpcsif.cache.leases import active_leases
    from hpcsif.cache.store import SIFStore

    root = cache_layout().user
    store = SIFStore(root)
    entries = list(store.entries()) if args.type in ("sif", "all") else []
    blobs = _blob_usage(root) if args.type in ("blob", "all") else (0, 0)
    if args.dry_run:
        print("User requested a dry run. Not actually deleting any data!")
        for e in entries:
            busy = " (in use: would be kept)" if active_leases(root, e.key, reap=False) else ""
            print(f"would remove {e.meta.get('ref', e.meta['name'])} {e.path} {_size(e.size)}{busy}")
        if blobs[0]:
            print(f"would remove {blobs[0]} oci blob file(s) using {_size(blobs[1])} in {root.oci}")
        return 0
    what = {"sif": "all container files", "blob": "all OCI blobs", "all": "all container files and OCI blobs"}
    if not args.force and not _confirm(what[args.type]):
        print("Cleaning cancelled.")
        return 0
    kept = 0
    for e in entries:
        if store.remove(e.key, reason="clean"):
            print(f"Removing {e.meta.get('ref', e.meta['name'])} ({_size(e.size)})")
        else:
            kept += 1
    if args.type in ("sif", "all"):
        # entries whose meta.json cannot be read (damaged by hand or by the disk) go too, and
        # copies left unsynced by an earlier boot (lookups already ignore them)
        for key in set(store.keys()) - {e.key for e in entries}:
            stale = store.is_stale(key)
            if store.remove(key, reason="clean"):
                kind = "stale copy from an earlier boot" if stale else "unreadable entry"
                print(f"Removing {kind} {root.entry_dir(key)}")
    if kept:
        print(f"Kept {kept} image(s) that are in use or being converted.")
    if blobs[0]:
        # swap the whole layout out in one rename; the next fetch starts a fresh one
        doomed = tempfile.mkdtemp(prefix="oci.clean-", dir=root.tmp)
        os.rename(root.oci, os.path.join(doomed, "oci"))
        shutil.rmtree(doomed, ignore_errors=True)
        print(f"Removed {blobs[0]} oci blob file(s) ({_size(blobs[1])})")
    if args.type == "all":
        shutil.rmtree(root.tags, ignore_errors=True)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Evict by quota and age (never an image in use) and remove leftovers of killed conversions."""
    from hpcsif.cache.eviction import collect_garbage
    from hpcsif.cache.layout import cache_layout
    from hpcsif.config import parse_size

    quota = parse_size(args.quota) if args.quota else None
    result = collect_garbage(
        cache_layout().user, quota=quota, max_age_days=args.max_age_days, dry_run=args.dry_run
    )
    verb = "would evict" if args.dry_run else "evicted"
    for e in result.evicted:
        print(f"{verb} {e.meta.get('ref', e.meta['name'])} ({_size(e.size)}, last used {_when(e.last_used)})")
    for e in result.kept_busy:
        print(f"kept {e.meta.get('ref', e.meta['name'])}: in use")
    print(
        f"{len(result.evicted)} image(s) {verb}, {_size(result.bytes_freed)} freed"
        + (
            f", {result.tmp_removed} leftover(s) of interrupted conversions removed"
            if result.tmp_removed
            else ""
        )
    )
    return 0
