"""``hpcsif stage``: put images into node caches ahead of the jobs that need them.

* ``hpcsif stage REF…``: here, through the cache (converted once, then a cache hit);
* ``hpcsif stage --slurm REF…``: inside an allocation, once on every node of it, through
  ``srun --ntasks-per-node=1 -N $SLURM_NNODES hpcsif stage REF…``;
* ``hpcsif stage --nodes 'node[01-04,07]' REF…``: over SSH on each node (bounded parallelism,
  per-node timeout), with a table of per-node results; exits non-zero if any node failed.
  ``--from NODE`` copies the SIF over SFTP from a node that has it instead of staging remotely.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


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
    p.add_argument(
        "--system", action="store_true", help="stage into the system cache (cache.system_dir; root)"
    )
    p.add_argument(
        "--from", dest="from_node", metavar="NODE", help="with --nodes: copy the SIF from NODE over SFTP"
    )
    p.add_argument("--parallel", type=int, help="with --nodes: nodes at once (default: remote.ssh_parallel)")
    p.add_argument(
        "--timeout", type=float, help="with --nodes: seconds per node (default: remote.ssh_timeout)"
    )
    p.add_argument(
        "--remote-command", metavar="CMD", help="with --nodes: hpcsif command on the nodes (default: hpcsif)"
    )
    p.add_argument("refs", nargs="+", metavar="REF", help="image references")
    p.set_defaults(func=cmd_stage)


def cmd_stage(args: argparse.Namespace) -> int:
    """Dispatch to local, --slurm or --nodes staging."""
    if args.nodes:
        return _stage_nodes(args)
    if args.from_node:
        from hpcsif.errors import UsageError

        raise UsageError("--from needs --nodes")
    if args.slurm:
        return _stage_slurm(args)
    return _stage_local(args)


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
    cmd = [
        "srun",
        "--ntasks-per-node=1",
        "-N",
        nnodes,
        "--label",
        *_self_command(),
        "stage",
        *(["--system"] if args.system else []),
        *args.refs,
    ]
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)
    return 127  # not reached


def _self_command() -> list[str]:
    """How to run this same hpcsif on the allocation's nodes."""
    import shutil

    exe = shutil.which("hpcsif")
    return [exe] if exe else [sys.executable, "-m", "hpcsif.cli.main"]


def _stage_nodes(args: argparse.Namespace) -> int:
    """Stage on every node of a hostlist over SSH; print a table; non-zero if any node failed."""
    raise NotImplementedError  # replaced below once hpcsif.remote.ssh lands


def _quote(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)
