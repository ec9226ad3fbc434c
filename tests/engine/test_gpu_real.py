"""``--nv`` on a real NVIDIA GPU: the driver that ``--nv`` binds in runs CUDA work in the container.

Skipped where there is no GPU (CI has none); run on a GPU node (the note of each session that had
one says where and what it printed). The image is made here from busybox, a small C program
(``cudacheck.c``: the CUDA driver API loaded at run time, a PTX kernel the driver compiles) and the
host's C library; it carries no CUDA toolkit: everything CUDA comes from ``--nv``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.engine.conftest import as_user, build_rootfs, fuse_mounts, hpcsif_cmd, make_sif

pytestmark = [pytest.mark.slow, pytest.mark.gpu]

HERE = Path(__file__).resolve().parent


def _driver_present() -> bool:
    if not os.path.exists("/dev/nvidiactl") or not shutil.which("ldconfig"):
        return False
    cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    return "libcuda.so.1 " in cache


#: the C library's parts a driver library needs besides libc itself (as any real image has them)
GLIBC_PARTS = ("libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1")


@pytest.fixture(scope="module")
def cuda_sif(session_base: Path) -> Path:
    """A busybox SIF with ``cudacheck`` and the host's C library, readable by the test user."""
    if not _driver_present():
        pytest.skip("no NVIDIA GPU and driver here (/dev/nvidiactl, libcuda.so.1 in ldconfig -p)")
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    tree = session_base / "gpu-tree"
    build_rootfs(tree)
    program = tree / "usr/bin/cudacheck"
    subprocess.run(["gcc", "-O2", "-o", str(program), str(HERE / "cudacheck.c"), "-ldl"], check=True)
    ldd = subprocess.run(["ldd", str(program)], capture_output=True, text=True, check=True).stdout
    paths = [w for line in ldd.splitlines() for w in line.split() if w.startswith("/")]
    libdir = next(os.path.dirname(p) for p in paths if os.path.basename(p) == "libc.so.6")
    for path in [*paths, *(os.path.join(libdir, n) for n in GLIBC_PARTS)]:
        if os.path.exists(path):
            dest = tree / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dest)
    return make_sif(tree, session_base / "cuda.sif")


def _exec(cmd: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env or os.environ, **kw)


def test_nv_runs_a_kernel(cuda_sif: Path) -> None:
    """The driver library comes from ``/.singularity.d/libs`` and a kernel computes right."""
    res = _exec(hpcsif_cmd("exec", "--nv", str(cuda_sif), "cudacheck"))
    assert res.returncode == 0, res.stderr
    assert "libcuda loaded from /.singularity.d/libs/libcuda.so.1\n" in res.stdout
    assert res.stdout.endswith("(PTX JIT-compiled by the driver): correct\n")
    assert not fuse_mounts()


def test_without_nv_there_is_no_driver(cuda_sif: Path) -> None:
    res = _exec(hpcsif_cmd("exec", str(cuda_sif), "cudacheck"))
    assert res.returncode == 2
    assert "libcuda.so.1: cannot open shared object file" in res.stderr


def test_nvidia_smi_in_the_container(cuda_sif: Path) -> None:
    """The host's nvidia-smi, bound in, lists the GPU the host lists."""
    if not shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is not on PATH")
    host = _exec(["nvidia-smi", "-L"]).stdout
    res = _exec(hpcsif_cmd("exec", "--nv", str(cuda_sif), "nvidia-smi", "-L"))
    assert (res.returncode, res.stdout) == (0, host), res.stderr
    assert host.startswith("GPU 0: ")


def test_nv_as_a_user(cuda_sif: Path, unpriv_user) -> None:
    """An unprivileged user (user namespace, squashfuse) gets the GPU too."""
    cmd, env = as_user(unpriv_user, hpcsif_cmd("exec", "--nv", str(cuda_sif), "cudacheck"))
    res = _exec(cmd, env=env, cwd=unpriv_user.home)
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("correct\n")
