"""SSH fan-out and SFTP copies against a real sshd on loopback (``tests.services.sshd``).

Every address 127.0.0.2-5 is a "node" served by the same sshd; 127.0.0.9 has nothing
listening, so it is an unreachable node.
"""

# ruff: noqa: F811 - the sshd_server fixture is imported, then requested by name
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcsif.errors import RemoteError
from hpcsif.remote.ssh import copy_to_nodes, fan_out, sftp_copy
from tests.services.sshd import SshServer, sshd_server  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

DEAD = "127.0.0.9"


def _kw(server: SshServer, **extra) -> dict:
    kw = {
        "port": server.port,
        "user": server.user,
        "key_filename": server.key_filename,
        "known_hosts": server.known_hosts,
        "timeout": 20,
    }
    kw.update(extra)
    return kw


def test_fan_out_with_an_unreachable_node(sshd_server: SshServer) -> None:
    nodes = [*sshd_server.hosts, DEAD]
    results = fan_out(nodes, "echo ok; echo $SSH_CONNECTION", **_kw(sshd_server))
    assert [r.node for r in results] == nodes
    for r, node in zip(results[:-1], nodes, strict=False):
        assert r.ok and r.exit_code == 0 and r.error is None, r
        assert r.stdout.splitlines()[0] == "ok"
        assert f" {node} {sshd_server.port}" in r.stdout  # the server side saw this address
    dead = results[-1]
    assert not dead.ok and dead.exit_code is None
    assert "connection refused" in dead.error and DEAD in dead.error
    assert dead.seconds < 10


def test_argument_list_is_quoted_and_exit_status_kept(sshd_server: SshServer) -> None:
    (r,) = fan_out(sshd_server.hosts[:1], ["printf", "%s|", "a b", "c'd", "$HOME"], **_kw(sshd_server))
    assert r.ok and r.stdout == "a b|c'd|$HOME|"
    (r,) = fan_out(sshd_server.hosts[:1], "echo out; echo bad thing >&2; exit 3", **_kw(sshd_server))
    assert not r.ok and r.exit_code == 3
    assert r.stdout == "out\n" and r.stderr == "bad thing\n"
    assert r.error == "exit status 3: bad thing"


def test_output_tail_is_bounded(sshd_server: SshServer) -> None:
    (r,) = fan_out(sshd_server.hosts[:1], "seq 1 100000", **_kw(sshd_server))
    assert r.ok and len(r.stdout) <= 4096
    assert r.stdout.endswith("99999\n100000\n")


def test_unknown_host_key_refused_unless_auto_add(sshd_server: SshServer, tmp_path: Path) -> None:
    known, unknown = sshd_server.hosts[0], sshd_server.hosts[1]
    partial = sshd_server.known_hosts_for([known], tmp_path / "known_hosts")
    before = partial.read_bytes()
    results = fan_out([known, unknown], "echo ok", **_kw(sshd_server, known_hosts=partial))
    assert results[0].ok
    assert not results[1].ok and f"is not in {partial} or" in results[1].error
    results = fan_out([known, unknown], "echo ok", **_kw(sshd_server, known_hosts=partial, auto_add=True))
    assert all(r.ok for r in results), results
    assert partial.read_bytes() == before  # an accepted key is not written back


def test_changed_host_key_refused_even_with_auto_add(sshd_server: SshServer, tmp_path: Path) -> None:
    import paramiko

    other = paramiko.Ed25519Key.from_private_key_file(str(sshd_server.key_filename))  # not the host key
    host = sshd_server.hosts[0]
    bad = tmp_path / "known_hosts"
    bad.write_text(f"[{host}]:{sshd_server.port} {other.get_name()} {other.get_base64()}\n")
    for auto_add in (False, True):
        (r,) = fan_out([host], "echo ok", **_kw(sshd_server, known_hosts=bad, auto_add=auto_add))
        assert not r.ok and "does not match" in r.error


def test_wrong_key_fails_authentication(sshd_server: SshServer, tmp_path: Path) -> None:
    import subprocess

    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (r,) = fan_out(sshd_server.hosts[:1], "true", **_kw(sshd_server, key_filename=key))
    assert not r.ok and "authentication failed as root" in r.error


def test_per_node_timeout(sshd_server: SshServer) -> None:
    results = fan_out(sshd_server.hosts[:2], "sleep 30", **_kw(sshd_server, timeout=2))
    for r in results:
        assert not r.ok and r.error == "timed out after 2 s", r
        assert 1.5 < r.seconds < 8


def test_parallelism_is_bounded(sshd_server: SshServer, tmp_path: Path) -> None:
    """Each node logs start and end times to one file (all "nodes" share this host)."""
    log = tmp_path / "spans"

    def max_overlap(parallel: int) -> int:
        log.write_text("")
        cmd = f"echo +1 $(date +%s.%N) >> {log}; sleep 0.5; echo -1 $(date +%s.%N) >> {log}"
        results = fan_out(sshd_server.hosts, cmd, **_kw(sshd_server, parallel=parallel))
        assert all(r.ok for r in results), results
        events = sorted((float(t), int(d)) for d, t in (ln.split() for ln in log.read_text().splitlines()))
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        return peak

    assert max_overlap(2) <= 2
    assert max_overlap(4) >= 2


def test_sftp_copy_upload_and_download(sshd_server: SshServer, tmp_path: Path) -> None:
    src = tmp_path / "image.sif"
    src.write_bytes(os.urandom(300_000))
    src.chmod(0o640)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    dest = remote_dir / "image.sif"
    dest.write_bytes(b"old contents")
    sftp_copy(sshd_server.hosts[0], src, dest, **_kw(sshd_server))
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in remote_dir.iterdir()) == ["image.sif"]  # no temp file left

    back = tmp_path / "back" / "copy.sif"
    back.parent.mkdir()
    sftp_copy(sshd_server.hosts[1], dest, back, download=True, **_kw(sshd_server))
    assert back.read_bytes() == src.read_bytes()
    assert back.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in back.parent.iterdir()] == ["copy.sif"]


def test_sftp_copy_failures(sshd_server: SshServer, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    kw = _kw(sshd_server)
    with pytest.raises(RemoteError, match=str(tmp_path / "missing")):
        sftp_copy(
            sshd_server.hosts[0],
            tmp_path / "missing" / "f",
            tmp_path / "g",
            download=True,
            **_kw(sshd_server),
        )
    with pytest.raises(RemoteError, match=f"{tmp_path / 'no-dir'}: No such file"):
        sftp_copy(sshd_server.hosts[0], src, tmp_path / "no-dir" / "f", **kw)
    with pytest.raises(RemoteError, match="connection refused"):
        sftp_copy(DEAD, src, tmp_path / "g", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_copy_to_nodes(sshd_server: SshServer, tmp_path: Path) -> None:
    src = tmp_path / "img"
    src.write_bytes(b"sif bytes" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    nodes = [*sshd_server.hosts, DEAD]
    results = copy_to_nodes(nodes, src, str(out / "img"), **_kw(sshd_server))
    assert [r.ok for r in results] == [True] * len(sshd_server.hosts) + [False]
    assert (out / "img").read_bytes() == src.read_bytes()
    assert [p.name for p in out.iterdir()] == ["img"]


def test_option_errors(sshd_server: SshServer, tmp_path: Path) -> None:
    with pytest.raises(RemoteError, match="positive"):
        fan_out(sshd_server.hosts, "true", **_kw(sshd_server, timeout=0))
    with pytest.raises(RemoteError, match="does not exist"):
        fan_out(sshd_server.hosts, "true", **_kw(sshd_server, known_hosts=tmp_path / "nope"))
    assert fan_out([], "true") == []
