"""``hpcsif cache list|clean|gc``: look at and trim the SIF and blob cache."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcsif.cache.layout import CacheRoot
    from hpcsif.cache.store import Entry


#: Apptainer's cache type names (``-T``) -> the kind of entry here; "sif" is ours (every image)
CACHE_TYPES = {
    "library": "library",
    "oci": "oci-tmp",
    "oci-tmp": "oci-tmp",
    "oci-sif": "oci-tmp",
    "shub": "shub",
    "blob": "blob",
    "blobs": "blob",
    "net": "net",
    "oras": "oras",
    "sif": "sif",
    "all": "all",
}
#: the Apptainer type of an image converted from each transport (others: an OCI conversion)
_TRANSPORT_TYPE = {"oras": "oras", "http": "net", "https": "net", "library": "library", "shub": "shub"}
_TYPES_HELP = (
    "comma-separated cache types, repeatable: library, oci (also oci-tmp, oci-sif), shub, net, oras "
    "(images pulled by such references; here library and shub are always empty), blob, sif (every "
    "image), all (default)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cache`` command group."""
    parser = subparsers.add_parser("cache", help="list, clean or garbage-collect the image cache")
    sub = parser.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("list", help="list cached images and blob usage")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        dest="table",  # not the global -v's dest: `hpcsif -v cache list` prints no table, as Apptainer
        help="include the cache entries (a table) in the output",
    )
    p.add_argument("-T", "--type", action="append", metavar="TYPES", help=_TYPES_HELP)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("clean", help="remove cached images and/or blobs (images in use are kept)")
    p.add_argument("-n", "--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("-T", "--type", action="append", metavar="TYPES", help=_TYPES_HELP)
    p.add_argument(
        "-D",
        "--days",
        type=int,
        metavar="N",
        help="remove only entries created more than N days ago (the blob cache goes as a whole, "
        "once its newest blob is that old)",
    )
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser(
        "gc",
        help="evict beyond the quota (blobs first, then least recently used images) or maximum age",
    )
    p.add_argument("-n", "--dry-run", action="store_true", help="list what would be evicted, evict nothing")
    p.add_argument("--quota", help="size limit for this run (default: cache.quota)")
    p.add_argument(
        "--max-age-days", type=float, help="evict images unused for longer (default: cache.max_age_days)"
    )
    p.set_defaults(func=cmd_gc)


def selected_types(values: list[str] | None) -> set[str]:
    """The entry kinds ``-T`` values name (comma lists, repeatable); :class:`UsageError` on an unknown one."""
    from hpcsif.errors import UsageError

    kinds = set()
    for value in values or ["all"]:
        for name in filter(None, (t.strip().lower() for t in value.split(","))):
            if name not in CACHE_TYPES:
                known = "library, oci, shub, blob, net, oras, all"
                raise UsageError(f"--type {name}: unknown cache type (possible values: {known})")
            kinds.add(CACHE_TYPES[name])
    return {"sif", "blob"} if "all" in kinds else kinds


def entry_type(entry: Entry) -> str:
    """Apptainer's cache type of an image: by the transport it was pulled with."""
    transport = entry.meta.get("transport") or str(entry.meta.get("ref", "")).partition(":")[0]
    return _TRANSPORT_TYPE.get(transport, "oci-tmp")


def _wanted(entry: Entry, kinds: set[str]) -> bool:
    return "sif" in kinds or entry_type(entry) in kinds


def _size(n: float) -> str:
    """Sizes as Apptainer's cache commands print them: at least KiB, two decimals (``0.34 KiB``)."""
    n /= 1024
    for unit in ("KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _when(t: float, seconds: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M", time.localtime(t))


def _created(entry: Entry) -> float:
    return float(entry.meta.get("created") or entry.last_used)


def _blobs(root: CacheRoot) -> list[tuple[str, int, float]]:
    """(digest, size, mtime) of the blobs in ``root``'s OCI layout."""
    from hpcsif.image.store import OCIStore

    if not (root.oci / "oci-layout").is_file():
        return []
    store = OCIStore(root.oci)
    found = []
    for digest, size in store.blobs():
        try:
            mtime = (store.blobs_dir / digest.removeprefix("sha256:")).stat().st_mtime
        except FileNotFoundError:  # removed by a concurrent clean
            continue
        found.append((digest, size, mtime))
    return found


def cmd_list(args: argparse.Namespace) -> int:
    """Apptainer's summary line per cache root and the total; with -v first the table of entries."""
    from hpcsif.cache.layout import cache_layout
    from hpcsif.cache.leases import active_leases, describe_lease
    from hpcsif.cache.store import SIFStore

    kinds = selected_types(args.type)
    images = kinds - {"blob"}
    layout = cache_layout()
    rows, summary, total = [], [], 0
    for root in layout.lookup_roots:
        entries = [e for e in SIFStore(root).entries() if _wanted(e, kinds)]
        blobs = _blobs(root) if "blob" in kinds else []
        sif_bytes, blob_bytes = sum(e.size for e in entries), sum(b[1] for b in blobs)
        total += sif_bytes + blob_bytes
        counts = []
        if images:
            counts.append(f"{len(entries)} container file(s) using {_size(sif_bytes)}")
        if "blob" in kinds:
            counts.append(f"{len(blobs)} oci blob file(s) using {_size(blob_bytes)}")
        where = "" if root is layout.user else f" in the system cache {root.path}"
        summary.append(f"There are {' and '.join(counts)} of space{where}")
        # Apptainer's columns (blobs first, by name), then ours: the image, its last use and leases
        for digest, size, mtime in sorted(blobs):
            rows.append(
                (digest.removeprefix("sha256:")[:22], _when(mtime, True), _size(size), "blob", "", "", "")
            )
        for e in sorted(entries, key=lambda e: -e.last_used):
            leases = ", ".join(describe_lease(r) for r in active_leases(root, e.key, reap=root.writable))
            digest = _entry_name(e)[:22]
            name = e.meta.get("ref", e.meta["name"])
            created = _when(_created(e), True)
            rows.append(
                (digest, created, _size(e.size), entry_type(e), _when(e.last_used), leases or "-", name)
            )
    if args.table:  # the header even for an empty cache, as Apptainer prints it; ours only with rows
        header = (
            "NAME",
            "DATE CREATED",
            "SIZE",
            "TYPE",
            *(("LAST USED", "LEASES", "IMAGE") if rows else "   "),
        )
        for r in [header, *rows]:
            print(f"{r[0]:<24} {r[1]:<22} {r[2]:<16} {r[3]:<8} {r[4]:<16} {r[5]:<12} {r[6]}".rstrip())
        print()
    print("\n".join(summary))
    print(f"Total space used: {_size(total)}")
    return 0


def _confirm(what: str) -> bool:
    """Apptainer's question (and hint) before a clean; True when the user answers yes."""
    sys.stdout.write(
        f"This will delete {what}.\n"
        "Hint: You can see exactly what would be deleted by canceling and using the --dry-run option.\n"
        "Do you want to continue? [y/N] "
    )
    sys.stdout.flush()
    answer = sys.stdin.readline()
    if not answer:  # no terminal and nothing piped in: not a "no", as Apptainer says
        from hpcsif.errors import CacheError

        raise CacheError("Handle clean failed: could not prompt user: could not read user's input: EOF")
    return answer.strip().lower() in ("y", "yes")


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove images (not those in use) and/or the blob cache, after confirmation."""
    import os
    import shutil
    import tempfile

    from hpcsif.cache.layout import cache_layout
    from hpcsif.cache.leases import active_leases
    from hpcsif.cache.store import SIFStore
    from hpcsif.cli.pull import info

    kinds = selected_types(args.type)
    everything = kinds == {"sif", "blob"} and args.days is None
    cutoff = time.time() - args.days * 86400 if args.days is not None else None
    root = cache_layout().user
    store = SIFStore(root)
    entries = [e for e in store.entries() if _wanted(e, kinds) and (cutoff is None or _created(e) < cutoff)]
    blobs = _blobs(root) if "blob" in kinds else []
    if cutoff is not None and blobs and max(b[2] for b in blobs) >= cutoff:
        blobs = []  # blobs are removed together or not at all: a fetch may be using the layout
    if args.dry_run:  # then Apptainer's lines, as if it removed what it lists
        print("User requested a dry run. Not actually deleting any data!")
    parts = []
    if kinds - {"blob"}:
        types = ", ".join(sorted(kinds - {"blob"}))
        parts.append("container files" if "sif" in kinds else f"container files of type {types}")
    if "blob" in kinds:
        parts.append("OCI blobs")
    what = " and ".join(parts)
    what = f"{what} older than {args.days} day(s)" if cutoff is not None else f"all {what}"
    what = (
        "everything in your cache (containers from all sources and OCI blobs)"
        if everything
        else f"{what} from your cache"
    )
    if not (args.force or args.dry_run) and not _confirm(what):
        print("INFO:    Handle cleanup canceled", file=sys.stderr)
        return 0
    # what was removed goes to stderr in Apptainer's INFO lines (quiet with -q/-s), blobs first
    if blobs:
        # as Apptainer names its blob cache's entries (our lock and partial downloads left unsaid)
        for name in sorted(n for n in os.listdir(root.oci) if not n.startswith(".")):
            info(args, f"Removing blob cache entry: {name}")
        if not args.dry_run:  # swap the whole layout out in one rename; the next fetch starts a new one
            doomed = tempfile.mkdtemp(prefix="oci.clean-", dir=root.tmp)
            os.rename(root.oci, os.path.join(doomed, "oci"))
            shutil.rmtree(doomed, ignore_errors=True)
    elif "blob" in kinds:
        info(args, f"No cached files to remove at {root.oci}")
    removed = 0
    for e in entries:
        name = f"{entry_type(e)} cache entry: {_entry_name(e)} ({e.meta.get('ref', e.meta['name'])})"
        if args.dry_run:
            busy = bool(active_leases(root, e.key, reap=False))
        else:
            busy = not store.remove(e.key, reason="clean")
        if busy:
            print(f"WARNING: Not removing {name}: it is in use or being converted", file=sys.stderr)
        else:
            info(args, f"Removing {name}")
            removed += 1
    if "sif" in kinds and cutoff is None:
        # entries whose meta.json cannot be read (damaged by hand or by the disk) go too, and
        # copies left unsynced by an earlier boot (lookups already ignore them)
        for key in set(store.keys()) - {e.key for e in store.entries()}:
            kind = "stale copy from an earlier boot" if store.is_stale(key) else "unreadable cache entry"
            if args.dry_run or store.remove(key, reason="clean"):
                info(args, f"Removing {kind}: {root.entry_dir(key)}")
                removed += 1
    if not (entries or removed) and kinds - {"blob"}:
        info(args, f"No cached files to remove at {root.path / 'sif'}")
    if everything and not args.dry_run:
        shutil.rmtree(root.tags, ignore_errors=True)
    return 0


def _entry_name(entry: Entry) -> str:
    """An image's name in Apptainer's cache: its digest (``sha256:HEX`` for oras, else HEX)."""
    digest = str(entry.meta.get("digest", entry.key))
    return digest if entry_type(entry) == "oras" else digest.removeprefix("sha256:")


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
    if result.blobs_removed:
        blob_bytes = sum(b.size for b in result.blobs_removed)
        removal = "would remove" if args.dry_run else "removed"
        print(f"{removal} {len(result.blobs_removed)} oci blob file(s) ({_size(blob_bytes)})")
    print(
        f"{len(result.evicted)} image(s) {verb}, {_size(result.bytes_freed)} freed"
        + (
            f", {result.tmp_removed} leftover(s) of interrupted conversions removed"
            if result.tmp_removed
            else ""
        )
    )
    return 0
