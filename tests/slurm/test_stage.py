"""``hpcsif stage``: here, on every node of an allocation (--slurm), and over SSH (--nodes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.services.sshd import SshServer
from tests.services.users import USER_PYTHON, TestUser
from tests.slurm.cluster_setup import HpcsifCluster, write_os_archive


def _converts(root: Path, ref: str) -> int:
    journal = root / "journal.jsonl"
    events = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
    return sum(1 for e in events if e["event"] == "convert" and e["what"] == ref)


def test_stage_locally_converts_once(tmp_path: Path) -> None:
    ref = write_os_archive(tmp_path / "os5.tar", 5)
    first = run_cli("stage", ref).stdout
    second = run_cli("stage", ref).stdout
    assert first == second
    ref_out, path = first.strip().split("\t")
    assert ref_out == ref and Path(path).is_file() and path.endswith("os5.sif")
    assert _converts(Path(path).parents[2], ref) == 1


def test_stage_usage_errors(tmp_path: Path) -> None:
    proc = run_cli("stage", "--slurm", "docker://x/y:1", check=False, env={"SLURM_JOB_ID": ""})
    assert proc.returncode == 2 and "inside a Slurm allocation" in proc.stderr
    proc = run_cli("stage", "--from", "n1", "docker://x/y:1", check=False)
    assert proc.returncode == 2 and "--from needs --nodes" in proc.stderr
    proc = run_cli("stage", "--nodes", "", "docker://x/y:1", check=False)  # --nodes "$UNSET"
    assert proc.returncode == 2 and proc.stderr == "FATAL:   --nodes '' names no node\n"


def test_stage_system_as_a_user_says_whose_cache_it_is(unpriv_user: TestUser) -> None:
    system = Path(tempfile.mkdtemp(prefix="hpcsif-syscache-", dir="/tmp"))  # root's, 0755
    try:
        system.chmod(0o755)
        proc = unpriv_user.run(
            [USER_PYTHON, "-m", "hpcsif.cli.main", "stage", "--system", "docker://x/y:1"],
            env={"PYTHONPATH": str(ROOT), "HPCSIF_SYSTEM_CACHEDIR": str(system)},
        )
        assert proc.returncode == 255, proc.stderr
        assert proc.stderr == (
            f"FATAL:   cannot write the system cache {system}: Permission denied "
            "(root's: run as root, or stage into your own cache)\n"
        )
    finally:
        shutil.rmtree(system)


@pytest.mark.slow
def test_stage_slurm_once_on_every_node(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    cluster = hpcsif_cluster
    ref = write_os_archive(tmp_path / "os7.tar", 7)
    proc = cluster.run(
        "salloc", "-N2", "hpcsif", "stage", "--slurm", "--system", ref,
        env=cluster.job_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    lines = sorted(line for line in proc.stdout.splitlines() if "\t" in line)
    assert len(lines) == 2, proc.stdout + proc.stderr  # one srun task per node, labelled 0: and 1:
    for node in cluster.nodes:
        assert len(list(cluster.syscache(node).glob("sif/*/os7.sif"))) == 1, node
        assert _converts(cluster.syscache(node), ref) == 1


@pytest.mark.slow
def test_stage_slurm_beside_a_step_that_holds_every_cpu(
    hpcsif_cluster: HpcsifCluster, tmp_path: Path
) -> None:
    """``srun -c ALL --pty bash``, then ``hpcsif stage --slurm``: the staging step overlaps it."""
    cluster = hpcsif_cluster
    ref = write_os_archive(tmp_path / "os14.tar", 14)
    proc = cluster.run(
        "srun", "-N1", f"-c{cluster.slurm.cpus}", "hpcsif", "stage", "--slurm", ref,
        env=cluster.job_env(tmp_path), cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert proc.stdout.startswith(f"0: {ref}\t"), proc.stdout + proc.stderr


@pytest.fixture
def ssh_nodes(sshd_server: SshServer, tmp_path: Path) -> tuple[list[str], Path]:
    """SSH arguments for ``hpcsif stage --nodes`` and where each node's cache is.

    Every loopback address is a "node" of the same sshd; the remote command gives each its own
    cache directory, named after the address the client connected to (from ``SSH_CONNECTION``).
    """
    caches = tmp_path / "node-caches"
    wrapper = tmp_path / "node-hpcsif"
    wrapper.write_text(
        "#!/bin/sh\n"
        'set -- "$@"; addr=$(echo "$SSH_CONNECTION" | cut -d" " -f3)\n'
        f'export HPCSIF_CACHEDIR="{caches}/$addr" PYTHONPATH="{ROOT}"\n'
        f'exec "{sys.executable}" -m hpcsif.cli.main "$@"\n'
    )
    wrapper.chmod(0o755)
    args = [
        "--port", str(sshd_server.port), "-i", str(sshd_server.key_filename),
        "--known-hosts", str(sshd_server.known_hosts), "--user", sshd_server.user,
        "--remote-command", str(wrapper), "--timeout", "60",
    ]  # fmt: skip
    return args, caches


def _table(stdout: str) -> dict[str, list[str]]:
    rows = [line.split(None, 3) for line in stdout.splitlines()[1:] if line.startswith("127.")]
    return {r[0]: r[1:] for r in rows}


@pytest.mark.slow
def test_stage_nodes_over_ssh_with_an_unreachable_node(
    ssh_nodes: tuple[list[str], Path], tmp_path: Path
) -> None:
    args, caches = ssh_nodes
    ref = write_os_archive(tmp_path / "os8.tar", 8)
    # 127.0.0.9: nothing listens there
    proc = run_cli("stage", "--nodes", "127.0.0.[2-4],127.0.0.9", *args, ref, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = _table(proc.stdout)
    assert list(table) == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9"]
    for node in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        status, _, detail = table[node]
        assert status == "ok" and detail == str(next((caches / node).glob("sif/*/os8.sif")))
        assert _converts(caches / node, ref) == 1
    status, _, detail = table["127.0.0.9"]
    assert status == "FAILED" and "cannot connect" in detail
    assert "4 node(s): 3 ok, 1 failed" in proc.stdout


@pytest.mark.slow
def test_stage_nodes_refuses_unknown_host_keys(
    sshd_server: SshServer, ssh_nodes: tuple[list[str], Path], tmp_path: Path
) -> None:
    args, caches = ssh_nodes
    known = sshd_server.known_hosts_for(["127.0.0.2"], tmp_path / "known_hosts")
    args = [*args, "--known-hosts", str(known)]  # the later flag wins
    ref = write_os_archive(tmp_path / "os9.tar", 9)
    proc = run_cli("stage", "--nodes", "127.0.0.[2-3]", *args, ref, check=False)
    assert proc.returncode == 1
    table = _table(proc.stdout)
    assert table["127.0.0.2"][0] == "ok"
    assert table["127.0.0.3"][0] == "FAILED" and f"is not in {known} or" in table["127.0.0.3"][2]
    assert not (caches / "127.0.0.3").exists()


@pytest.mark.slow
def test_stage_nodes_from_one_node_over_sftp(ssh_nodes: tuple[list[str], Path], tmp_path: Path) -> None:
    args, caches = ssh_nodes
    ref = write_os_archive(tmp_path / "os10.tar", 10)
    proc = run_cli("stage", "--nodes", "127.0.0.[2-4]", "--from", "127.0.0.3", *args, ref)
    table = _table(proc.stdout)
    assert [v[0] for v in table.values()] == ["ok", "ok", "ok"], proc.stdout
    assert table["127.0.0.2"][2] == "copied from 127.0.0.3"
    assert _converts(caches / "127.0.0.3", ref) == 1
    for node in ("127.0.0.2", "127.0.0.4"):
        assert _converts(caches / node, ref) == 0  # copied, not converted
        (sif,) = (caches / node).glob("sif/*/os10.sif")
        assert sif.read_bytes() == next((caches / "127.0.0.3").glob("sif/*/os10.sif")).read_bytes()
    # the copied entry is a real cache hit there: staging again converts nothing
    again = run_cli("stage", "--nodes", "127.0.0.2", *args, ref)
    assert _table(again.stdout)["127.0.0.2"][0] == "ok"
    assert _converts(caches / "127.0.0.2", ref) == 0


@pytest.mark.slow
def test_stage_from_a_node_whose_entry_is_an_unsynced_copy(
    ssh_nodes: tuple[list[str], Path], tmp_path: Path
) -> None:
    args, caches = ssh_nodes
    ref = write_os_archive(tmp_path / "os11.tar", 11)
    run_cli("stage", "--nodes", "127.0.0.3", *args, ref)
    (meta_path,) = (caches / "127.0.0.3").glob("sif/*/meta.json")
    # as if 127.0.0.3 had copied it from the shared tier in this boot
    meta = json.loads(meta_path.read_text())
    meta["unsynced_boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    meta_path.write_text(json.dumps(meta))
    proc = run_cli("stage", "--nodes", "127.0.0.[2-3]", "--from", "127.0.0.3", *args, ref)
    assert [v[0] for v in _table(proc.stdout).values()] == ["ok", "ok"], proc.stdout
    (copied,) = (caches / "127.0.0.2").glob("sif/*/meta.json")
    assert "unsynced_boot" not in json.loads(copied.read_text())  # the upload was synced there
    assert json.loads(copied.read_text())["via"] == meta["via"]


@pytest.mark.slow
def test_stage_nodes_reads_known_hosts_as_openssh_does(
    sshd_server: SshServer, ssh_nodes: tuple[list[str], Path], tmp_path: Path
) -> None:
    """Known_hosts lines as clusters write them: one pattern for nodes sharing a host key, a
    negation, a host CA, a line paramiko cannot parse, a revoked key; and the system-wide file."""
    args, caches = ssh_nodes
    key, port = sshd_server.host_key_line, sshd_server.port
    known = tmp_path / "known_hosts"
    known.write_text(
        f"@cert-authority *.cluster {key}\n"
        "node01 ssh-unknown-type AAAAB3Nz\n"
        f"[127.0.0.*]:{port},![127.0.0.3]:{port} {key}\n"
        f"@revoked [127.0.0.4]:{port} {key}\n"
    )
    ref = write_os_archive(tmp_path / "os12.tar", 12)
    proc = run_cli("stage", "--nodes", "127.0.0.[2-4]", *args, "--known-hosts", str(known), ref, check=False)
    table = _table(proc.stdout)
    assert table["127.0.0.2"][0] == "ok", proc.stdout + proc.stderr
    assert f"{known}:2: unreadable known_hosts line skipped" in proc.stderr
    assert table["127.0.0.3"][0] == "FAILED"
    assert (
        f"host key of [127.0.0.3]:{port} is not in {known} or /etc/ssh/ssh_known_hosts"
        in table["127.0.0.3"][2]
    )
    assert f"ssh-keyscan -p {port} 127.0.0.3" in table["127.0.0.3"][2]
    assert table["127.0.0.4"][0] == "FAILED" and "@revoked" in table["127.0.0.4"][2]
    assert not (caches / "127.0.0.3").exists() and not (caches / "127.0.0.4").exists()

    system = Path("/etc/ssh/ssh_known_hosts")
    if system.exists():
        pytest.skip(f"{system} exists: not replaced by a test")
    known.write_text("")
    system.write_text(f"[127.0.0.3]:{port} {key}\n")
    try:
        proc = run_cli("stage", "--nodes", "127.0.0.3", *args, "--known-hosts", str(known), ref)
    finally:
        system.unlink()
    assert _table(proc.stdout)["127.0.0.3"][0] == "ok"


@pytest.mark.slow
def test_stage_nodes_says_what_is_wrong_with_the_key(
    ssh_nodes: tuple[list[str], Path], tmp_path: Path
) -> None:
    args, _ = ssh_nodes
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pass phrase", "-f", key], check=True)
    proc = run_cli("stage", "--nodes", "127.0.0.2", *args, "-i", str(key), "docker://x/y:1", check=False)
    assert proc.returncode == 1
    assert f"private key {key} needs its passphrase: ssh-add it and leave out -i" in proc.stdout
    proc = run_cli("stage", "--nodes", "127.0.0.2", *args, "-i", str(tmp_path / "nokey"), "x", check=False)
    assert (
        proc.returncode == 255
        and proc.stderr == f"FATAL:   identity file {tmp_path / 'nokey'} does not exist\n"
    )
    # no -i, no agent and no key in ~/.ssh
    home = tmp_path / "home"
    home.mkdir()
    bare = [a for a in args if a not in ("-i", str(args[args.index("-i") + 1]))]
    env = {"HOME": str(home), "SSH_AUTH_SOCK": ""}
    proc = run_cli("stage", "--nodes", "127.0.0.2", *bare, "docker://x/y:1", check=False, env=env)
    assert "no key to log in as root: no ssh-agent and no ~/.ssh/id_* key (give -i KEYFILE)" in proc.stdout
