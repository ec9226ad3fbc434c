"""Dask workers inside a container image on Slurm, with hpcsif and dask-jobqueue.

Run it on a Slurm login node where ``hpcsif`` is installed on the compute nodes too::

    python examples/dask_sif.py docker://ghcr.io/dask/dask:2026.8.0 --jobs 2 --partition debug

The image needs a Python with ``distributed`` at the client's release; the cluster checks that
before it submits anything (``hpcsif exec IMAGE python3 …`` here, through the local cache) and
stops with one clear error otherwise. Each job stages the image on its node (``hpcsif stage``;
the hpcsif Slurm prolog does it before the job starts when the site runs it) and starts the
worker through ``hpcsif exec``.
"""

from __future__ import annotations

import argparse
import platform


def where_am_i() -> dict[str, str]:
    """Runs on a worker: what the container looks like from inside."""
    info = {"host": platform.node(), "python": platform.python_version()}
    try:
        with open("/etc/os-release") as f:
            info["os"] = next(
                (line.split("=", 1)[1].strip().strip('"') for line in f if line.startswith("PRETTY_NAME=")),
                "?",
            )
    except OSError:
        info["os"] = "no /etc/os-release in the image"
    return info


def main() -> None:
    """Start the cluster, run a few tasks, scale down."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image", help="image reference (docker://…, oras://…, a .sif path …)")
    ap.add_argument("--jobs", type=int, default=2, help="Slurm jobs (one worker each)")
    ap.add_argument("--partition", help="Slurm partition")
    ap.add_argument("--bind", action="append", default=[], help="SRC[:DST] to bind (repeatable)")
    ap.add_argument("--nv", action="store_true", help="NVIDIA GPUs inside the workers")
    ap.add_argument("--interface", help="network interface of scheduler and workers (e.g. ib0)")
    ap.add_argument(
        "--no-slurm-mem", action="store_true", help="no --mem request (for nodes that declare no memory)"
    )
    args = ap.parse_args()

    from dask.distributed import Client

    from hpcsif.dask import SIFSLURMCluster

    with SIFSLURMCluster(
        image=args.image,
        binds=args.bind,
        nv=args.nv,
        cores=1,
        memory="2GB",
        walltime="00:15:00",
        queue=args.partition,
        interface=args.interface,
        job_directives_skip=["--mem"] if args.no_slurm_mem else [],
    ) as cluster:
        print(cluster.job_script())
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            client.wait_for_workers(args.jobs, timeout=600)
            for worker, info in sorted(client.run(where_am_i).items()):
                print(f"{worker}: {info}")
            total = client.submit(sum, client.map(lambda x: x * x, range(100))).result()
            print("sum of squares below 100:", total)
        cluster.scale(0)


if __name__ == "__main__":
    main()
