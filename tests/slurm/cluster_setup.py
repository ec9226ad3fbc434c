"""A real two-node Slurm cluster with hpcsif's prolog, epilog and SPANK plugin installed.

``hpcsif_cluster`` (session-scoped) builds ``slurm/spank_hpcsif.so`` with ``make -C slurm``,
copies the hooks from ``slurm/`` into a temporary directory with an ``hpcsif.env`` for them,
and starts the cluster with ``Prolog=``, ``Epilog=``, ``PrologFlags=Alloc`` and
``PlugStackConfig=``. Both nodes run on this host; each gets its own system cache
(``syscache-n1``, ``syscache-n2``) through ``hpcsif-node``, a two-line wrapper that points
``HPCSIF_SYSTEM_CACHEDIR`` at ``$SLURMD_NODENAME``'s directory, as separate machines would have.
Jobs are submitted as root, with a user cache of their own (``HPCSIF_CACHEDIR``) that the tests
check stays empty: no conversion inside a job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_docker_archive, write_oci_layout
from tests.services.images import busybox_binary

ROOT = Path(__file__).resolve().parents[2]
OS_RELEASE = b'PRETTY_NAME="hpcsif test OS 6"\nID=hpcsiftest\nVERSION_ID="6.%d"\n'
APPLETS = ("sh", "cat", "ls", "echo", "true", "sleep", "test")


def os_image_spec(version: int = 0) -> ImageSpec:
    """A busybox image whose ``/etc/os-release`` names ``version``."""
    entries = [Entry("bin", mode=0o755), Entry("bin/busybox", busybox_binary().read_bytes(), 0o755)]
    entries += [Entry(f"bin/{a}", symlink="busybox") for a in APPLETS]
    entries += [Entry("etc", mode=0o755), Entry("etc/os-release", OS_RELEASE % version)]
    entries += [Entry(d, mode=0o755) for d in ("tmp", "root", "proc", "dev", "sys", "home")]
    return ImageSpec(layers=[layer_tar(entries)], cmd=["/bin/sh"])


def write_os_archive(dest: Path, version: int = 0) -> str:
    """A ``docker-archive://`` reference to the image."""
    write_docker_archive(dest, [(f"test/os:{version}", os_image_spec(version))])
    return f"docker-archive://{dest}"


def write_os_layout(dest: Path, version: int = 0, tag: str = "latest") -> str:
    """An ``oci:`` layout (for pushing with skopeo); returns ``oci:DIR:TAG``."""
    write_oci_layout(dest, os_image_spec(version), tag)
    return f"oci:{dest}:{tag}"


@dataclass
class HpcsifCluster:
    """The running cluster and what the tests need to drive it."""

    base: Path
    env: dict[str, str]  # SLURM_CONF & co. for sbatch/srun/scontrol
    nodes: tuple[str, ...]
    hpcsif_node: Path  # the per-node hpcsif command (jobs and hooks use it)
    log: Path  # the hooks' log
    _jobs: int = field(default=0)

    def syscache(self, node: str) -> Path:
        """Node ``node``'s system cache."""
        return self.base / f"syscache-{node}"

    def run(self, *cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster."""
        proc = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            env={**self.env, **kw.pop("env", {})},
            timeout=timeout,
            **kw,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job_env(self, tmp: Path) -> dict[str, str]:
        """The environment a job is submitted with: its own user cache under ``tmp``."""
        return {
            "HPCSIF_CACHEDIR": str(tmp / "user-cache"),
            "PATH": f"{self.hpcsif_node.parent}:{os.environ['PATH']}",
        }

    def sbatch(self, script: str, *args: str, tmp: Path) -> str:
        """Submit ``script``; returns the job id. Output goes to ``tmp/slurm-<id>.out``."""
        self._jobs += 1
        path = tmp / f"job{self._jobs}.sh"
        path.write_text(script)
        out = self.run(
            "sbatch",
            "--parsable",
            f"--output={tmp}/slurm-%j.out",
            *args,
            str(path),
            env=self.job_env(tmp),
            cwd=tmp,
        )
        return out.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout: float = 180) -> str:
        """Wait until the job has ended; returns its final state (COMPLETED, FAILED …)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                self.wait_idle()
                return state
            time.sleep(0.3)
        shown = self.run("scontrol", "show", "job", job_id).stdout
        raise AssertionError(f"job {job_id} did not finish in {timeout} s:\n{shown}")

    def job_field(self, job_id: str, name: str) -> str | None:
        """One ``Name=value`` field of ``scontrol show job`` (values may contain spaces)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        marker = f" {name}="
        start = text.find(marker)
        if start < 0:
            return None
        rest = text[start + len(marker) :]
        # the next field starts at " Word=" where Word is a known capitalised key
        import re

        m = re.search(r" [A-Z][A-Za-z:/]*=", rest)
        value = (rest[: m.start()] if m else rest).strip()
        return None if value == "(null)" else value

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` from sinfo (idle, allocated, drained …)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout
        return dict(line.split() for line in out.splitlines())

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until no node is allocated or completing (the epilogs have run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.node_states()
            if not any(s.startswith(("alloc", "compl", "mix")) for s in states.values()):
                return
            time.sleep(0.3)
        raise AssertionError(f"nodes still busy: {self.node_states()}")


def _write_hooks(base: Path) -> tuple[Path, Path, Path]:
    """The hooks from slurm/, their hpcsif.env and the per-node hpcsif wrapper."""
    hooks = base / "hooks"
    hooks.mkdir()
    for name in ("prolog", "epilog", "hpcsif-hook", "task-exec"):
        shutil.copy2(ROOT / "slurm" / name, hooks / name)
    bindir = base / "bin"
    bindir.mkdir()
    wrapper = bindir / "hpcsif"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# a separate system cache per node, as separate machines have\n"
        f'export HPCSIF_SYSTEM_CACHEDIR="{base}/syscache-${{SLURMD_NODENAME:-none}}"\n'
        f'export PYTHONPATH="{ROOT}"\n'
        f'exec "{sys.executable}" -m hpcsif.cli.main "$@"\n'
    )
    wrapper.chmod(0o755)
    log = base / "hpcsif-slurm.log"
    (hooks / "hpcsif.env").write_text(f"HPCSIF_BIN={wrapper}\nHPCSIF_LOG={log}\nHPCSIF_PROLOG_TIMEOUT=100\n")
    return hooks, wrapper, log


def build_plugin() -> Path:
    """``make -C slurm``: the plugin built against Debian's libslurm-dev."""
    if shutil.which("gcc") is None or not Path("/usr/include/slurm/spank.h").exists():
        pytest.skip("gcc and libslurm-dev are needed to build the SPANK plugin")
    proc = subprocess.run(["make", "-C", str(ROOT / "slurm")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ROOT / "slurm" / "spank_hpcsif.so"


@pytest.fixture(scope="session")
def hpcsif_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HpcsifCluster]:
    """Two nodes, n1 and n2, with hpcsif's hooks and plugin; see the module docstring."""
    from tests.services.slurm import SlurmCluster

    base = tmp_path_factory.mktemp("hpcsif-slurm")
    base.chmod(0o755)
    plugin = build_plugin()
    hooks, wrapper, log = _write_hooks(base)
    plugstack = base / "plugstack.conf"
    args = f"task_exec={hooks / 'task-exec'} resolve_at_submit hpcsif={wrapper}"
    plugstack.write_text(f"required {plugin} {args}\n")
    extra = {
        "Prolog": str(hooks / "prolog"),
        "Epilog": str(hooks / "epilog"),
        "PrologFlags": "Alloc",
        "PrologEpilogTimeout": "120",
        "PlugStackConfig": str(plugstack),
    }
    with SlurmCluster.start(base / "cluster", nodes=2, extra_config=extra) as cluster:
        yield HpcsifCluster(base, dict(cluster.env), tuple(cluster.nodes), wrapper, log)
