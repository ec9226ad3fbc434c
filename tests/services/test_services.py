"""Smoke tests: each real service the other tests rely on works here, for real."""

# ruff: noqa: F811 - the service fixtures are imported, then requested by name
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tests.services.slurm import MARKER, SlurmCluster, missing_tools, slurm_cluster  # noqa: F401
from tests.services.sshd import SshServer, sshd_server  # noqa: F401
from tests.services.users import TestUser, unpriv_user  # noqa: F401

pytestmark = pytest.mark.slow


def test_srun_on_both_nodes(slurm_cluster: SlurmCluster) -> None:
    assert slurm_cluster.node_states() == {"n1": "idle", "n2": "idle"}
    out = slurm_cluster.run(["srun", "-N", "2", "-l", "printenv", "SLURMD_NODENAME"]).stdout
    assert sorted(out.split()) == ["0:", "1:", "n1", "n2"]
    hosts = slurm_cluster.run(["srun", "-N", "2", "hostname"]).stdout.split()
    assert len(hosts) == 2


def test_sbatch_job_completes_on_both_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = "#!/bin/sh\nsrun -l printenv SLURMD_NODENAME\n"
    job = slurm_cluster.run(
        ["sbatch", "--parsable", "-N2", "--ntasks-per-node=1", f"--output={tmp_path}/out-%j"], input=script
    ).stdout.strip()
    assert slurm_cluster.wait_job(job) == "COMPLETED"
    lines = sorted((tmp_path / f"out-{job}").read_text().split("\n"))
    assert [ln for ln in lines if ln] == ["0: n1", "1: n2"]


def test_unprivileged_user_submits(slurm_cluster: SlurmCluster, unpriv_user: TestUser) -> None:
    out = Path(unpriv_user.home) / "slurm-smoke.out"
    out.unlink(missing_ok=True)
    proc = unpriv_user.run(
        ["sbatch", "--parsable", f"--output={out}", "--wrap", "id -u; echo $HOME"],
        env={"SLURM_CONF": slurm_cluster.env["SLURM_CONF"]},
    )
    assert proc.returncode == 0, proc.stderr
    assert slurm_cluster.wait_job(proc.stdout.strip()) == "COMPLETED"
    assert out.read_text().split() == [str(unpriv_user.uid), unpriv_user.home]
    assert out.stat().st_uid == unpriv_user.uid


def test_cluster_hooks_env_and_clean_teardown(tmp_path: Path) -> None:
    """Extra slurm.conf lines plug in a prolog; nothing of the cluster outlives it."""
    if os.geteuid() != 0 or missing_tools():
        pytest.skip("needs root and Slurm")
    seen = tmp_path / "prolog.env"
    prolog = tmp_path / "prolog"
    prolog.write_text(f"#!/bin/sh\nenv > {seen}\n")
    prolog.chmod(0o755)
    extra = ["Prolog=" + str(prolog), "PrologFlags=Alloc", "PrologEpilogTimeout=30"]
    with SlurmCluster(nodes=1, extra_config=extra, daemon_env={"HPCSIF_SMOKE": "1"}) as cluster:
        base = cluster.base
        assert "PrologFlags=Alloc" in cluster.conf.read_text()
        job = cluster.run(["sbatch", "--parsable", "--wrap", "sleep 300"]).stdout.strip()
        deadline = time.monotonic() + 30
        while not seen.exists() or f"SLURM_JOB_ID={job}" not in seen.read_text():
            assert time.monotonic() < deadline, cluster.logs_tail()
            time.sleep(0.2)
        assert (base / "log" / "slurmctld.log").stat().st_size > 0
        # daemon_env reaches the daemons and slurmstepd; slurmd gives the prolog a fresh env
        assert any(b"HPCSIF_SMOKE=1" in env for env in _cluster_processes(base).values())
        assert "HPCSIF_SMOKE" not in seen.read_text()
    # the job's slurmstepd and sleep were running at teardown: all gone now, and the directory
    assert _cluster_processes(base) == {}
    assert not base.exists()


def _cluster_processes(base: Path) -> dict[str, list[bytes]]:
    """Live processes started by the cluster in ``base``, with their environments."""
    marker = f"{MARKER}={base}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                status = (entry / "status").read_text()
            except OSError:
                continue
            if marker in environ and "\nState:\tZ" not in status:
                found[entry.name] = environ
    return found


def test_ssh_echo(sshd_server: SshServer) -> None:
    import paramiko

    for host in sshd_server.hosts:
        client = paramiko.SSHClient()
        client.load_host_keys(str(sshd_server.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            host,
            port=sshd_server.port,
            username=sshd_server.user,
            key_filename=str(sshd_server.key_filename),
            allow_agent=False,
            look_for_keys=False,
            timeout=10,
        )
        try:
            _, out, _ = client.exec_command("echo ok")
            assert out.read() == b"ok\n"
        finally:
            client.close()


def test_sshd_refuses_passwords(sshd_server: SshServer) -> None:
    import paramiko

    transport = paramiko.Transport((sshd_server.hosts[0], sshd_server.port))
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as exc:
            transport.auth_password("root", "wrong")
        assert exc.value.allowed_types == ["publickey"]
    finally:
        transport.close()


def test_unprivileged_user(unpriv_user: TestUser) -> None:
    proc = unpriv_user.run("id -u; id -g; echo $HOME; touch /root/x 2>/dev/null || echo denied")
    assert proc.stdout.split() == [str(unpriv_user.uid), str(unpriv_user.gid), unpriv_user.home, "denied"]
    assert stat.S_IMODE(os.stat("/dev/fuse").st_mode) == 0o666
    assert os.stat(unpriv_user.home).st_uid == unpriv_user.uid
