"""``hpcsif slurm prolog|epilog|record``: the node side of the Slurm integration.

``prolog`` and ``epilog`` are what slurm/prolog and slurm/epilog run as root; they read
``SLURM_JOB_ID``, ``SLURM_JOB_USER``, ``SLURM_JOB_UID`` and the SPANK plugin's ``SPANK_HPCSIF_*``
variables from the environment slurmd gives them, and print one line per image (to the log).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``slurm`` command group."""
    parser = subparsers.add_parser("slurm", help="Slurm prolog/epilog hooks (run by slurmd as root)")
    sub = parser.add_subparsers(dest="slurm_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("prolog", help="stage the job's images into the system cache and lease them")
    p.add_argument(
        "--timeout", type=float, help="staging deadline in seconds (default: slurm.prolog_timeout)"
    )
    p.set_defaults(func=cmd_prolog)

    p = sub.add_parser("epilog", help="release the job's leases and evict by the cache quota")
    p.set_defaults(func=cmd_epilog)

    p = sub.add_parser("resolve", help="print the digest a registry tag names now (empty for other refs)")
    p.add_argument("ref", help="image reference")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("task-exec", help="run a task in its container (what the SPANK plugin's tasks run)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the task's arguments")
    p.set_defaults(func=cmd_task_exec)

    p = sub.add_parser("record", help="show what the prolog staged for a job on this node")
    p.add_argument("job_id", nargs="?", help="job id (default: $SLURM_JOB_ID)")
    p.set_defaults(func=cmd_record)


def cmd_prolog(args: argparse.Namespace) -> int:
    """Run the prolog; exits 0 even when staging failed (the failure policy handles that)."""
    from hpcsif.slurm.client import get_client
    from hpcsif.slurm.prolog import JobContext, run_prolog

    ctx = JobContext.from_env()
    report = run_prolog(ctx, get_client(), timeout=args.timeout)
    for o in report.outcomes:
        state = f"staged {o.path}" if o.ok else f"FAILED: {o.error}"
        print(f"job {ctx.job_id}: {o.ref} ({o.seconds:.2f} s): {state}", flush=True)
    if not report.requests:
        print(f"job {ctx.job_id}: no images requested", flush=True)
    return 0


def cmd_epilog(args: argparse.Namespace) -> int:
    """Run the epilog."""
    from hpcsif.slurm.prolog import JobContext, run_epilog

    ctx = JobContext.from_env()
    report = run_epilog(ctx)
    print(
        f"job {ctx.job_id}: released {len(report.released)} lease(s), evicted {report.evicted} image(s)",
        flush=True,
    )
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    """What the SPANK plugin's resolve_at_submit calls: one line, the digest (or empty)."""
    from hpcsif.refs import parse
    from hpcsif.slurm.prolog import resolve_digest

    ref = parse(args.ref)
    print(resolve_digest(args.ref) if ref.is_registry and not ref.digest else (ref.digest or ""))
    return 0


def cmd_task_exec(args: argparse.Namespace) -> int:
    """``hpcsif exec`` the task described by the SPANK plugin's ``HPCSIF_TASK_*`` variables."""
    import os

    from hpcsif.cli.main import main
    from hpcsif.errors import UsageError
    from hpcsif.slurm.jobrecord import job_image

    task = {k: os.environ.pop(f"HPCSIF_TASK_{k}", "") for k in ("IMAGE", "ARGV0", "MOUNTS", "NV", "MPI")}
    if not task["IMAGE"] or not task["ARGV0"]:
        raise UsageError("HPCSIF_TASK_IMAGE and HPCSIF_TASK_ARGV0 are unset: only spank_hpcsif runs this")
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    flags = (["-B", task["MOUNTS"]] if task["MOUNTS"] else []) + (["--nv"] if task["NV"] else [])
    flags += ["--mpi", task["MPI"]] if task["MPI"] else []
    return main(["exec", *flags, job_image(task["IMAGE"]), task["ARGV0"], *rest])


def cmd_record(args: argparse.Namespace) -> int:
    """Print this node's record of a job: one line per requested image."""
    import os

    from hpcsif.errors import UsageError
    from hpcsif.slurm.prolog import job_record

    job_id = args.job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise UsageError("no job id given and SLURM_JOB_ID is not set")
    record = job_record(job_id)
    if record is None:
        print(f"job {job_id}: no record on this node")
        return 1
    for o in record.images.values():
        print(f"{o.ref}\t{o.pinned or '-'}\t{o.path or '-'}\t{o.error or 'ok'}")
    return 0
