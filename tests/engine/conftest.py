"""Fixtures for the engine tests: a converted-style busybox SIF, an unprivileged user, helpers.

The SIF is built the way the converter lays an image out (a busybox-static root file system,
the ``/.singularity.d`` tree from :mod:`hpcsif.sif.metadata`, ``mksquashfs`` and
:func:`hpcsif.sif.writer.write_sif`), in a world-readable directory so that the unprivileged
test user can run it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services.images import busybox_binary
from tests.services.users import USER_PYTHON, TestUser, unpriv_user  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world", "IMGVAR=image default"]
ENTRYPOINT = ["/bin/printf", "<%s>\\n"]
CMD = ["default cmd"]


def need_tools() -> None:
    """Skip unless the host programs of the bwrap engine exist."""
    for tool in ("bwrap", "squashfuse", "mksquashfs", "fusermount3"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")


def build_rootfs(dest: Path) -> None:
    """A busybox root file system with every applet and the /.singularity.d tree."""
    for d in ("bin", "etc", "tmp", "var/tmp", "home", "root", "proc", "sys", "dev", "usr/bin", "opt"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    shutil.copy2(busybox_binary(), dest / "bin/busybox")
    out = subprocess.run([str(dest / "bin/busybox"), "--list"], capture_output=True, text=True, check=True)
    for applet in out.stdout.split():
        if applet != "busybox":
            (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (dest / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (dest / "etc/hosts").write_text("")
    (dest / "etc/resolv.conf").write_text("")
    add_metadata(
        dest,
        {"Env": ENV, "Entrypoint": ENTRYPOINT, "Cmd": CMD},
        test="#!/bin/sh\necho image test ran\nexit 3\n",
    )
    app = dest / "scif/apps/hello/scif"
    (app / "env").mkdir(parents=True)
    (app / "env/90-environment.sh").write_text('export APPVAR="${APPVAR:-app value}"\n')
    (app / "runscript").write_text('#!/bin/sh\necho "app hello: $APPVAR $*"\n')
    (app / "runscript").chmod(0o755)
    lib = dest / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (lib / "libpmix.so.2.9.3").write_bytes(b"")  # for the MPI ABI check
    (lib / "libpmix.so.2").symlink_to("libpmix.so.2.9.3")


def add_metadata(dest: Path, config: dict, test: str | None = None) -> None:
    """Lay the converter's /.singularity.d tree for an image *config* over the root *dest*."""
    from hpcsif.sif import metadata

    meta = metadata.for_image({"config": config}, bootstrap="oci", source="tests", arch="amd64")
    meta.test = test
    for f in meta.files():
        path = dest / f.path.lstrip("/")
        if f.data is None and f.symlink is None:
            path.mkdir(parents=True, exist_ok=True)
        elif f.symlink is not None:
            path.symlink_to(f.symlink)
        else:
            path.write_bytes(f.data)
            path.chmod(f.mode)


def make_sif(rootfs: Path, dest: Path, *, all_root: bool = True) -> Path:
    """squashfs (zstd) of *rootfs* as the primary partition of a new SIF at *dest*."""
    from hpcsif.sif.format import DataType, FSType, PartType
    from hpcsif.sif.writer import ObjectSpec, write_sif

    sqfs = dest.with_suffix(".sqfs")
    cmd = ["mksquashfs", str(rootfs), str(sqfs), "-noappend", "-quiet", "-comp", "zstd", "-no-progress"]
    subprocess.run(cmd + (["-all-root"] if all_root else []), check=True)
    write_sif(
        dest, [ObjectSpec(DataType.PARTITION, path=sqfs, fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS)]
    )
    sqfs.unlink()
    return dest


@dataclass
class Images:
    """The test images: a SIF and the same tree as a sandbox directory."""

    sif: Path
    sandbox: Path
    base: Path


@pytest.fixture(scope="session")
def session_base() -> Iterator[Path]:
    """A world-readable scratch directory for the session (removed afterwards)."""
    base = Path(tempfile.mkdtemp(prefix="hpcsif-engine-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def images(session_base: Path) -> Images:
    """Busybox SIF + sandbox in a world-readable directory."""
    need_tools()
    sandbox = session_base / "sandbox"
    build_rootfs(sandbox)
    return Images(make_sif(sandbox, session_base / "busybox.sif"), sandbox, session_base)


def hpcsif_cmd(*args: str) -> list[str]:
    """The command line of ``hpcsif ARGS…`` (run as a separate process)."""
    return [sys.executable, "-m", "hpcsif.cli.main", *args]


#: per-session runtime directories (mount points), so that tests never see each other's mounts
RUNTIME: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _runtime_dir(session_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root's hpcsif processes in these tests mount under the session's own runtime directory."""
    if "root" not in RUNTIME:
        RUNTIME["root"] = session_base / "run-root"
        RUNTIME["root"].mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(RUNTIME["root"]))


def as_user(user: TestUser, cmd: list[str]) -> tuple[list[str], dict[str, str]]:
    """*cmd* run as *user* (setpriv) with Debian's python3 (root's interpreter is not readable)."""
    if cmd[0] == sys.executable:
        cmd = [USER_PYTHON, *cmd[1:]]
    env = user.env({"PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(_user_runtime(user))})
    return user.command(cmd), env


def _user_runtime(user: TestUser) -> Path:
    if "user" not in RUNTIME:
        RUNTIME["user"] = RUNTIME["root"].parent / "run-user"
        RUNTIME["user"].mkdir(mode=0o700)
        os.chown(RUNTIME["user"], user.uid, user.gid)
    return RUNTIME["user"]


@pytest.fixture
def img_dir(images) -> Path:
    """A fresh directory for images, readable by the test user, writable by root only (the
    engine refuses an image another user could replace)."""
    d = Path(tempfile.mkdtemp(dir=images.base))
    d.chmod(0o755)
    return d


def ext3_image(tree: Path, dest: Path, size_mb: int = 8, kind: str = "ext3") -> Path:
    """An ext3 (or *kind*) file system image of *tree* at *dest*."""
    with open(dest, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run([f"mkfs.{kind}", "-q", "-F", "-d", str(tree), str(dest)], check=True)
    dest.chmod(0o644)
    return dest


def fuse_mounts() -> list[str]:
    """Lines of /proc/mounts for FUSE mounts under this session's runtime directories."""
    with open("/proc/mounts") as f:
        return [ln for ln in f if any(f" {d}/" in ln for d in RUNTIME.values())]


def hpcsif_processes() -> list[str]:
    """Live (non-zombie) squashfuse, bwrap, fuse-overlayfs and watchdog processes of this session."""
    # (-ww: a long command line is not cut at the terminal's width, which hid daemons)
    out = subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines()[1:]:
        _pid, st, args = line.split(None, 2)
        if "Z" in st:
            continue
        ours = any(str(d) in args for d in RUNTIME.values())
        program = os.path.basename(args.split()[0])
        if ours and (
            program.startswith(("squashfuse", "bwrap", "fuse-overlayfs", "hpcsif-mount-watchdog"))
            or "hpcsif.engine.mounts" in args
        ):
            found.append(line)
    return found


def left_behind(seconds: float = 10) -> list[str]:
    """The mounts and processes still there after up to *seconds*: a watchdog notices the unmount
    and ends a moment after the last container, not at once."""
    deadline = time.monotonic() + seconds
    while (fuse_mounts() or hpcsif_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [*fuse_mounts(), *hpcsif_processes()]


def catch_child(parent: int, comm: str, *, stop: bool = True, seconds: float = 60) -> int:
    """The child of *parent* running *comm*, as soon as it is seen, stopped (SIGSTOP) unless
    *stop* is false; 0 if *parent* ended first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{parent}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return 0
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = f.read().split()
        except OSError:
            return 0
        for child in children:
            try:
                with open(f"/proc/{child}/comm") as f:
                    if f.read().strip() != comm:
                        continue
            except OSError:
                continue
            if stop:
                os.kill(int(child), signal.SIGSTOP)
            return int(child)
    return 0


@pytest.fixture(params=["root", "user"])
def run(request, images):
    """``run(*args, **kw)``: hpcsif as root or as the unprivileged test user; checks cleanup after."""
    user = request.getfixturevalue("unpriv_user") if request.param == "user" else None

    def _run(*args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 60):
        cmd = hpcsif_cmd(*args)
        if user is None:
            full_env = {**os.environ, **(env or {})}
            return subprocess.run(
                cmd, capture_output=True, text=True, input=stdin, env=full_env, timeout=timeout
            )
        cmd, base_env = as_user(user, cmd)
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            input=stdin,
            env={**base_env, **(env or {})},
            timeout=timeout,
            cwd=user.home,
        )

    _run.user = user
    yield _run
    assert not fuse_mounts(), "a mount was left behind"


@pytest.fixture
def pub_tmp(images: Images) -> Path:
    """A fresh directory every test user can read and write (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(dir=images.base))
    d.chmod(0o777)
    return d


MPI_PACKAGES = ("openmpi-bin", "python3-mpi4py")
MPI_IMAGES = Path("/var/tmp/hpcsif-test-images")


@pytest.fixture(scope="session")
def openmpi_sif() -> Path:
    """Debian bookworm (minbase) with Open MPI and mpi4py as a SIF, built once per machine.

    debootstrap from ``$HPCSIF_TEST_DEBIAN_MIRROR`` (default deb.debian.org) takes a minute or
    two; the SIF is kept in /var/tmp/hpcsif-test-images keyed by the package list.
    """
    import fcntl
    import hashlib

    key = hashlib.sha256(" ".join(MPI_PACKAGES).encode()).hexdigest()[:12]
    sif = MPI_IMAGES / f"openmpi-bookworm-{key}.sif"
    MPI_IMAGES.mkdir(mode=0o755, exist_ok=True)
    with open(MPI_IMAGES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per machine
        if sif.exists():
            return sif
        if not shutil.which("debootstrap") or os.geteuid() != 0:
            pytest.skip("building the Open MPI image needs root and debootstrap")
        root = MPI_IMAGES / f"rootfs-{key}"
        shutil.rmtree(root, ignore_errors=True)
        mirror = os.environ.get("HPCSIF_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(MPI_PACKAGES)}",
            "bookworm",
            str(root),
            mirror,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if res.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip(f"debootstrap failed (no Debian mirror?): {res.stdout.strip().splitlines()[-1:]}")
        try:
            add_metadata(root, {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]})
            tmp = make_sif(root, sif.with_suffix(".tmp"), all_root=False)
            tmp.rename(sif)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return sif


@pytest.fixture
def fake_driver(pub_tmp: Path) -> Path:
    """A driver root with real ELF libraries registered in its own ld.so.cache, a program and devices."""
    if not shutil.which("gcc") or os.geteuid() != 0:
        pytest.skip("needs gcc and root (ldconfig -r)")
    root = pub_tmp / "driver"
    libdir = root / "usr/lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    src = pub_tmp / "empty.c"
    src.write_text("int hpcsif_fake(void) { return 1; }\n")
    for soname, real in [
        ("libcuda.so.1", "libcuda.so.535.104.05"),
        ("libnvidia-ml.so.1", "libnvidia-ml.so.535.104.05"),
        ("libunrelated.so.1", "libunrelated.so.1.0"),
    ]:
        subprocess.run(
            ["gcc", "-shared", f"-Wl,-soname,{soname}", "-o", str(libdir / real), str(src)], check=True
        )
    (root / "etc").mkdir()
    (root / "etc/ld.so.conf").write_text("/usr/lib/x86_64-linux-gnu\n")
    subprocess.run(["ldconfig", "-r", str(root)], check=True)
    (root / "usr/bin").mkdir()
    smi = root / "usr/bin/nvidia-smi"
    smi.write_text("#!/bin/sh\necho fake nvidia-smi\n")
    smi.chmod(0o755)
    dev = pub_tmp / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "unrelated"):
        (dev / name).write_text(name)
    conf = pub_tmp / "hpcsif.toml"
    conf.write_text(f'[gpu]\ndriver_root = "{root}"\ndev_dir = "{dev}"\n')
    return conf
