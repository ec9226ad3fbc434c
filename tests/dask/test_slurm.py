"""SIFSLURMCluster on the real Slurm test cluster: workers inside the image, then a clean scale-down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dask.helpers import hpcsif_wrapper, wait_until
from tests.dask.pyimage import MARKER, MARKER_TEXT
from tests.services.slurm import SlurmCluster
from tests.slurm.cluster_setup import HpcsifCluster

pytestmark = pytest.mark.slow


def _leases(cache: Path) -> list[Path]:
    return sorted((cache / "leases").glob("**/*.json"))


def test_workers_run_inside_the_image(
    slurm_cluster: SlurmCluster,
    dask_image: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dask.distributed import Client

    from hpcsif.dask import SIFSLURMCluster

    def read_marker(path: str = MARKER) -> dict[str, str]:
        # defined here so cloudpickle ships it by value: the image has no tests package
        import os

        with open(path) as f:
            return {"marker": f.read(), "prefix": sys.prefix, "job": os.environ.get("SLURM_JOB_ID", "")}

    ref = dask_image("dask")
    cache = Path(os.environ["HPCSIF_CACHEDIR"])
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))  # dask-jobqueue runs sbatch/scancel
    monkeypatch.chdir(tmp_path)
    hpcsif = hpcsif_wrapper(tmp_path / "bin")
    with SIFSLURMCluster(
        image=ref,
        hpcsif=str(hpcsif),
        cores=1,
        processes=1,
        memory="1GB",
        job_directives_skip=["--mem"],  # the test nodes declare no memory
        walltime="00:10:00",
        interface="lo",
        local_directory=str(tmp_path / "dask-local"),
        log_directory=str(tmp_path / "logs"),
        scheduler_options={"dashboard_address": None},
        death_timeout=60,
    ) as cluster:
        script = cluster.job_script()
        assert f"{hpcsif} stage {ref}" in script and f"#HPCSIF --image={ref}" in script
        cluster.scale(jobs=2)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=180)
            jobs = sorted(job.job_id for job in cluster.workers.values())
            assert len(jobs) == 2
            seen = client.run(read_marker)
            assert len(seen) == 2
            for info in seen.values():
                assert info["marker"] == MARKER_TEXT.decode() and info["prefix"] == "/usr/local"
            assert sorted(info["job"] for info in seen.values()) == jobs
            # tasks too, not only client.run: a function shipped by value, run in the image
            futures = [client.submit(read_marker, pure=False, workers=[w]) for w in seen]
            assert {f.result()["marker"] for f in futures} == {MARKER_TEXT.decode()}
            assert len(_leases(cache)) == 2  # each running worker holds a lease on the image
            cluster.scale(0)
            wait_until(lambda: not client.scheduler_info()["workers"], 120, "the workers to leave")
    for job in jobs:
        assert slurm_cluster.wait_job(job, timeout=120) in ("CANCELLED", "COMPLETED")
    queued = slurm_cluster.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)], check=False).stdout
    assert queued.split() == []
    wait_until(lambda: not _leases(cache), 60, "the workers' leases to be released")
    for job in jobs:  # the staging step ran first in each job (a cache hit: printed REF and path)
        assert f"{ref}\t{cache}/sif/" in (tmp_path / "logs" / f"dask-worker-{job}.out").read_text()
    events = [json.loads(line) for line in (cache / "journal.jsonl").read_text().splitlines()]
    assert sum(1 for e in events if e["event"] == "convert" and e["what"] == ref) == 1


def test_example_script(
    slurm_cluster: SlurmCluster, dask_image: Callable[[str], str], tmp_path: Path
) -> None:
    """examples/dask_sif.py against the test cluster: the workers see the image's (missing) os-release."""
    example = Path(__file__).resolve().parents[2] / "examples" / "dask_sif.py"
    bindir = hpcsif_wrapper(tmp_path / "bin").parent
    env = {
        **slurm_cluster.env,
        "PATH": f"{bindir}:{os.environ['PATH']}",  # the jobs' `hpcsif`
        "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(tmp_path / "logs"),
    }
    args = ["--jobs", "2", "--interface", "lo", "--no-slurm-mem"]
    proc = subprocess.run(
        [sys.executable, str(example), dask_image("dask"), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    workers = [line for line in proc.stdout.splitlines() if line.startswith("tcp://")]
    assert len(workers) == 2 and all("no /etc/os-release in the image" in w for w in workers), proc.stdout
    assert "sum of squares below 100: 328350" in proc.stdout


def test_prolog_stages_the_image_from_the_directive(
    hpcsif_cluster: HpcsifCluster,
    dask_image: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With hpcsif's prolog installed, ``#HPCSIF --image=`` stages the image on each node first."""
    from dask.distributed import Client

    from hpcsif.dask import SIFSLURMCluster

    cluster, ref = hpcsif_cluster, dask_image("dask")
    monkeypatch.setenv("SLURM_CONF", str(cluster.slurm.conf))
    monkeypatch.chdir(tmp_path)
    with SIFSLURMCluster(
        image=ref,  # checked here, through the session's cache
        hpcsif=str(cluster.hpcsif_node),  # per-node system caches, as on separate machines
        cores=1,
        processes=1,
        memory="1GB",
        job_directives_skip=["--mem"],
        job_extra_directives=["--exclusive"],  # one job per node
        interface="lo",
        log_directory=str(tmp_path / "logs"),
        scheduler_options={"dashboard_address": ":0"},
    ) as dask_cluster:
        # the jobs get an empty user cache: whatever they run must come from the prolog's staging
        monkeypatch.setenv("HPCSIF_CACHEDIR", str(tmp_path / "user-cache"))
        dask_cluster.scale(jobs=2)
        with Client(dask_cluster) as client:
            client.wait_for_workers(2, timeout=180)
            jobs = sorted(job.job_id for job in dask_cluster.workers.values())
            assert set(client.run(lambda: Path(MARKER).read_text()).values()) == {MARKER_TEXT.decode()}
            nodes = {cluster.job_field(j, "NodeList") for j in jobs}
            assert nodes == set(cluster.nodes)
            for node in cluster.nodes:  # staged by the prolog, leased for the job, used by the worker
                assert len(list(cluster.syscache(node).glob("sif/*/dask-*.sif"))) == 1, node
                assert len(list(cluster.syscache(node).glob("leases/*/job-*.json"))) == 1, node
            dask_cluster.scale(0)
            wait_until(lambda: not client.scheduler_info()["workers"], 120, "the workers to leave")
    for job in jobs:
        assert cluster.wait(job) in ("CANCELLED", "COMPLETED")
    assert not list((tmp_path / "user-cache").glob("sif/*/*.sif"))  # nothing converted in a job
    for node in cluster.nodes:  # the epilog and the workers' exits released every lease
        wait_until(lambda n=node: not list(cluster.syscache(n).glob("leases/*/*.json")), 60, f"{node} leases")
