"""A real OpenSSH server on loopback for the SSH fan-out tests.

``sshd_server`` (session scope) runs Debian's ``sshd`` in the foreground with its own host key,
config and pid file in a temporary directory, on one free port, listening on several loopback
addresses (127.0.0.2, 127.0.0.3 … — Linux routes all of 127.0.0.0/8 to ``lo``), so that each
address acts as a separate "node". Authentication is public key only (no PAM, no passwords);
root may log in with the generated test client key. :class:`SshServer` also holds a
``known_hosts`` file naming the host key for every address.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import SharedService

ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without its privilege separation directory


@dataclass
class SshServer:
    """A running sshd and what a client needs to reach it."""

    hosts: tuple[str, ...]
    port: int
    user: str
    key_filename: Path  # private key of the test client (OpenSSH ed25519)
    known_hosts: Path  # host key entries for every address in ``hosts``
    host_key_line: str  # "ssh-ed25519 AAAA…" (the server's public host key)
    workdir: Path
    log: Path
    proc: subprocess.Popen

    def known_hosts_for(self, hosts: Sequence[str], dest: Path) -> Path:
        """Write a known_hosts file that names only ``hosts`` (to test unknown host keys)."""
        dest.write_text("".join(f"[{h}]:{self.port} {self.host_key_line}\n" for h in hosts))
        return dest


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _free_port(hosts: Sequence[str]) -> int:
    """A port free on every address in ``hosts`` (sshd binds the same port on each)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all of " + ", ".join(hosts))


def _wait_listening(hosts: Sequence[str], port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    pending = list(hosts)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with status {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd not listening on {pending} port {port}:\n{log.read_text()}")
        try:
            socket.create_connection((pending[0], port), timeout=1).close()
            pending.pop(0)
        except OSError:
            time.sleep(0.05)


def start_sshd(workdir: Path, hosts: Sequence[str] = ADDRESSES) -> SshServer:
    """Start sshd for root on ``hosts`` (one port); stop it with :func:`stop_sshd`."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd) or shutil.which("ssh-keygen") is None:
        pytest.skip("openssh-server is not installed")
    if os.geteuid() != 0:
        pytest.skip("the test sshd runs as root")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "id_ed25519"
    _keygen(host_key, "hpcsif-test-host")
    _keygen(client_key, "hpcsif-test-client")
    authorized = workdir / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    port = _free_port(hosts)
    config = workdir / "sshd_config"
    lines = [
        f"Port {port}",
        *(f"ListenAddress {h}" for h in hosts),
        f"HostKey {host_key}",
        f"PidFile {workdir}/sshd.pid",
        f"AuthorizedKeysFile {authorized}",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "StrictModes no",  # /tmp above the (0700) workdir is world-writable; sshd would refuse the key
        "PrintMotd no",
        "UseDNS no",
        "MaxStartups 64:30:128",  # fan-out tests open many connections at once
        "MaxSessions 32",
        "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",
    ]
    config.write_text("\n".join(lines) + "\n")
    log = workdir / "sshd.log"
    proc = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 - the child keeps it
        start_new_session=True,
    )
    try:
        _wait_listening(hosts, port, proc, log)
    except BaseException:
        stop_sshd(proc)
        raise
    host_pub = host_key.with_suffix(".pub").read_text().split()
    server = SshServer(
        hosts=tuple(hosts),
        port=port,
        user="root",
        key_filename=client_key,
        known_hosts=workdir / "known_hosts",
        host_key_line=f"{host_pub[0]} {host_pub[1]}",
        workdir=workdir,
        log=log,
        proc=proc,
    )
    server.known_hosts_for(hosts, server.known_hosts)
    return server


def stop_sshd(proc: subprocess.Popen) -> None:
    """Stop sshd and the session processes it forked (they share its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
            return


def _start_shared() -> SshServer:
    workdir = Path(tempfile.mkdtemp(prefix="hpcsif-sshd-"))
    try:
        return start_sshd(workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _stop_shared(server: SshServer) -> None:
    stop_sshd(server.proc)
    shutil.rmtree(server.workdir, ignore_errors=True)


_SHARED = SharedService(_start_shared, _stop_shared)


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SshServer]:
    """sshd on 127.0.0.2-5 (one port), root with the test key; see :class:`SshServer`."""
    with _SHARED.use() as server:
        yield server
