"""The prolog and epilog on a real two-node cluster: staging before the job, leases, failures, pins."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcsif.slurm.policy import REQUEUE_LIMIT
from tests.conftest import run_cli
from tests.services.registry import Registry
from tests.services.slurm import ENDED
from tests.services.users import USER_PATH, TestUser
from tests.slurm.cluster_setup import HpcsifCluster, write_os_archive, write_os_layout

pytestmark = pytest.mark.slow

STEPS = """
srun -N2 --ntasks-per-node=1 hpcsif slurm record $SLURM_JOB_ID
srun -N2 --ntasks-per-node=1 hpcsif -v exec {ref} cat /etc/os-release
"""


def _journal(cluster: HpcsifCluster, node: str) -> list[dict]:
    path = cluster.syscache(node) / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _job_leases(cluster: HpcsifCluster, job: str) -> list[Path]:
    return [p for n in cluster.nodes for p in cluster.syscache(n).glob(f"leases/*/job-{job}.json")]


@pytest.mark.parametrize(("method", "version"), [("spank", 1), ("directive", 2), ("comment", 3)])
def test_each_discovery_method_stages_before_the_job(
    hpcsif_cluster: HpcsifCluster, tmp_path: Path, method: str, version: int
) -> None:
    cluster = hpcsif_cluster
    ref = write_os_archive(tmp_path / f"os{version}.tar", version)
    header, args = "#!/bin/bash\n", ["-N2"]
    if method == "directive":
        header += f"#SBATCH --job-name=directive\n#HPCSIF --image={ref}\n"
    elif method == "spank":
        args.append(f"--sif-image={ref}")
    else:
        args.append(f"--comment=hpcsif:{ref}")
    job = cluster.sbatch(header + STEPS.format(ref=ref), *args, tmp=tmp_path)
    assert cluster.wait(job) == "COMPLETED"
    out = (tmp_path / f"slurm-{job}.out").read_text()

    # every node had the image when the job's first step ran
    records = [line.split("\t") for line in out.splitlines() if line.startswith(ref + "\t")]
    assert len(records) == 2 and all(r[3] == "ok" for r in records), out
    assert {Path(r[2]).parents[2] for r in records} == {cluster.syscache(n) for n in cluster.nodes}
    assert out.count(f'VERSION_ID="6.{version}"') == 2, out
    # and nothing was converted inside the job
    assert "converting" not in out
    assert not list((tmp_path / "user-cache").glob("sif/*/*.sif"))
    for node in cluster.nodes:
        converts = [e for e in _journal(cluster, node) if e["event"] == "convert" and e["what"] == ref]
        assert len(converts) == 1, (node, converts)
        sif = next(cluster.syscache(node).glob(f"sif/*/os{version}.sif"))
        # readable by the job user, writable only by root
        for path in (sif, sif.parent, sif.parent.parent, cluster.syscache(node)):
            st = path.stat()
            assert st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
            assert st.st_mode & stat.S_IROTH, path
    # the epilog released the job's leases and dropped its records
    assert _job_leases(cluster, job) == []
    assert not any((cluster.syscache(n) / "jobs" / f"{job}.json").exists() for n in cluster.nodes)


def test_lease_is_held_while_the_job_runs(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    cluster = hpcsif_cluster
    ref = write_os_archive(tmp_path / "os4.tar", 4)
    flag = tmp_path / "go"
    script = f"#!/bin/bash\n#HPCSIF --image={ref}\necho running\nwhile [ ! -e {flag} ]; do sleep 0.2; done\n"
    job = cluster.sbatch(script, "-N2", tmp=tmp_path)
    out = tmp_path / f"slurm-{job}.out"
    for _ in range(300):
        if out.exists() and "running" in out.read_text():
            break
        time.sleep(0.2)
    leases = _job_leases(cluster, job)
    assert len(leases) == 2, leases  # one per node
    flag.touch()
    assert cluster.wait(job) == "COMPLETED"
    assert _job_leases(cluster, job) == []


def test_bad_image_fails_the_job_not_the_node(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    cluster = hpcsif_cluster
    bad = "docker-archive:///nonexistent/hpcsif-typo.tar"
    job = cluster.sbatch(
        "#!/bin/bash\nsrun -N1 true\necho after\n", "-N1", f"--sif-image={bad}", tmp=tmp_path
    )
    assert cluster.wait(job) == "COMPLETED"  # the batch script goes on; its step failed
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert f"FATAL:   the prolog of job {job} could not stage {bad}: " in out, out
    assert "no such file" in out
    assert set(cluster.node_states().values()) == {"idle"}
    assert f"hpcsif-error {bad}: " in (cluster.job_field(job, "AdminComment") or "")


def test_bad_image_error_reaches_hpcsif_exec_in_the_script(
    hpcsif_cluster: HpcsifCluster, tmp_path: Path
) -> None:
    cluster = hpcsif_cluster
    bad = "docker-archive:///nonexistent/hpcsif-typo2.tar"
    job = cluster.sbatch(f"#!/bin/bash\n#HPCSIF --image={bad}\nhpcsif exec {bad} true\n", "-N1", tmp=tmp_path)
    assert cluster.wait(job) == "FAILED"
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert f"could not stage {bad}" in out, out
    assert set(cluster.node_states().values()) == {"idle"}


@contextlib.contextmanager
def failure_policy(cluster: HpcsifCluster, tmp_path: Path, policy: str) -> Iterator[None]:
    """The hooks run with ``slurm.failure_policy = POLICY`` for the ``with`` block."""
    env_file = cluster.base / "hooks" / "hpcsif.env"
    saved = env_file.read_text()
    config = tmp_path / f"{policy}.toml"
    config.write_text(f'[slurm]\nfailure_policy = "{policy}"\n')
    config.chmod(0o644)
    env_file.write_text(saved + f"HPCSIF_CONFIG={config}\n")
    try:
        yield
    finally:
        env_file.write_text(saved)


def test_hold_policy_requeues_and_holds(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    cluster = hpcsif_cluster
    with failure_policy(cluster, tmp_path, "hold"):
        archive = tmp_path / "hpcsif-hold.tar"  # not there yet: a typo the user fixes below
        bad = f"docker-archive://{archive}"
        job = cluster.sbatch("#!/bin/bash\ntrue\n", "-N1", f"--comment=hpcsif:{bad}", tmp=tmp_path)
        for _ in range(200):
            if (
                cluster.job_field(job, "Restarts") not in (None, "0")
                and cluster.job_field(job, "JobState") == "PENDING"
            ):
                break
            time.sleep(0.3)
        assert cluster.job_field(job, "JobState") == "PENDING"
        assert "held" in (cluster.job_field(job, "Reason") or "").lower(), cluster.job_field(job, "Reason")
        assert set(cluster.node_states().values()) == {"idle"}
        assert f"hpcsif-error {bad}: " in (cluster.job_field(job, "AdminComment") or "")
        # fixed and released (StartTime=now: Slurm keeps a requeued job waiting for 2 minutes),
        # the job runs, and its comment no longer shows the first run's error
        write_os_archive(archive, 13)
        cluster.run("scontrol", "release", job)
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        assert cluster.wait(job) == "COMPLETED"
        assert "hpcsif-error" not in (cluster.job_field(job, "AdminComment") or "")


def test_requeue_policy_holds_after_the_limit(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    """A lasting error under ``requeue``: requeued REQUEUE_LIMIT times, then held (not for ever)."""
    cluster = hpcsif_cluster
    with failure_policy(cluster, tmp_path, "requeue"):
        bad = "docker-archive:///nonexistent/hpcsif-requeue.tar"
        job = cluster.sbatch("#!/bin/bash\ntrue\n", "-N1", f"--comment=hpcsif:{bad}", tmp=tmp_path)
        deadline = time.monotonic() + 120
        while "held" not in (reason := (cluster.job_field(job, "Reason") or "").lower()):
            state = cluster.job_field(job, "JobState")
            assert time.monotonic() < deadline and state not in ENDED, (
                f"{state} {reason}\n{cluster.slurm.logs_tail(40)}"
            )
            if reason == "begintime":  # Slurm's 2-minute requeue delay, skipped
                cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            time.sleep(0.3)
        assert cluster.job_field(job, "Restarts") == str(REQUEUE_LIMIT + 1)
        assert f"hpcsif-error {bad} (restart {REQUEUE_LIMIT}): " in (
            cluster.job_field(job, "AdminComment") or ""
        )
        cluster.run("scancel", job)
        cluster.slurm.wait_nodes(("idle",))


def test_one_digest_per_job_while_the_tag_moves(
    hpcsif_cluster: HpcsifCluster, registry_open: Registry, tmp_path: Path
) -> None:
    cluster = hpcsif_cluster
    registry_open.pushed.pop("hpcsif-slurm/app:t", None)
    d1 = registry_open.push(write_os_layout(tmp_path / "v1", 11), "hpcsif-slurm/app:t")
    ref = registry_open.ref("hpcsif-slurm/app:t")
    # pinned at submit by the plugin (resolve_at_submit) ...
    job1 = cluster.sbatch(
        "#!/bin/bash\nsrun -N2 --ntasks-per-node=1 cat /etc/os-release\n",
        "-N2",
        "--hold",
        f"--sif-image={ref}",
        tmp=tmp_path,
    )
    # ... and by the first prolog, recorded in the admin comment
    script2 = f"#!/bin/bash\n#HPCSIF --image={ref}\n" + STEPS.format(ref=ref)
    registry_open.pushed.pop("hpcsif-slurm/app:t")
    d2 = registry_open.push(write_os_layout(tmp_path / "v2", 12), "hpcsif-slurm/app:t")
    assert d1 != d2
    job2 = cluster.sbatch(script2, "-N2", tmp=tmp_path)
    cluster.run("scontrol", "release", job1)
    assert cluster.wait(job1) == "COMPLETED"
    out1 = (tmp_path / f"slurm-{job1}.out").read_text()
    assert out1.count('VERSION_ID="6.11"') == 2, out1  # the image the tag named at submission
    assert cluster.wait(job2) == "COMPLETED"
    out2 = (tmp_path / f"slurm-{job2}.out").read_text()
    pins = {line.split("\t")[1] for line in out2.splitlines() if line.startswith(ref + "\t")}
    assert pins == {f"{ref}@{d2}"}, out2  # both nodes staged the same digest
    assert out2.count('VERSION_ID="6.12"') == 2, out2
    assert f"hpcsif-pin {ref} {d2}" in (cluster.job_field(job2, "AdminComment") or "")
    # the batch host resolved the tag; the other node waited for its pin instead of resolving
    log = cluster.log.read_text()
    assert log.count(f"job {job2}: resolved {ref} to {d2}") == 1, log
    assert log.count(f"job {job2}: {ref} is pinned to {d2} for this job") == 1, log


def test_a_hanging_registry_is_bounded_twice(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    """hpcsif's own deadline records a timeout; the hook's hard limit kills a stuck hpcsif; both exit 0."""
    cluster = hpcsif_cluster
    with socket.socket() as blackhole:  # accepts connections (kernel backlog), never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        ref = f"docker://127.0.0.1:{blackhole.getsockname()[1]}/hang/app:1"
        fast = write_os_archive(tmp_path / "os17.tar", 17)  # staged before the hanging one
        job = cluster.sbatch("#!/bin/bash\ntrue\n", "-N1", "--hold", f"--comment=hpcsif:{ref}", tmp=tmp_path)
        env = {
            **cluster.slurm.env,
            "SLURM_JOB_ID": job,
            "SPANK_HPCSIF_IMAGE": fast,
            "HPCSIF_SYSTEM_CACHEDIR": str(tmp_path / "system"),
        }
        started = time.monotonic()
        proc = run_cli("slurm", "prolog", "--timeout", "3", env=env)
        assert time.monotonic() - started < 20
        assert f"{ref} (0.00 s): FAILED: staging timed out after 3 s" in proc.stdout, proc.stdout
        assert f"{fast} (" in proc.stdout and "): staged " in proc.stdout, proc.stdout
        assert f"hpcsif-error {ref}: staging timed out" in (cluster.job_field(job, "AdminComment") or "")

        hooks = tmp_path / "hooks"
        shutil.copytree(cluster.base / "hooks", hooks)
        env_file = hooks / "hpcsif.env"
        env_file.write_text(
            env_file.read_text().replace("HPCSIF_PROLOG_TIMEOUT=100", "HPCSIF_PROLOG_TIMEOUT=2")
        )
        started = time.monotonic()
        hook = subprocess.run([str(hooks / "prolog")], env=env, capture_output=True, text=True, timeout=60)
        assert hook.returncode == 0
        assert time.monotonic() - started < 20
        assert f"hpcsif prolog for job {job}: killed after 2s" in cluster.log.read_text()
        cluster.run("scancel", job)
    cluster.slurm.wait_nodes(("idle",))


def test_an_unprivileged_job_reads_the_system_cache_but_cannot_change_it(
    hpcsif_cluster: HpcsifCluster, unpriv_user: TestUser
) -> None:
    cluster = hpcsif_cluster
    work = Path(tempfile.mkdtemp(prefix="hpcsif-userjob-", dir="/tmp"))
    try:
        os.chown(work, unpriv_user.uid, unpriv_user.gid)
        work.chmod(0o755)
        ref = write_os_archive(work / "os14.tar", 14)
        script = work / "job.sh"
        script.write_text(
            f"#!/bin/sh\n#HPCSIF --image={ref}\n"
            f"hpcsif exec {ref} cat /etc/os-release\n"
            'path=$(hpcsif slurm record "$SLURM_JOB_ID" | cut -f3)\n'
            'test -r "$path" && echo readable\n'
            '(echo x >> "$path") 2>/dev/null && echo WRITABLE || echo not-writable\n'
            'rm -f "$path" 2>/dev/null; test -e "$path" && echo still-there\n'
            "id -un\n"
        )
        env = {
            "SLURM_CONF": str(cluster.slurm.conf),
            "PATH": f"{cluster.user_bin}:{USER_PATH}",
            "HPCSIF_CACHEDIR": str(work / "cache"),
        }
        submit = unpriv_user.run(
            ["sbatch", "--parsable", "-N1", f"--output={work}/out-%j", str(script)], env=env, cwd=work
        )
        assert submit.returncode == 0, submit.stderr
        job = submit.stdout.strip()
        assert cluster.wait(job) == "COMPLETED", (work / f"out-{job}").read_text()
        out = (work / f"out-{job}").read_text()
        assert 'VERSION_ID="6.14"' in out and "readable" in out, out
        assert "not-writable" in out and "still-there" in out and "WRITABLE" not in out
        assert out.strip().endswith(unpriv_user.name)
        assert not list((work / "cache").glob("sif/*/*.sif"))  # the user converted nothing
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_relative_paths_name_files_in_the_jobs_directory(
    hpcsif_cluster: HpcsifCluster, tmp_path: Path
) -> None:
    cluster = hpcsif_cluster
    write_os_archive(tmp_path / "os15.tar", 15)
    job = cluster.sbatch(
        "#!/bin/sh\nsrun cat /etc/os-release\n", "-N1", "--sif-image=docker-archive:os15.tar", tmp=tmp_path
    )
    assert cluster.wait(job) == "COMPLETED"
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert 'VERSION_ID="6.15"' in out, out
    assert any(
        list(cluster.syscache(n).glob("sif/*/os15.sif")) for n in cluster.nodes
    )  # the prolog staged it


def test_a_user_cannot_stage_what_they_cannot_read(
    hpcsif_cluster: HpcsifCluster, unpriv_user: TestUser
) -> None:
    """The prolog reads as root, and the system cache is readable by all: a root-only archive
    named by a user's job is refused, not published."""
    cluster = hpcsif_cluster
    private = Path(tempfile.mkdtemp(prefix="hpcsif-private-", dir="/tmp"))  # root's, 0700
    work = Path(tempfile.mkdtemp(prefix="hpcsif-userjob-", dir="/tmp"))
    try:
        os.chown(work, unpriv_user.uid, unpriv_user.gid)
        work.chmod(0o755)
        ref = write_os_archive(private / "secret16.tar", 16)
        env = {"SLURM_CONF": str(cluster.slurm.conf), "PATH": f"{cluster.user_bin}:{USER_PATH}"}
        submit = unpriv_user.run(
            ["sbatch", "--parsable", "-N1", f"--comment=hpcsif:{ref}", f"--output={work}/out", "--wrap=true"],
            env=env,
            cwd=work,
        )
        assert submit.returncode == 0, submit.stderr
        job = submit.stdout.strip()
        cluster.wait(job)
        comment = cluster.job_field(job, "AdminComment") or ""
        assert f"{private}/secret16.tar: not readable by the job's user {unpriv_user.name}" in comment, (
            comment
        )
        assert not any(list(cluster.syscache(n).glob("sif/*/secret16.sif")) for n in cluster.nodes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def test_epilog_evicts_by_quota_but_never_a_leased_image(
    hpcsif_cluster: HpcsifCluster, tmp_path: Path
) -> None:
    cluster = hpcsif_cluster
    kept, evicted = write_os_archive(tmp_path / "os15.tar", 15), write_os_archive(tmp_path / "os16.tar", 16)
    flag, running = tmp_path / "go", tmp_path / "running"
    holder = cluster.sbatch(
        f"#!/bin/bash\n#HPCSIF --image={kept}\ntouch {running}\nwhile [ ! -e {flag} ]; do sleep 0.2; done\n",
        "-N2",
        tmp=tmp_path,
    )
    env_file = cluster.base / "hooks" / "hpcsif.env"
    saved = env_file.read_text()
    try:
        for _ in range(300):
            if running.exists():
                break
            time.sleep(0.2)
        assert running.exists(), cluster.job_field(holder, "JobState")
        env_file.write_text(saved + "HPCSIF_CACHE_QUOTA=1\n")  # the next epilog keeps only leased images
        job = cluster.sbatch(f"#!/bin/bash\n#HPCSIF --image={evicted}\ntrue\n", "-N1", tmp=tmp_path)
        assert cluster.slurm.wait_job(job) == "COMPLETED"
        node = cluster.job_field(job, "NodeList")
        cache = cluster.syscache(node)
        assert not list(cache.glob("sif/*/os16.sif"))
        assert list(cache.glob("sif/*/os15.sif")), "a leased image was evicted"
        assert any(e["event"] == "evict" for e in _journal(cluster, node))
    finally:
        env_file.write_text(saved)
        flag.touch()
    assert cluster.wait(holder) == "COMPLETED"


def test_the_comment_slurmd_passes_needs_no_query(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    """slurmd gives the prolog the job's comment (SLURM_JOB_COMMENT): no slurmctld query per node.

    The job id is one slurmctld does not know, so a query for the comment would find nothing.
    """
    cluster = hpcsif_cluster
    ref = write_os_archive(tmp_path / "os21.tar", 21)
    env = {
        **cluster.slurm.env,
        "SLURM_JOB_ID": "987654",
        "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
        "SLURM_JOB_COMMENT": f"stage hpcsif:{ref} please",
        "HPCSIF_SYSTEM_CACHEDIR": str(tmp_path / "system"),
    }
    proc = run_cli("slurm", "prolog", env=env)
    assert f"{ref} (" in proc.stdout and "): staged " in proc.stdout, proc.stdout + proc.stderr
    assert list((tmp_path / "system").glob("leases/*/job-987654.json"))
    # without it (an older Slurm, a job without a comment) the comment is asked for
    del env["SLURM_JOB_COMMENT"]
    proc = run_cli("slurm", "prolog", env=env)
    assert "cannot read the job's comment" in proc.stderr and "staged" not in proc.stdout, proc.stderr
