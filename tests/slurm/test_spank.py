"""The SPANK plugin on a real cluster: options, the request reaching the prolog, tasks in the container."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.slurm.cluster_setup import HpcsifCluster, write_os_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def os_ref(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A docker-archive of the test image (os-release VERSION_ID 6.0)."""
    return write_os_archive(tmp_path_factory.mktemp("spank-img") / "os.tar")


def test_options_are_offered(hpcsif_cluster: HpcsifCluster) -> None:
    out = hpcsif_cluster.run("srun", "--help").stdout
    for opt in ("--sif-image=IMAGE", "--sif-mounts=", "--sif-nv", "--sif-mpi=NAME"):
        assert opt in out


def test_srun_task_runs_in_the_image(hpcsif_cluster: HpcsifCluster, os_ref: str, tmp_path: Path) -> None:
    proc = hpcsif_cluster.run(
        "srun",
        "-N2",
        "--ntasks-per-node=1",
        f"--sif-image={os_ref}",
        "cat",
        "/etc/os-release",
        env=hpcsif_cluster.job_env(tmp_path),
        cwd=tmp_path,
    )
    assert proc.stdout.count('PRETTY_NAME="hpcsif test OS 6"') == 2, proc.stdout + proc.stderr
    # srun made its own allocation, so the prolog staged the image on both nodes first
    for node in hpcsif_cluster.nodes:
        assert list((hpcsif_cluster.syscache(node) / "sif").glob("*/os.sif")), node
    assert not list((tmp_path / "user-cache").glob("sif/*/*.sif")), "the task converted the image itself"


def test_arguments_mounts_and_exit_status_pass_through(
    hpcsif_cluster: HpcsifCluster, os_ref: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data.txt").write_text("from the host\n")
    proc = hpcsif_cluster.run(
        "srun",
        "-N1",
        f"--sif-image={os_ref}",
        f"--sif-mounts={shared}:/mnt/in",
        "/bin/sh",
        "-c",
        'echo "args:$0|$1|$2"; cat /mnt/in/data.txt; exit 7',
        "zero",
        "one two",
        "three",
        env=hpcsif_cluster.job_env(tmp_path),
        cwd=tmp_path,
        check=False,
    )
    assert "args:zero|one two|three" in proc.stdout, proc.stderr
    assert "from the host" in proc.stdout
    assert proc.returncode == 7


def test_hpcsif_commands_are_not_wrapped_again(
    hpcsif_cluster: HpcsifCluster, os_ref: str, tmp_path: Path
) -> None:
    proc = hpcsif_cluster.run(
        "srun",
        "-N1",
        f"--sif-image={os_ref}",
        "hpcsif",
        "exec",
        os_ref,
        "cat",
        "/etc/os-release",
        env=hpcsif_cluster.job_env(tmp_path),
        cwd=tmp_path,
    )
    assert "ID=hpcsiftest" in proc.stdout, proc.stderr


def test_batch_job_option_reaches_the_prolog_and_its_steps(
    hpcsif_cluster: HpcsifCluster, os_ref: str, tmp_path: Path
) -> None:
    script = (
        "#!/bin/bash\n"
        "# the batch script itself runs on the host; its steps inherit --sif-image\n"
        "test -e /etc/debian_version && echo batch-on-host\n"
        "srun -N2 --ntasks-per-node=1 hpcsif slurm record $SLURM_JOB_ID\n"
        "srun -N2 --ntasks-per-node=1 cat /etc/os-release\n"
    )
    job = hpcsif_cluster.sbatch(script, "-N2", f"--sif-image={os_ref}", tmp=tmp_path)
    assert hpcsif_cluster.wait(job) == "COMPLETED"
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert "batch-on-host" in out
    assert out.count(f"{os_ref}\t{os_ref}\t") == 2, out  # staged on both nodes before the steps
    assert out.count("ID=hpcsiftest") == 2, out


def test_sif_flags_need_an_image(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    proc = hpcsif_cluster.run("srun", "-N1", "--sif-nv", "true", check=False, cwd=tmp_path)
    assert proc.returncode != 0
    assert "need --sif-image" in proc.stderr


def test_nv_and_mpi_options_reach_hpcsif_exec(
    hpcsif_cluster: HpcsifCluster, os_ref: str, tmp_path: Path
) -> None:
    env, image = hpcsif_cluster.job_env(tmp_path), f"--sif-image={os_ref}"
    nv = hpcsif_cluster.run("srun", "-N1", image, "--sif-nv", "true", env=env, cwd=tmp_path, check=False)
    assert nv.returncode == 0, nv.stderr
    if not list(Path("/dev").glob("nvidia[0-9]*")):  # without a GPU, exec --nv says so
        assert "--nv: no GPU devices found" in nv.stderr, nv.stderr
    mpi = hpcsif_cluster.run(
        "srun", "-N1", image, "--sif-mpi=no-such-profile", "true", env=env, cwd=tmp_path, check=False
    )
    assert mpi.returncode != 0 and "unknown MPI profile 'no-such-profile'" in mpi.stderr, mpi.stderr


def test_task_finds_hpcsif_through_the_hooks_settings(
    hpcsif_cluster: HpcsifCluster, os_ref: str, tmp_path: Path
) -> None:
    """hpcsif installed off the users' PATH (a virtualenv): the tasks use the hooks' HPCSIF_BIN."""
    env = {**hpcsif_cluster.job_env(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = hpcsif_cluster.run(
        "srun", "-N1", f"--sif-image={os_ref}", "cat", "/etc/os-release", env=env, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0 and 'PRETTY_NAME="hpcsif test OS 6"' in proc.stdout, proc.stdout + proc.stderr


def test_install_with_another_libexecdir_rebuilds_the_plugin(tmp_path: Path) -> None:
    """``make && make install LIBEXECDIR=…``: the plugin runs the task-exec that was installed."""
    src = tmp_path / "slurm"
    shutil.copytree(ROOT / "slurm", src, ignore=shutil.ignore_patterns("*.so", "*.stamp"))
    make = ["make", "-C", str(src)]
    subprocess.run(make, check=True, capture_output=True)
    root = tmp_path / "root"
    install = [*make, "install", f"DESTDIR={root}", "LIBEXECDIR=/opt/hpcsif", "PLUGINDIR=/p"]
    subprocess.run(install, check=True, capture_output=True)
    plugin = (root / "p" / "spank_hpcsif.so").read_bytes()
    assert b"/opt/hpcsif/task-exec\0" in plugin and b"/usr/libexec/hpcsif/task-exec" not in plugin
    assert (root / "opt" / "hpcsif" / "task-exec").is_file()
    # nothing changed: not built again
    again = subprocess.run(install, check=True, capture_output=True, text=True).stdout
    assert "-DHPCSIF_TASK_EXEC" not in again, again


def test_a_hanging_registry_does_not_hang_sbatch(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    """resolve_at_submit gives up after resolve_timeout seconds; the prolog resolves later."""
    plugstack = hpcsif_cluster.base / "plugstack.conf"
    saved = plugstack.read_text()
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        ref = f"docker://127.0.0.1:{silent.getsockname()[1]}/team/app:1"
        plugstack.write_text(saved.rstrip("\n") + " resolve_timeout=2\n")
        try:
            started = time.monotonic()
            job = hpcsif_cluster.sbatch("#!/bin/sh\ntrue\n", "--hold", f"--sif-image={ref}", tmp=tmp_path)
            took = time.monotonic() - started
        finally:
            plugstack.write_text(saved)
        hpcsif_cluster.run("scancel", job)
    assert took < 15, took
