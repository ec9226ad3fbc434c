"""--nv against a prepared fake driver tree and device nodes; --mpi profiles; Apptainer delegation."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.engine.conftest import fuse_mounts, hpcsif_cmd

pytestmark = pytest.mark.slow


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # (a GPU node's own selection, e.g. NVIDIA_VISIBLE_DEVICES=0 from its container runtime, is
    # not the test's)
    host = {
        k: v for k, v in os.environ.items() if k not in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
    }
    return subprocess.run(
        hpcsif_cmd(*args), capture_output=True, text=True, env={**host, **(env or {})}, timeout=60
    )


def test_nv_binds_fake_driver(images, fake_driver):
    script = "ls /dev; ls /.singularity.d/libs; echo LD=$LD_LIBRARY_PATH; nvidia-smi"
    res = _run("exec", "--nv", str(images.sif), "sh", "-c", script, env={"HPCSIF_CONFIG": str(fake_driver)})
    assert res.returncode == 0, res.stderr
    out = res.stdout.split()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "libcuda.so.1", "libnvidia-ml.so.1"):
        assert name in out
    assert "unrelated" not in out and "libunrelated.so.1" not in out
    assert any(w.startswith("LD=") and "/.singularity.d/libs" in w for w in out)
    assert "fake nvidia-smi" in res.stdout
    assert not os.path.exists("/dev/nvidia0") or os.path.realpath("/dev/nvidia0") == "/dev/nvidia0"
    res = _run(
        "exec",
        "--nv",
        str(images.sif),
        "sh",
        "-c",
        "ls /dev; echo $CUDA_VISIBLE_DEVICES",
        env={"HPCSIF_CONFIG": str(fake_driver), "NVIDIA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "0"},
    )
    out = res.stdout.split()
    assert "nvidia1" in out and "nvidia0" not in out and out[-1] == "0"


def test_nv_without_gpu_warns(images, pub_tmp):
    conf = pub_tmp / "nogpu.toml"
    (pub_tmp / "nodev").mkdir()
    conf.write_text(f'[gpu]\ndriver_root = "{pub_tmp}"\ndev_dir = "{pub_tmp / "nodev"}"\n')
    res = _run("exec", "--nv", str(images.sif), "echo", "ran", env={"HPCSIF_CONFIG": str(conf)})
    assert res.returncode == 0 and res.stdout == "ran\n"
    assert "no GPU devices found" in res.stderr


@pytest.fixture
def mpi_profile(pub_tmp: Path) -> Path:
    host = pub_tmp / "hostmpi"
    (host / "lib").mkdir(parents=True)
    (host / "marker").write_text("host mpi\n")
    (host / "lib/libpmix.so.2.3.0").write_text("")
    prof = pub_tmp / "testmpi.toml"
    prof.write_text(
        f"""model = "bind"
description = "test"
binds = ["{host}:/opt/hostmpi:ro"]
env_prefixes = ["SLURM_", "PMIX_"]
devices = ["/dev/shm"]
ld_library_path = ["/opt/hostmpi/lib"]
[env]
MPI_PROFILE_VAR = "x y"
[abi]
pmix_host = ["{host}/lib/libpmix.so.*"]
pmix_container = ["/usr/lib/x86_64-linux-gnu/libpmix.so.*"]
"""
    )
    return prof


def test_mpi_profile_binds_env_and_abi_warning(images, mpi_profile):
    values = "$SLURM_PROCID|$PMIX_RANK|$OTHER|$MPI_PROFILE_VAR|$LD_LIBRARY_PATH"
    script = f'cat /opt/hostmpi/marker; echo "{values}"; ls -d /dev/shm'
    env = {"SLURM_PROCID": "3", "PMIX_RANK": "3", "OTHER": "dropped"}
    res = _run("exec", "--cleanenv", "--mpi", str(mpi_profile), str(images.sif), "sh", "-c", script, env=env)
    assert res.returncode == 0, res.stderr
    marker, values, shm = res.stdout.splitlines()
    assert marker == "host mpi" and shm == "/dev/shm"
    procid, rank, other, var, ld = values.split("|")
    assert (procid, rank, other, var) == ("3", "3", "", "x y")
    assert ld.startswith("/opt/hostmpi/lib:") and ld.endswith("/.singularity.d/libs")
    # host libpmix 2.3 is older than the container's 2.9: warned before launch
    assert "not ABI-compatible" in res.stderr and "libpmix.so.2.9.3" in res.stderr


def test_mpi_partition_default(images, mpi_profile, pub_tmp):
    conf = pub_tmp / "mpi.toml"
    conf.write_text(f'[mpi.partition_defaults]\ndebug = "{mpi_profile}"\n')
    env = {"HPCSIF_CONFIG": str(conf), "SLURM_JOB_PARTITION": "debug"}
    res = _run("exec", str(images.sif), "cat", "/opt/hostmpi/marker", env=env)
    assert res.stdout == "host mpi\n", res.stderr
    env["SLURM_JOB_PARTITION"] = "other"
    assert _run("exec", str(images.sif), "cat", "/opt/hostmpi/marker", env=env).returncode != 0


def test_unknown_mpi_profile(images):
    res = _run("exec", "--mpi", "nosuchmpi", str(images.sif), "true")
    assert res.returncode != 0 and "unknown MPI profile 'nosuchmpi'" in res.stderr and "openmpi" in res.stderr


def test_apptainer_command_line(images, mpi_profile):
    from hpcsif.engine.apptainer import ApptainerEngine
    from hpcsif.engine.base import LaunchOptions

    eng = ApptainerEngine("apptainer")
    if not eng.find_program("apptainer"):
        pytest.skip("Apptainer is not installed")
    opts = LaunchOptions(
        action="exec",
        command=["echo", "a b"],
        binds=["/tmp:/data:ro"],
        pwd="/data",
        cleanenv=True,
        env=["A=1 2"],
        nv=True,
        mpi=str(mpi_profile),
        writable_tmpfs=True,
    )
    cmd = eng.command_line(images.sif, opts)
    assert cmd[1] == "exec" and cmd[-3:] == [str(images.sif), "echo", "a b"]
    joined = " ".join(cmd)
    for part in (
        "--bind /tmp:/data:ro",
        "--pwd /data",
        "--cleanenv",
        "--nv",
        "--writable-tmpfs",
        "--env A=1 2",
        "--env MPI_PROFILE_VAR=x y",
        ":/opt/hostmpi:ro",
    ):
        assert part in joined


@pytest.mark.peer
def test_apptainer_engine_runs(images, apptainer):
    # the peer wrapper runs Apptainer in a chroot that sees only the paths it is told about
    env = {"PEER_SID_BINDS": str(images.base)}
    script = 'echo "$X|$GREETING"; exit 42'
    res = _run(
        "exec", "--engine", "apptainer", "--env", "X=a b", str(images.sif), "sh", "-c", script, env=env
    )
    assert res.returncode == 42, res.stderr
    assert res.stdout.strip().endswith("a b|hello world")
    assert not fuse_mounts()


def test_rocm_devices(images, pub_tmp, fake_driver):
    dev = pub_tmp / "rocmdev"
    (dev / "dri").mkdir(parents=True)
    (dev / "dri/renderD128").write_text("")
    (dev / "kfd").write_text("")
    conf = pub_tmp / "rocm.toml"
    conf.write_text(fake_driver.read_text().replace(str(pub_tmp / "dev"), str(dev)))
    res = _run("exec", "--rocm", str(images.sif), "ls", "/dev", "/dev/dri", env={"HPCSIF_CONFIG": str(conf)})
    assert res.returncode == 0, res.stderr
    assert "kfd" in res.stdout.split() and "renderD128" in res.stdout.split()
    assert "no driver libraries found" in res.stderr  # the fake tree has no ROCm libraries
