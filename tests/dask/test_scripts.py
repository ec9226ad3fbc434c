"""Job scripts of the SIF clusters for every batch system: rendered, parsed and run by a shell."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("dask_jobqueue")

from distributed.security import Security

from hpcsif import dask as sifdask
from hpcsif.slurm.requests import from_batch_script

IMAGE = "docker://team/analysis:2.0"
SCHEDULER = "tcp://10.1.2.3:8786"
SHELL_SCRIPTS = ("SLURM", "PBS", "Moab", "SGE", "LSF", "OAR")
EXTRA = {"HTCondor": {"disk": "1GB"}, "OAR": {"memory_per_core_property_name": "memcore"}}
WRAPPER = f'hpcsif exec ${{TMPDIR:+-B "$TMPDIR"}} {IMAGE} python3 -m distributed.cli.dask_worker'


def job(kind: str, **kw):
    """The job object a ``SIF<kind>Cluster`` submits (no scheduler, no image check)."""
    cls = getattr(sifdask, f"SIF{kind}Cluster").job_cls
    kw = {"image": IMAGE, "cores": 2, "memory": "2GB", **EXTRA.get(kind, {}), **kw}
    return cls(SCHEDULER, name="w-0", **kw)


def recorder(path: Path) -> str:
    """A stand-in ``hpcsif`` that prints each argument it gets, one per line, as ``[arg]``."""
    path.write_text('#!/bin/sh\nprintf "[%s]\\n" "$@"\necho END\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("kind", [*SHELL_SCRIPTS, "HTCondor"])
def test_script_stages_then_runs_the_worker_in_the_image(kind: str) -> None:
    script = job(kind).job_script()
    if kind == "HTCondor":  # the commands are one quoted Arguments value there ("" is a quote)
        script = script.replace('""', '"')
    stage = script.index(f"hpcsif stage {IMAGE}")
    worker = script.index(WRAPPER)
    assert stage < worker and f"{SCHEDULER} --name w-0" in script[worker:]
    assert ("#HPCSIF" in script) == (kind == "SLURM")


@pytest.mark.parametrize("kind", SHELL_SCRIPTS)
def test_script_is_valid_shell(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(job(kind, binds=["/a b", "$SCRATCH/x:/data"], local_directory="$TMPDIR/w").job_script())
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_slurm_directive_is_what_the_prolog_reads() -> None:
    script = job("SLURM", nv=True, mpi="openmpi", job_extra_directives=["--exclusive"]).job_script()
    (request,) = from_batch_script(script)
    assert (request.ref, request.nv, request.mpi, request.source) == (IMAGE, True, "openmpi", "directive")
    assert "#SBATCH --exclusive" in script
    header = script.split("hpcsif stage")[0]
    assert "#HPCSIF --image=docker://team/analysis:2.0 --nv --mpi openmpi" in header


@pytest.mark.parametrize("kind", SHELL_SCRIPTS)
def test_running_the_script_passes_binds_and_flags(kind: str, tmp_path: Path) -> None:
    """The shell expands the script as a batch system would; ``$VARS`` reach hpcsif expanded."""
    hpcsif = recorder(tmp_path / "hpcsif")
    scratch, tmpdir = tmp_path / "scratch", tmp_path / "node tmp"
    tmpdir.mkdir()
    path = tmp_path / "job.sh"
    path.write_text(
        job(
            kind,
            hpcsif=hpcsif,
            binds=["/a b", "$SCRATCH/x:/data:ro"],
            local_directory="$TMPDIR/dask",
            nv=True,
            mpi="openmpi",
            exec_args=["--cleanenv"],
            python="/opt/py/bin/python3",
        ).job_script()
    )
    env = {"PATH": os.environ["PATH"], "SCRATCH": str(scratch), "TMPDIR": str(tmpdir)}
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, check=True).stdout
    stage, exec_, _ = out.split("END\n")
    assert stage.split() == ["[stage]", f"[{IMAGE}]"]
    args = [line[1:-1] for line in exec_.splitlines()]
    assert args[: args.index(IMAGE) + 2] == [
        "exec",
        "-B", f"{tmpdir}/dask",
        "-B", "/a b",
        "-B", f"{scratch}/x:/data:ro",
        "-B", str(tmpdir),
        "--nv", "--mpi", "openmpi", "--cleanenv",
        IMAGE, "/opt/py/bin/python3",
    ]  # fmt: skip
    assert args[args.index(IMAGE) + 2 :][:3] == ["-m", "distributed.cli.dask_worker", SCHEDULER]
    assert (tmpdir / "dask").is_dir()  # made before the bind needs it


def test_no_tmpdir_no_bind(tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(job("PBS", hpcsif=recorder(tmp_path / "hpcsif")).job_script())
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.split("END\n")[1].splitlines()[:3] == ["[exec]", f"[{IMAGE}]", "[python3]"]


def test_stage_false_and_user_prologue() -> None:
    script = job("SLURM", stage=False, job_script_prologue=["module load x"]).job_script()
    assert "hpcsif stage" not in script and "#HPCSIF" not in script
    assert script.index("module load x") < script.index("hpcsif exec")
    script = job("SLURM", job_script_prologue=["module load x"]).job_script()
    assert script.index("hpcsif stage") < script.index("module load x") < script.index("hpcsif exec")
    with pytest.raises(ValueError, match="job_script_prologue"):
        job("SLURM", env_extra=["x"])


def test_tls_file_directories_are_bound(tmp_path: Path) -> None:
    files = {n: tmp_path / "certs" / f"{n}.pem" for n in ("ca", "cert", "key")}
    security = Security(
        tls_ca_file=str(files["ca"]), tls_worker_cert=str(files["cert"]), tls_worker_key=str(files["key"])
    )
    script = job("SLURM", security=security, protocol="tls://").job_script()
    assert f"-B {tmp_path}/certs " in script and f"--tls-ca-file {files['ca']}" in script


def test_cluster_job_script_and_image_required() -> None:
    with sifdask.SIFSLURMCluster(
        image=IMAGE, check_image=False, cores=1, memory="1GB", scheduler_options={"dashboard_address": None}
    ) as cluster:
        assert f"hpcsif stage {IMAGE}" in cluster.job_script()
        assert type(cluster).__name__ == "SIFSLURMCluster" and cluster.job_cls.__name__ == "SIFSLURMJob"
    with pytest.raises(TypeError, match="needs image="):
        sifdask.SIFPBSCluster(cores=1, memory="1GB")


@pytest.mark.slow
def test_pbs_sge_lsf_scripts_start_workers_in_the_image(dask_image, tmp_path: Path) -> None:
    """Each script, run by bash as the batch system would run it, starts a worker inside the image."""
    import signal

    from distributed import Client, LocalCluster

    from tests.dask.helpers import hpcsif_wrapper, wait_until
    from tests.dask.pyimage import MARKER, MARKER_TEXT

    ref, hpcsif = dask_image("dask"), str(hpcsif_wrapper(tmp_path / "bin"))
    cache = Path(os.environ["HPCSIF_CACHEDIR"])
    procs = []
    with (
        LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=None) as local,
        Client(local) as client,
    ):
        try:
            # LSF's job runs two worker processes under a nanny, all inside the one container
            for kind, cores in (("PBS", 1), ("SGE", 1), ("LSF", 2)):
                cls = getattr(sifdask, f"SIF{kind}Cluster").job_cls
                w = cls(local.scheduler_address, name=kind, image=ref, hpcsif=hpcsif, cores=cores,
                        processes=cores, memory="1GB")  # fmt: skip
                path = tmp_path / f"{kind}.sh"
                path.write_text(w.job_script())
                log = open(tmp_path / f"{kind}.log", "w")  # noqa: SIM115 (closed with the process)
                procs.append((subprocess.Popen(["bash", str(path)], stdout=log, stderr=log, cwd=tmp_path,
                                               start_new_session=True), log))  # fmt: skip
            client.wait_for_workers(4, timeout=120)

            def marker(path: str = MARKER) -> str:
                with open(path) as f:
                    return f.read()

            by_name = {i["name"]: a for a, i in client.scheduler_info()["workers"].items()}
            assert sorted(by_name) == ["LSF-0", "LSF-1", "PBS", "SGE"]
            assert set(client.run(marker).values()) == {MARKER_TEXT.decode()}
            assert len(list((cache / "leases").glob("**/*.json"))) == 3  # one per hpcsif exec
        finally:
            for proc, log in procs:  # as a batch system cancels a job: SIGTERM to the job's processes
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
                log.close()
    # bash ends at once; each hpcsif exec drops its lease once its worker has shut down
    wait_until(lambda: not list((cache / "leases").glob("**/*.json")), 60, "the leases to be released")


@pytest.mark.parametrize(("local", "bound"), [("~/dask space", "HOME/dask space"), ("rel/dir", None)])
def test_local_directory_forms(local: str, bound: str | None, tmp_path: Path) -> None:
    """``~/`` expands like dask-jobqueue's own unquoted argument; a relative one is under the bound cwd."""
    path = tmp_path / "job.sh"
    path.write_text(job("SGE", hpcsif=recorder(tmp_path / "hpcsif"), local_directory=local).job_script())
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env, cwd=tmp_path).stdout
    args = [line[1:-1] for line in out.split("END\n")[1].splitlines()]
    if bound is None:
        assert args[:2] == ["exec", IMAGE]
    else:
        assert args[:3] == ["exec", "-B", bound.replace("HOME", str(tmp_path))]
        assert (tmp_path / "dask space").is_dir()


def test_worker_names_are_not_reused_after_scale_down() -> None:
    """A name reused too soon gets its new job cancelled by distributed's lost-worker timer."""
    with sifdask.SIFPBSCluster(
        image=IMAGE, check_image=False, cores=1, memory="1GB", scheduler_options={"dashboard_address": ":0"}
    ) as cluster:
        names = []
        for _ in range(3):  # what scale(1) then scale(0) does to the spec, without submitting
            spec = cluster.new_worker_spec()
            cluster.worker_spec.update(spec)
            names += list(spec)
            cluster.worker_spec.clear()
        assert len(set(names)) == 3, names
