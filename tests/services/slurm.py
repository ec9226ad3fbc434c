"""A real Slurm 22.05 cluster on loopback for the tests (Debian's ``slurm-wlm`` and ``munge``).

:class:`SlurmCluster` starts, as root and in the foreground (so every daemon is our child):

* ``munged`` with its own key, socket, pid, seed and log under the cluster's directory (run as
  root with ``--force``; the daemons find it through ``AuthInfo=socket=…``);
* ``slurmctld`` and one ``slurmd -N nX`` per node, all on this host (``NodeHostname`` is the
  host's name, each node on its own free ``Port=``), cgroup-free (``proctrack/linuxproc``,
  ``task/none``), partition ``debug`` (default).

Clients find the cluster through ``SLURM_CONF`` in :attr:`SlurmCluster.env`; :meth:`SlurmCluster.run`
runs a client command with it. Extra ``slurm.conf`` settings (``Prolog=``, ``Epilog=``,
``PrologFlags=Alloc``, ``PlugStackConfig=`` …) and extra daemon environment can be given, so the
hpcsif hooks can be installed by the Slurm tests. Daemons already running on the machine (another
cluster's ``slurmctld``/``munged``) are never touched: teardown ends only the processes this
cluster started, found by their pids and by a marker in their environment.

The ``slurm_cluster`` fixture (session scope) is a two-node cluster without hooks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.services import SharedService

log = logging.getLogger(__name__)

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
# environment variable carried by every process the daemons start, to find leftovers at teardown
MARKER = "HPCSIF_TEST_SLURM_CLUSTER"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that nothing listens on right now (on any address: slurmd binds 0.0.0.0)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def missing_tools() -> list[str]:
    """The Slurm/munge programs this service needs that are not installed."""
    return [t for t in (*DAEMONS, *CLIENTS) if shutil.which(t) is None]


def _parse_extra(extra: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """``{"Prolog": "/x"}`` or ``["Prolog=/x"]`` -> dict."""
    if extra is None:
        return {}
    if isinstance(extra, Mapping):
        return {str(k): str(v) for k, v in extra.items()}
    out = {}
    for line in extra:
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"extra slurm.conf line without '=': {line!r}")
        out[key.strip()] = value.strip()
    return out


class SlurmCluster:
    """A running test cluster; a context manager (``with SlurmCluster(...) as c:``).

    ``base``: directory for config, state, spool, logs and the munge socket (created; a private
    directory under /tmp, mode 0755, when None — jobs of an unprivileged user need every parent
    directory of the spool to be searchable, which pytest's ``tmp_path`` is not).
    ``extra_config``: ``slurm.conf`` settings added to (or overriding) the defaults.
    ``daemon_env``: environment added for munged, slurmctld, slurmd and so slurmstepd (SPANK
    plugins see it); slurmd runs ``Prolog``/``Epilog`` with a fresh environment of its own
    (``SLURM_JOB_ID``, ``SLURM_CONF`` …, no ``PATH``), so hooks read their settings from files.
    """

    def __init__(
        self,
        base: Path | str | None = None,
        nodes: int = 2,
        *,
        extra_config: Mapping[str, str] | Sequence[str] | None = None,
        daemon_env: Mapping[str, str] | None = None,
        cpus: int | None = None,
        name: str | None = None,
    ) -> None:
        self._own_base = base is None
        self.base = Path(tempfile.mkdtemp(prefix="hpcsif-slurm-", dir="/tmp") if base is None else base)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.extra_config = _parse_extra(extra_config)
        self.daemon_env = dict(daemon_env or {})
        self.cpus = cpus or os.cpu_count() or 1
        self.name = name or f"t{os.getpid() % 100000}x{id(self) % 1000}"
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.base / "slurm.conf"
        self.logdir = self.base / "log"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}
        self._started = False

    # -- public API ---------------------------------------------------------------------------

    @classmethod
    def start(cls, base: Path | str | None = None, nodes: int = 2, **kw) -> SlurmCluster:
        """Construct and start a cluster (use it as a context manager to stop it)."""
        cluster = cls(base, nodes, **kw)
        cluster._start()
        return cluster

    def __enter__(self) -> SlurmCluster:
        if not self._started:
            self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands: this process's, with ``SLURM_CONF`` set."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(
        self, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 120, **kw
    ) -> subprocess.CompletedProcess:
        """Run a client command (list, or a string for ``sh -c``) against this cluster; text output."""
        args = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        env = {**self.env, **kw.pop("env", {})}
        # jobs submitted without --output write slurm-N.out into the submitting cwd: keep them here
        kw.setdefault("cwd", self.base)
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            shown = " ".join(args)
            raise AssertionError(
                f"{shown} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{self.logs_tail()}"
            )
        return proc

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` as sinfo reports it (``idle``, ``allocated``, ``drained`` …)."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_nodes(self, states: tuple[str, ...] = ("idle",), timeout: float = 60) -> None:
        """Wait until every node is in one of ``states``."""
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                seen = self.node_states()
                if set(seen) == set(self.nodes) and all(s in states for s in seen.values()):
                    return
            time.sleep(0.25)
        raise RuntimeError(f"nodes not {'/'.join(states)} after {timeout} s: {seen}\n{self.logs_tail()}")

    def job_state(self, job_id: str) -> str:
        """The job's state from ``scontrol show job`` (``PENDING``, ``RUNNING``, ``COMPLETED`` …)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        raise AssertionError(f"no JobState for job {job_id}: {out}")

    def wait_job(self, job_id: str, timeout: float = 120) -> str:
        """Wait until the job has ended; returns its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in ENDED:
                return state
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {state} after {timeout} s\n{self.logs_tail()}")

    def logs_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.logdir.glob("*.log")) if self.logdir.is_dir() else []:
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # -- start / stop ---------------------------------------------------------------------------

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the test Slurm cluster runs its daemons as root")
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"not installed: {' '.join(missing)} (Debian: slurm-wlm slurm-client munge)")
        self._started = True
        try:
            self._write_files()
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
            self.wait_nodes(("idle",))
        except BaseException:
            self.stop()
            raise

    def _write_files(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        for sub in ("state", "log"):
            (self.base / sub).mkdir(exist_ok=True)
        ctl_port, *node_ports = free_ports(1 + len(self.nodes))
        b = self.base
        settings = {
            "ClusterName": self.name,
            "SlurmctldHost": self.hostname,
            "SlurmctldPort": str(ctl_port),
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "CredType": "cred/munge",
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "StateSaveLocation": f"{b}/state",
            "SlurmdSpoolDir": f"{b}/spool-%n",
            "SlurmctldPidFile": f"{b}/slurmctld.pid",
            "SlurmdPidFile": f"{b}/slurmd-%n.pid",
            "SlurmctldLogFile": f"{self.logdir}/slurmctld.log",
            "SlurmdLogFile": f"{self.logdir}/slurmd-%n.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "AccountingStorageType": "accounting_storage/none",
            "SchedulerType": "sched/backfill",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "MpiDefault": "none",
            "ReturnToService": "2",
            "PrologEpilogTimeout": "120",
            "KillWait": "5",
            "MinJobAge": "300",
            "InactiveLimit": "0",
        }
        settings.update(self.extra_config)
        lines = [f"{k}={v}" for k, v in settings.items()]
        lines += [
            f"NodeName={n} NodeHostname={self.hostname} Port={p} CPUs={self.cpus} State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports, strict=True)
        ]
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=YES"
        )
        _write(self.conf, "\n".join(lines) + "\n")
        # without cgroup.conf slurmd probes cgroup v2 and fails in this cgroup-free setup
        _write(self.base / "cgroup.conf", "CgroupPlugin=cgroup/v1\n")

    def _daemon_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.update(self.daemon_env)
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = str(self.base)
        return env

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(exist_ok=True)
        mdir.chmod(0o755)  # clients of any user connect to the socket
        key = mdir / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        self._spawn(
            "munged",
            [
                "munged", "--foreground", "--force",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={mdir}/munged.pid", f"--seed-file={mdir}/munged.seed",
                f"--log-file={self.logdir}/munged.log",
            ],
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {self.munge_socket}\n{self.logs_tail()}")
            time.sleep(0.05)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.logdir / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self._daemon_env(), start_new_session=True
            )

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}\n{self.logs_tail()}")

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons and end every process they left behind."""
        if not self._procs:
            return
        ctl = self._procs.get("slurmctld")
        if ctl is not None and ctl.poll() is None:
            with contextlib.suppress(Exception):
                jobs = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=15).stdout.split()
                if jobs:
                    self.run(["scancel", *jobs], check=False, timeout=15)
                    self._wait_jobs_gone(timeout=15)
        # slurmd first (it may still talk to slurmctld), munged last (everything authenticates with it)
        order = [n for n in self._procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self._procs.get(name)
            if proc is not None:
                _terminate(proc)
        self._kill_leftovers()
        self._procs.clear()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def _wait_jobs_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["squeue", "-h", "-o", "%T"], check=False, timeout=15).stdout.split()
            if not out:
                return
            time.sleep(0.2)

    def _kill_leftovers(self) -> None:
        """SIGKILL processes whose environment carries this cluster's marker (slurmstepd, hooks…)."""
        needle = f"{MARKER}={self.base}".encode()
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                log.warning("killing leftover process %s of the test cluster", entry.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


def _terminate(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, wait, then SIGKILL the process group (slurmctld's slurmscriptd is in it)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


_SHARED = SharedService(lambda: SlurmCluster.start(nodes=2), SlurmCluster.stop)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A two-node cluster (``n1``, ``n2``) without hooks; skipped unless root with Slurm installed."""
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster needs root")
    missing = missing_tools()
    if missing:
        pytest.skip(f"not installed: {' '.join(missing)}")
    with _SHARED.use() as cluster:
        yield cluster
