"""Dask startup benchmark (issue 7): ``cluster.scale(jobs=2)`` until 2 workers are connected.

Starts the test Slurm cluster (tests/services/slurm.py, two nodes on this host) and, in the same
run, alternates rounds of

* **plain**: ``dask_jobqueue.SLURMCluster``, workers run by the host's Python;
* **SIF**: ``hpcsif.dask.SIFSLURMCluster``, each job runs ``hpcsif stage IMAGE`` and then the
  worker inside the image through ``hpcsif exec`` (warm cache: the image check before the
  first round converted it once);
* **SIF, squashfuse_ll**: the same with ``engine.squashfuse = "squashfuse_ll"`` (the
  multi-threaded low-level squashfuse from the same Debian package) in the jobs' config.

The image is the Dask test image (tests/dask/pyimage.py: this host's Python with
``distributed``, so both sides run the same interpreter and packages). Each round uses a fresh
cluster and waits until Slurm has ended the previous round's jobs. Goal: SIF ≤ 1.5x plain. Writes
``results/dask_startup.md``.

    python benchmarks/dask_startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import compile_package, hpcsif_cmd, median_run, write_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dask.helpers import hpcsif_wrapper, wait_until  # noqa: E402
from tests.dask.pyimage import build_archive  # noqa: E402
from tests.services.images import busybox_binary  # noqa: E402
from tests.services.slurm import SlurmCluster  # noqa: E402

GOAL = 1.5


def startup_seconds(cluster, slurm: SlurmCluster) -> float:
    """One round: scale to 2 jobs, time until 2 workers are connected, then scale to 0 and drain."""
    from dask.distributed import Client

    with Client(cluster) as client:
        start = time.monotonic()
        cluster.scale(jobs=2)
        client.wait_for_workers(2, timeout=300)
        seconds = time.monotonic() - start
        cluster.scale(0)
        wait_until(lambda: not client.scheduler_info()["workers"], 120, "the workers to leave")
    wait_until(lambda: not slurm.run(["squeue", "-h"]).stdout.strip(), 120, "the jobs to end")
    return seconds


def main() -> None:
    """Run the rounds and write the table."""
    compile_package()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="rounds per kind (median reported)")
    args = ap.parse_args()

    from dask_jobqueue import SLURMCluster

    from hpcsif.dask import SIFSLURMCluster

    work = Path(tempfile.mkdtemp(prefix="hpcsif-bench-dask-", dir="/tmp"))
    os.environ["HPCSIF_CACHEDIR"] = str(work / "cache")
    archive = build_archive(Path(tempfile.gettempdir()) / "hpcsif-dask-images", busybox_binary())
    ref = f"docker-archive://{archive}"
    hpcsif = hpcsif_wrapper(work / "bin")
    print(f"work directory (job logs in logs/): {work}", flush=True)
    common = {
        "cores": 1,
        "processes": 1,
        "memory": "1GB",
        "job_directives_skip": ["--mem"],  # the test nodes declare no memory
        "walltime": "00:10:00",
        "interface": "lo",
        "scheduler_options": {"dashboard_address": ":0"},
        "log_directory": str(work / "logs"),
        "local_directory": str(work / "dask-local"),
    }
    with SlurmCluster(base=work / "slurm", nodes=2) as slurm:
        os.environ["SLURM_CONF"] = str(slurm.conf)
        os.chdir(work)
        check_start = time.monotonic()
        SIFSLURMCluster(image=ref, hpcsif=str(hpcsif), **common).close()  # the check converts once
        check_seconds = time.monotonic() - check_start
        ll_config = work / "squashfuse_ll.toml"
        ll_config.write_text('[engine]\nsquashfuse = "squashfuse_ll"\n')
        sif = {"image": ref, "hpcsif": str(hpcsif), "check_image": False}
        # a fresh cluster per round: a reused plain SLURMCluster reuses worker names after a
        # scale-down, and distributed may then cancel a new job (see SIFClusterMixin)
        clusters = {
            "plain": lambda: SLURMCluster(python=sys.executable, **common),
            "sif": lambda: SIFSLURMCluster(**sif, **common),
            "sif_ll": lambda: SIFSLURMCluster(
                **sif, job_script_prologue=[f"export HPCSIF_CONFIG={ll_config}"], **common
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in clusters}
        for make in clusters.values():  # warm-up: page cache, first job of each node
            with make() as cluster:
                startup_seconds(cluster, slurm)
        for _ in range(args.repeat):
            for name, make in clusters.items():
                print(f"round: {name} …", end=" ", flush=True)
                with make() as cluster:
                    times[name].append(startup_seconds(cluster, slurm))
                print(f"{times[name][-1]:.2f} s", flush=True)
        stage = median_run([*hpcsif_cmd(), "stage", ref], 3)
        exec_true = median_run([*hpcsif_cmd(), "exec", ref, "true"], 3)
    shutil.rmtree(work, ignore_errors=True)  # kept after a failure: job logs in work/logs

    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: m / median["plain"] for name, m in median.items()}
    labels = {
        "plain": "plain SLURMCluster (host Python)",
        "sif": "SIFSLURMCluster (stage + hpcsif exec)",
        "sif_ll": "SIFSLURMCluster, engine.squashfuse = squashfuse_ll",
    }
    rows = [
        [labels[n], f"{median[n]:.2f}", f"{ratio[n]:.2f}x", "" if n == "plain" else f"≤ {GOAL}x"]
        for n in times
    ]
    notes = [
        f"Median of {args.repeat} rounds each, alternating, after one warm-up round each; "
        "time from `cluster.scale(jobs=2)` until `client.wait_for_workers(2)` returns.",
        "All rounds (s): "
        + "; ".join(f"{n} {', '.join(f'{t:.2f}' for t in ts)}" for n, ts in times.items())
        + ".",
        f"Per job, warm: `hpcsif stage` {stage.seconds:.2f} s, `hpcsif exec IMAGE true` "
        f"{exec_true.seconds:.2f} s. Image check before the first round (one conversion): "
        f"{check_seconds:.1f} s.",
        f"Image: tests/dask/pyimage.py ({archive.stat().st_size / 1e6:.0f} MB docker archive). "
        f"Two-node test Slurm cluster on one host, {os.cpu_count()} cores. "
        f"Goal {'met' if ratio['sif'] <= GOAL else 'NOT met'} with the default engine settings, "
        f"{'met' if ratio['sif_ll'] <= GOAL else 'NOT met'} with squashfuse_ll.",
        f"`python benchmarks/dask_startup.py --repeat {args.repeat}`, "
        f"{subprocess.run(['date', '-u', '+%F'], capture_output=True, text=True).stdout.strip()}.",
    ]
    write_table(
        "dask_startup",
        "Dask workers: scale(jobs=2) to 2 connected (seconds)",
        ["cluster", "seconds", "vs plain", "goal"],
        rows,
        notes,
    )


if __name__ == "__main__":
    main()
