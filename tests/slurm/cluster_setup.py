"""A real two-node Slurm cluster with hpcsif's prolog, epilog and SPANK plugin installed.

``hpcsif_cluster`` (session-scoped) builds ``spank_hpcsif.so`` with slurm/Makefile (in a copy),
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
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_docker_archive, write_oci_layout
from tests.services.images import busybox_binary
from tests.services.slurm import SlurmCluster, missing_tools
from tests.services.users import USER_PYTHON

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
    """The running cluster (:class:`SlurmCluster`) and what the hpcsif tests add to it."""

    slurm: SlurmCluster
    base: Path
    hpcsif_node: Path  # the per-node hpcsif command (jobs and hooks use it)
    log: Path  # the hooks' log
    _jobs: int = field(default=0)

    @property
    def nodes(self) -> list[str]:
        """The node names."""
        return self.slurm.nodes

    def syscache(self, node: str) -> Path:
        """Node ``node``'s system cache."""
        return self.base / f"syscache-{node}"

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return self.slurm.run(list(cmd), **kw)

    @property
    def user_bin(self) -> Path:
        """The directory of the per-node ``hpcsif`` for unprivileged job users."""
        return self.base / "userbin"

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
            "sbatch", "--parsable", f"--output={tmp}/slurm-%j.out", *args, str(path),
            env=self.job_env(tmp), cwd=tmp,
        )  # fmt: skip
        return out.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout: float = 180) -> str:
        """Wait until the job has ended and the nodes are idle again (epilogs done); its state."""
        state = self.slurm.wait_job(job_id, timeout)
        self.slurm.wait_nodes(("idle",))
        return state

    def job_field(self, job_id: str, name: str) -> str | None:
        """One ``Name=value`` field of ``scontrol show job -o`` (values may contain spaces)."""
        text = " " + self.run("scontrol", "show", "job", "-o", job_id).stdout.strip()
        fields = list(re.finditer(r" ([A-Z][A-Za-z:/]*)=", text))
        for here, after in zip(fields, [*fields[1:], None], strict=True):
            if here.group(1) == name:
                value = text[here.end() : after.start() if after else None].strip()
                return None if value == "(null)" else value
        return None

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` (idle, allocated, drained …)."""
        return self.slurm.node_states()


def _node_wrapper(path: Path, base: Path, python: str) -> Path:
    """``hpcsif`` run by ``python``, with the system cache of the node it runs on."""
    path.parent.mkdir(mode=0o755)
    path.write_text(
        "#!/bin/sh\n"
        "# a separate system cache per node, as separate machines have\n"
        f'export HPCSIF_SYSTEM_CACHEDIR="{base}/syscache-${{SLURMD_NODENAME:-none}}"\n'
        f'export PYTHONPATH="{ROOT}"\n'
        f'exec "{python}" -m hpcsif.cli.main "$@"\n'
    )
    path.chmod(0o755)
    return path


def _write_hooks(base: Path) -> tuple[Path, Path, Path]:
    """The hooks from slurm/, their hpcsif.env and the per-node hpcsif wrapper."""
    hooks = base / "hooks"
    hooks.mkdir()
    for name in ("prolog", "epilog", "hpcsif-hook", "task-exec"):
        shutil.copy2(ROOT / "slurm" / name, hooks / name)
    wrapper = _node_wrapper(base / "bin" / "hpcsif", base, sys.executable)
    # root's Python may be unreadable to other users (pyenv under /root): theirs is the system one
    _node_wrapper(base / "userbin" / "hpcsif", base, USER_PYTHON)
    log = base / "hpcsif-slurm.log"
    (hooks / "hpcsif.env").write_text(f"HPCSIF_BIN={wrapper}\nHPCSIF_LOG={log}\nHPCSIF_PROLOG_TIMEOUT=100\n")
    return hooks, wrapper, log


def build_plugin(dest: Path) -> Path:
    """The plugin built with slurm/Makefile against Debian's libslurm-dev, in a copy at ``dest``
    (so that concurrent test sessions never load each other's half-written build)."""
    if shutil.which("gcc") is None or not Path("/usr/include/slurm/spank.h").exists():
        pytest.skip("gcc and libslurm-dev are needed to build the SPANK plugin")
    dest.mkdir()
    for name in ("Makefile", "spank_hpcsif.c"):
        shutil.copy2(ROOT / "slurm" / name, dest / name)
    proc = subprocess.run(["make", "-C", str(dest)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest / "spank_hpcsif.so"


@pytest.fixture(scope="session")
def hpcsif_cluster() -> Iterator[HpcsifCluster]:
    """Two nodes, n1 and n2, with hpcsif's hooks and plugin; see the module docstring."""
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster needs root")
    if missing := missing_tools():
        pytest.skip(f"not installed: {' '.join(missing)}")
    # under /tmp with 0755 parents: an unprivileged job user must reach the system caches
    base = Path(tempfile.mkdtemp(prefix="hpcsif-slurm-hooks-", dir="/tmp"))
    base.chmod(0o755)
    plugin = build_plugin(base / "plugin")
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
    try:
        with SlurmCluster(nodes=2, extra_config=extra) as cluster:
            yield HpcsifCluster(cluster, base, wrapper, log)
    finally:
        shutil.rmtree(base, ignore_errors=True)
