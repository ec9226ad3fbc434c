"""``hpcsif stage``: put images into node caches ahead of the jobs that need them.

* ``hpcsif stage REF…``: here, through the cache (converted once, then a cache hit); prints
  ``REF<TAB>PATH`` per image;
* ``hpcsif stage --slurm REF…``: inside an allocation, once on every node of it, through
  ``srun --overlap --ntasks-per-node=1 -N $SLURM_NNODES hpcsif stage REF…``;
* ``hpcsif stage --nodes 'node[01-04,07]' REF…``: over SSH on each node (paramiko, bounded
  parallelism, per-node timeout, host keys from known_hosts), with a table of per-node results;
  exits 1 if any node failed. With ``--from NODE`` the image is staged on NODE only and its
  cache entry copied over SFTP to the others (for nodes that cannot reach the registry, or to
  convert once).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections import namedtuple  # not dataclasses: every hpcsif command imports this module


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``stage`` command."""
    p = subparsers.add_parser(
        "stage",
        help="pre-stage images into node caches (here, on every node of an allocation, or over SSH)",
        description="Pre-stage images into node caches.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", metavar="HOSTLIST", help="stage over SSH on these nodes (node[01-04,07])")
    where.add_argument("--slurm", action="store_true", help="stage on every node of the current allocation")
    where.add_argument(
        "--where", action="store_true", help="print the cache directory staging uses, and exit"
    )
    p.add_argument("--system", action="store_true", help="use the system cache (cache.system_dir; as root)")
    ssh = p.add_argument_group("SSH (with --nodes)")
    ssh.add_argument(
        "--from", dest="from_node", metavar="NODE", help="stage on NODE, copy to the rest over SFTP"
    )
    ssh.add_argument("--parallel", type=int, help="nodes at once (default: remote.ssh_parallel)")
    ssh.add_argument("--timeout", type=float, help="seconds per node (default: remote.ssh_timeout)")
    ssh.add_argument("--port", type=int, help="SSH port (default: remote.ssh_port or 22)")
    ssh.add_argument("--user", help="SSH user (default: remote.ssh_user or the current user)")
    ssh.add_argument("-i", "--identity", metavar="KEYFILE", help="private key (default: agent, ~/.ssh keys)")
    ssh.add_argument(
        "--known-hosts",
        metavar="FILE",
        help="host keys (default: ~/.ssh/known_hosts; /etc/ssh/ssh_known_hosts is read too)",
    )
    ssh.add_argument(
        "--remote-command", metavar="CMD", default="hpcsif", help="hpcsif on the nodes (default: hpcsif)"
    )
    p.add_argument("refs", nargs="*", metavar="REF", help="image references")
    p.set_defaults(func=cmd_stage)


def cmd_stage(args: argparse.Namespace) -> int:
    """Dispatch to local, --slurm, --nodes or --where."""
    from hpcsif.errors import UsageError

    if args.where:
        print(_cache_root(args.system))
        return 0
    if not args.refs:
        raise UsageError("stage: name at least one image reference")
    if args.from_node and args.nodes is None:
        raise UsageError("--from needs --nodes")
    if args.nodes is not None:
        return _stage_nodes(args)
    if args.slurm:
        return _stage_slurm(args)
    return _stage_local(args)


def _cache_root(system: bool) -> str:
    """The cache root this process stages into."""
    if system:
        from hpcsif.slurm.prolog import system_dir

        return str(system_dir())
    from hpcsif.cache.layout import cache_layout

    return str(cache_layout().user.path)


def _stage_local(args: argparse.Namespace) -> int:
    """Stage each reference here; print ``REF\\tPATH``."""
    from hpcsif.cache.api import ensure_image

    if args.system:
        from hpcsif.slurm.prolog import system_cache_config

        with system_cache_config():
            paths = [ensure_image(ref) for ref in args.refs]
    else:
        paths = [ensure_image(ref) for ref in args.refs]
    for ref, path in zip(args.refs, paths, strict=True):
        print(f"{ref}\t{path}", flush=True)
    return 0


def _stage_slurm(args: argparse.Namespace) -> int:
    """Run ``hpcsif stage REF…`` once on every node of the allocation, through srun."""
    from hpcsif.errors import UsageError

    nnodes = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES")
    if not os.environ.get("SLURM_JOB_ID") or not nnodes:
        raise UsageError("--slurm works inside a Slurm allocation (SLURM_JOB_ID and SLURM_NNODES unset)")
    # --overlap: a step that holds the allocation's CPUs or memory (srun --pty bash, a running
    # solver) would otherwise keep this one waiting for ever
    cmd = ["srun", "--overlap", "--ntasks-per-node=1", "-N", nnodes, "--label", *_self_command(), "stage"]
    cmd += ["--system"] if args.system else []
    sys.stdout.flush()
    os.execvp(cmd[0], [*cmd, *args.refs])
    return 127  # not reached


def _self_command() -> list[str]:
    """How to run this same hpcsif on the allocation's nodes."""
    import shutil

    exe = shutil.which("hpcsif")
    return [exe] if exe else [sys.executable, "-m", "hpcsif.cli.main"]


# --- over SSH ------------------------------------------------------------------------------------


#: one line of the per-node table
Row = namedtuple("Row", "node ok seconds detail")


def _ssh_options(args: argparse.Namespace) -> dict[str, object]:
    """Keyword arguments for hpcsif.remote.ssh from flags, else config ``remote.*``."""
    from hpcsif.config import get_config

    cfg = get_config()
    return {
        "port": args.port or int(cfg.get("remote.ssh_port")),
        "user": args.user or cfg.get("remote.ssh_user") or None,
        "key_filename": args.identity,
        "known_hosts": args.known_hosts,
        "auto_add": bool(cfg.get("remote.auto_add_host_keys")),
        "timeout": args.timeout or float(cfg.get("remote.ssh_timeout")),
    }


def _staged_paths(stdout: str) -> list[str]:
    """The paths in ``hpcsif stage`` output (``REF<TAB>PATH`` lines)."""
    return [line.rsplit("\t", 1)[1] for line in stdout.splitlines() if "\t" in line]


def _stage_nodes(args: argparse.Namespace) -> int:
    """Stage on every node of a hostlist over SSH; print a table; 1 if any node failed."""
    from hpcsif.config import get_config
    from hpcsif.errors import UsageError
    from hpcsif.remote.ssh import fan_out
    from hpcsif.slurm.hostlist import expand

    nodes = expand(args.nodes)
    if not nodes:  # (--nodes "$EMPTY" must not stage here instead)
        raise UsageError(f"--nodes {args.nodes!r} names no node")
    parallel = args.parallel or int(get_config().get("remote.ssh_parallel"))
    remote = shlex.split(args.remote_command)
    stage = [*remote, "stage", *(["--system"] if args.system else [])]
    ssh = _ssh_options(args)
    if args.from_node:
        rows = _copy_from(args.from_node, nodes, stage, args.refs, ssh, parallel)
    else:
        rows = [
            Row(r.node, r.ok, r.seconds, ", ".join(_staged_paths(r.stdout)) if r.ok else r.error or "failed")
            for r in fan_out(nodes, [*stage, *args.refs], parallel=parallel, **ssh)
        ]
    _print_table(rows)
    return 0 if all(r.ok for r in rows) else 1


def _print_table(rows: list[Row]) -> None:
    width = max([4, *(len(r.node) for r in rows)])
    print(f"{'NODE':<{width}}  {'STATUS':<6}  {'SECONDS':>7}  DETAIL")
    for r in rows:
        print(f"{r.node:<{width}}  {'ok' if r.ok else 'FAILED':<6}  {r.seconds:>7.2f}  {r.detail}")
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows)} node(s): {len(rows) - failed} ok, {failed} failed", flush=True)


def _copy_from(
    source: str, nodes: list[str], stage: list[str], refs: list[str], ssh: dict[str, object], parallel: int
) -> list[Row]:
    """Stage on ``source``, download its cache entries once, and publish them on every other node."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from hpcsif.remote.ssh import fan_out

    (first,) = fan_out([source], [*stage, *refs], **ssh)
    if not first.ok:
        why = f"source {source}: {first.error}"
        return [Row(n, False, first.seconds if n == source else 0.0, why) for n in nodes]
    paths = _staged_paths(first.stdout)
    targets = [n for n in nodes if n != source]
    with tempfile.TemporaryDirectory(prefix="hpcsif-stage-") as local:
        entries = [_download_entry(source, path, local, ssh) for path in paths]
        where = {r.node: r for r in fan_out(targets, [*stage, "--where"], parallel=parallel, **ssh)}

        def publish(node: str) -> Row:
            root = where[node]
            if not root.ok:
                return Row(node, False, root.seconds, root.error or "failed")
            try:
                for entry in entries:
                    _publish_entry(node, entry, root.stdout.strip(), ssh)
            except Exception as exc:  # one node's failure is its row
                return Row(node, False, root.seconds, str(exc))
            return Row(node, True, root.seconds, f"copied from {source}")

        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets) or 1))) as pool:
            copied = {r.node: r for r in pool.map(publish, targets)}
    source_row = Row(source, True, first.seconds, ", ".join(paths))
    return [source_row if n == source else copied[n] for n in nodes]


#: a cache entry downloaded from the source node: ``sif/<key>/{NAME.sif,meta.json}``
_Entry = namedtuple("_Entry", "key local_dir files")


def _download_entry(source: str, sif_path: str, local: str, ssh: dict[str, object]) -> _Entry:
    import json

    from hpcsif.remote.ssh import sftp_copy

    entry_dir, name = os.path.split(sif_path)
    key = os.path.basename(entry_dir)
    dest = os.path.join(local, key)
    os.makedirs(dest, exist_ok=True)
    for fname in (name, "meta.json"):
        sftp_copy(source, f"{entry_dir}/{fname}", os.path.join(dest, fname), download=True, **ssh)
    # the source may hold an unsynced copy tied to its own boot; the upload syncs, so the
    # targets' entries are durable and must not inherit that mark (they would look stale)
    meta_path = os.path.join(dest, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.pop("unsynced_boot", None) is not None:
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
    return _Entry(key, dest, (name, "meta.json"))


def _publish_entry(node: str, entry: _Entry, root: str, ssh: dict[str, object]) -> None:
    """Upload into ``ROOT/tmp/`` on ``node`` and rename into ``ROOT/sif/KEY`` as the cache does
    (an entry already there wins; the upload is then discarded)."""
    import secrets

    from hpcsif.errors import RemoteError
    from hpcsif.remote.ssh import fan_out, sftp_copy

    work = f"{root}/tmp/{entry.key}.sftp-{secrets.token_hex(4)}"
    (made,) = fan_out([node], ["mkdir", "-p", "-m", "0755", work, f"{root}/sif"], **ssh)
    if not made.ok:
        raise RemoteError(f"cannot prepare {work}: {made.error}")
    for fname in entry.files:
        sftp_copy(node, os.path.join(entry.local_dir, fname), f"{work}/{fname}", **ssh)
    final = f"{root}/sif/{entry.key}"
    script = (
        f"touch {shlex.quote(work)}/last_used && "
        f"{{ mv -T {shlex.quote(work)} {shlex.quote(final)} 2>/dev/null || "
        f"{{ rm -rf {shlex.quote(work)}; test -e {shlex.quote(final)}/meta.json; }}; }}"
    )
    (moved,) = fan_out([node], script, **ssh)
    if not moved.ok:
        raise RemoteError(f"cannot publish {final}: {moved.error}")
