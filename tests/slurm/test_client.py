"""The Slurm client against the real test cluster (``tests.services.slurm``).

Every client test runs with :class:`CLIClient` and, where a pyslurm built for the running Slurm
is installed, with :class:`PySlurmClient`. PyPI has none for Slurm 22.05 (its releases are
17.11, 18.8 and 25.11), so the pyslurm variant is skipped unless pyslurm 22.5.x was built from
source (22.5.3 from its git tag builds against Debian's libslurm-dev and passes these tests);
:func:`get_client` must then choose the commands and say why.
"""

# ruff: noqa: F811 - the slurm_cluster fixture is imported, then requested by name
from __future__ import annotations

import time

import pytest

from hpcsif.errors import SlurmError
from hpcsif.slurm.client import (
    CLIClient,
    PySlurmClient,
    SlurmClient,
    get_client,
    job_finished,
    pyslurm_matches,
    slurm_version,
)
from tests.services.slurm import SlurmCluster, slurm_cluster  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


@pytest.fixture(params=["cli", "pyslurm"])
def client(request: pytest.FixtureRequest, slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch):
    if request.param == "cli":
        return CLIClient(slurm_cluster.env)
    conf = slurm_cluster.env["SLURM_CONF"]
    monkeypatch.setenv("SLURM_CONF", conf)  # libslurm reads it when pyslurm is first imported
    ok, why = pyslurm_matches(conf)
    if not ok:
        pytest.skip(why)
    return PySlurmClient()


def _submit(cluster: SlurmCluster, *args: str, script: str = "sleep 60") -> str:
    return cluster.run(["sbatch", "--parsable", *args, "--wrap", script]).stdout.strip().split(";")[0]


def _wait_running(cluster: SlurmCluster, job_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while cluster.job_state(job_id) != "RUNNING":
        assert time.monotonic() < deadline, f"job {job_id} did not start"
        time.sleep(0.2)


def test_job_info_running_two_nodes(slurm_cluster: SlurmCluster, client: SlurmClient, tmp_path) -> None:
    job = _submit(slurm_cluster, "-N2", f"--chdir={tmp_path}", "--comment=hpcsif:docker://a/b:1 x=2")
    try:
        _wait_running(slurm_cluster, job)
        info = client.job_info(job)
        assert info["job_id"] == job
        assert (info["user"], info["uid"]) == ("root", 0)
        assert info["nodes"] == ["n1", "n2"]
        assert client.node_names_of(job) == ["n1", "n2"]
        assert info["comment"] == "hpcsif:docker://a/b:1 x=2"
        assert info["admin_comment"] is None
        assert info["work_dir"] == str(tmp_path)
        assert info["state"] == "RUNNING"
        assert info["batch_host"] == "n1"
        assert info["batch"] is True
    finally:
        slurm_cluster.run(["scancel", job])


def test_batch_script_and_comments(slurm_cluster: SlurmCluster, client: SlurmClient) -> None:
    script = "#!/bin/sh\n#HPCSIF --image=docker://team/app:1.2\nsleep 60\n"
    job = slurm_cluster.run(["sbatch", "--parsable", "--hold"], input=script).stdout.strip()
    try:
        assert client.batch_script(job) == script
        client.set_comment(job, "hpcsif: one = two 'quoted' \"x\"")
        client.set_admin_comment(job, "hpcsif-digest=sha256:abc error=none")
        info = client.job_info(job)
        assert info["comment"] == "hpcsif: one = two 'quoted' \"x\""
        assert info["admin_comment"] == "hpcsif-digest=sha256:abc error=none"
        assert info["state"] == "PENDING"
        assert info["nodes"] == []
        with pytest.raises(SlurmError, match="one line"):
            client.set_comment(job, "a\nb")
    finally:
        slurm_cluster.run(["scancel", job])


def test_comment_cannot_forge_other_fields(slurm_cluster: SlurmCluster, client: SlurmClient) -> None:
    """A user's multi-line comment holding ``Key=value`` lines changes no other field."""
    forged = "hpcsif:docker://a/b:1\n   AdminComment=hpcsif-error=forged\nJobId=1 JobState=COMPLETED"
    job = _submit(slurm_cluster, "--hold", f"--comment={forged}")
    try:
        info = client.job_info(job)
        assert info["admin_comment"] is None and info["state"] == "PENDING"
        assert info["comment"].startswith("hpcsif:docker://a/b:1")
    finally:
        slurm_cluster.run(["scancel", job])


def test_job_array_task_by_array_id(slurm_cluster: SlurmCluster, client: SlurmClient) -> None:
    job = _submit(slurm_cluster, "--hold", "--array=2-3", "--comment=hpcsif:oci:///x")
    try:
        info = client.job_info(f"{job}_3")
        assert info["job_id"] == f"{job}_3" and info["comment"] == "hpcsif:oci:///x"
    finally:
        slurm_cluster.run(["scancel", job])


def test_srun_job_has_no_batch_script(slurm_cluster: SlurmCluster, client: SlurmClient) -> None:
    import subprocess

    srun = subprocess.Popen(["srun", "-N1", "--job-name=interactive", "sleep", "60"], env=slurm_cluster.env)
    try:
        deadline = time.monotonic() + 30
        job = ""
        while not job:
            assert time.monotonic() < deadline, "srun job did not appear"
            out = slurm_cluster.run(["squeue", "-h", "-n", "interactive", "-t", "R", "-o", "%i"]).stdout
            job = out.strip()
            time.sleep(0.2)
        assert client.batch_script(job) is None
        assert client.job_info(job)["batch"] is False
        with pytest.raises(SlurmError, match="batch"):
            client.requeue(job)
    finally:
        srun.kill()
        srun.wait()


def test_hold_and_requeue(slurm_cluster: SlurmCluster, client: SlurmClient) -> None:
    pending = _submit(slurm_cluster, "--begin=now+1hour")
    running = _submit(slurm_cluster)
    try:
        client.hold(pending)
        reason = slurm_cluster.run(["squeue", "-h", "-j", pending, "-o", "%r"]).stdout.strip()
        assert reason == "JobHeldAdmin"
        _wait_running(slurm_cluster, running)
        client.requeue(running, hold=True)
        deadline = time.monotonic() + 30
        while True:
            shown = (
                slurm_cluster.run(["squeue", "-h", "-j", running, "-o", "%T|%r"]).stdout.strip().split("|")
            )
            if shown[0] == "PENDING":
                break
            assert time.monotonic() < deadline, f"requeued job is {shown}"
            time.sleep(0.2)
        assert "held" in shown[1].lower(), shown
    finally:
        slurm_cluster.run(["scancel", pending, running])


def test_unknown_job(client: SlurmClient) -> None:
    with pytest.raises(SlurmError, match="999999"):
        client.job_info("999999")
    with pytest.raises(SlurmError, match="999999"):
        client.batch_script("999999")
    with pytest.raises(SlurmError, match="Invalid job id"):
        client.set_comment("999999", "x")
    with pytest.raises(SlurmError, match="Invalid job id"):
        client.hold("999999")


def test_missing_command_is_slurm_error(tmp_path) -> None:
    """(Only the command client runs programs.)"""
    client = CLIClient({"PATH": str(tmp_path)})
    with pytest.raises(SlurmError, match="slurm-client"):
        client.job_info("1")


def test_get_client_chooses_commands_without_matching_pyslurm(
    slurm_cluster: SlurmCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conf = slurm_cluster.env["SLURM_CONF"]
    ok, why = pyslurm_matches(conf)
    assert slurm_version(conf) == (22, 5)
    if ok:  # a matching pyslurm was installed by hand: use it against the test cluster
        monkeypatch.setenv("SLURM_CONF", conf)
        assert isinstance(get_client(), PySlurmClient)
        return
    assert "pyslurm" in why
    chosen = get_client(slurm_cluster.env)
    assert isinstance(chosen, CLIClient)
    assert chosen.job_info(_submit(slurm_cluster, script="true"))["user"] == "root"


def test_get_client_config(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from hpcsif.config import set_config

    cfg = tmp_path / "hpcsif.toml"
    monkeypatch.setenv("HPCSIF_CONFIG", str(cfg))
    cfg.write_text("[slurm]\npyslurm = false\n")
    set_config(None)
    assert isinstance(get_client(), CLIClient)
    cfg.write_text('[slurm]\npyslurm = "sometimes"\n')
    set_config(None)
    with pytest.raises(SlurmError, match="auto, true or false"):
        get_client()
    if not pyslurm_matches()[0]:
        cfg.write_text("[slurm]\npyslurm = true\n")
        set_config(None)
        with pytest.raises(SlurmError, match="pyslurm"):
            get_client()


def test_job_finished_follows_the_job(slurm_cluster: SlurmCluster, client: SlurmClient) -> None:
    """What lease reaping asks: running is not finished, ended or forgotten jobs are."""
    job = _submit(slurm_cluster)
    _wait_running(slurm_cluster, job)
    assert job_finished(job, client) is False
    slurm_cluster.run(["scancel", job])
    deadline = time.monotonic() + 30
    while not job_finished(job, client):
        assert time.monotonic() < deadline, f"job {job} never reported as ended"
        time.sleep(0.2)
    assert job_finished("999999", client) is True
