"""An ordinary Debian 12 image, used the way a user does on day one, as root and as a user.

The image is made once per module from this host's own Debian packages (bash, coreutils,
python3 with ssl, sqlite3, venv and pip …), laid out as ``docker build`` leaves a Debian image:
merged ``/usr``, no ``/etc/hosts`` (Docker adds one at run time), ``LANG=C.UTF-8``,
``CMD ["bash"]``. It is converted with ``hpcsif build … oci-archive://…`` as a user would,
under /tmp so that Apptainer (``peer-apptainer`` runs in a chroot that sees /tmp) can run the
same SIF; where it is installed, root's results are compared with its own.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcsif.image.compose import ImageSpec, write_oci_layout
from tests.conftest import peer_apptainer
from tests.engine.conftest import as_user, fuse_mounts, hpcsif_cmd, need_tools

pytestmark = pytest.mark.slow

#: the packages of a small Debian image with Python, where this host has them installed
PACKAGES = (
    "base-files",
    "base-passwd",
    "libc6",
    "libc-bin",
    "bash",
    "dash",
    "coreutils",
    "sed",
    "grep",
    "python3-minimal",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3.11",
    "python3",
    "python3.11-venv",
    "python3-venv",
    "python3-pip",
    "python3-pip-whl",
    "python3-setuptools-whl",
)
#: what a user of the image never runs (keeps the image small and the build fast)
LEFT_OUT = (
    "/usr/share/doc/",
    "/usr/share/man/",
    "/usr/share/locale/",
    "/usr/share/info/",
    "/usr/share/lintian/",
)
LEFT_OUT_PARTS = ("/test/", "/tests/", "/idlelib/", "/tkinter/", "/turtledemo/", "/config-3.")
#: the merged-/usr links of a Debian 12 root file system
MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]


@dataclass
class Debian:
    """The converted image and a world-writable scratch directory beside it."""

    sif: Path
    base: Path
    has_pip: bool


def _installed(packages: tuple[str, ...]) -> list[str]:
    fmt = "${Package} ${Status}\n"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt, *packages], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.endswith("install ok installed")]


def _package_files(packages: list[str]) -> set[str]:
    """The regular files and links of *packages* on this host, at their merged-/usr paths."""
    out = subprocess.run(["dpkg", "-L", *packages], capture_output=True, text=True).stdout
    files = set()
    for line in out.splitlines():
        path = os.path.join(os.path.realpath(os.path.dirname(line)), os.path.basename(line))
        if line.startswith(LEFT_OUT) or any(p in path for p in LEFT_OUT_PARTS):
            continue
        if os.path.islink(path) or os.path.isfile(path):
            files.add(path)
            cached = Path(path).parent / "__pycache__" / (Path(path).stem + ".cpython-311.pyc")
            if path.endswith(".py") and cached.is_file():
                files.add(str(cached))  # compiled once here, as the image's installer would
    return files


def _libraries(files: set[str]) -> set[str]:
    """The shared libraries the ELF files among *files* load, with the links naming them."""
    libs: set[str] = set()
    elves = [f for f in files if not os.path.islink(f) and Path(f).read_bytes()[:4] == b"\x7fELF"]
    out = subprocess.run(["ldd", *elves], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "=> /" in line:
            named = line.split("=> ")[1].split(" (")[0]
            libs.add(os.path.join(os.path.realpath(os.path.dirname(named)), os.path.basename(named)))
            libs.add(os.path.realpath(named))
    return libs


def _root_tar(files: set[str]) -> bytes:
    """One layer: the files with their directories, merged-/usr links, a Docker image's /etc."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_text(name: str, text: str) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))

        for name, target in MERGED.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for d in ("etc", "home", "opt", "usr/local/bin", "var/lib", "run", "proc", "sys", "dev", "mnt"):
            add_dir(d)
        add_dir("root", 0o700)
        add_dir("tmp", 0o1777)
        add_dir("var/tmp", 0o1777)
        dirs = {str(Path(f).parent) for f in files}
        for d in sorted({p for parent in dirs for p in [parent, *map(str, Path(parent).parents)]} - {"/"}):
            add_dir(d.lstrip("/"))
        for f in sorted(files):
            info = tar.gettarinfo(f, arcname=f.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                with open(f, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
        add_text("etc/passwd", Path("/usr/share/base-passwd/passwd.master").read_text())
        add_text("etc/group", Path("/usr/share/base-passwd/group.master").read_text())
        add_text("etc/issue", "Debian GNU/Linux 12 \\n \\l\n\n")
        add_text("etc/motd", "\nThe programs included with the Debian GNU/Linux system are free software.\n")
    return raw.getvalue()


@pytest.fixture(scope="module")
def debian() -> Iterator[Debian]:
    """The Debian image as a SIF, built with ``hpcsif build`` from an OCI archive."""
    need_tools()
    if not shutil.which("fuse-overlayfs"):
        pytest.skip("fuse-overlayfs is not installed")
    packages = _installed(PACKAGES)
    if "libpython3.11-stdlib" not in packages or "bash" not in packages:
        pytest.skip("this host has no Debian python3.11 to make the image from")
    # under /tmp for the peer, and readable by the test user (pytest's tmp_path is root's alone)
    base = Path(tempfile.mkdtemp(prefix="hpcsif-debian-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield _build(base, packages)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _build(base: Path, packages: list[str]) -> Debian:
    files = _package_files(packages)
    files |= _libraries(files)
    layout = base / "layout"
    write_oci_layout(layout, ImageSpec([_root_tar(files)], cmd=["bash"], env=ENV), compress="none")
    archive = base / "debian.oci.tar"
    with tarfile.open(archive, "w") as tar:  # no ./ prefix: Apptainer's reader wants none
        for entry in sorted(os.listdir(layout)):
            tar.add(layout / entry, arcname=entry)
    shutil.rmtree(layout)
    sif = base / "debian.sif"
    res = subprocess.run(
        hpcsif_cmd("build", str(sif), f"oci-archive://{archive}"),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HPCSIF_CACHEDIR": str(base / "cache")},
    )
    assert res.returncode == 0, res.stderr
    archive.unlink()
    sif.chmod(0o644)
    return Debian(sif, base, "python3-pip" in packages and "python3.11-venv" in packages)


@pytest.fixture(params=["root", "user"])
def hpcsif(request, debian: Debian):
    """``hpcsif(*args, cwd=…)``: hpcsif as root or as the unprivileged test user."""
    user = request.getfixturevalue("unpriv_user") if request.param == "user" else None

    def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd, env = hpcsif_cmd(*args), {**os.environ}
        if user is not None:
            cmd, env = as_user(user, cmd)
        return subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=cwd or debian.base, timeout=120
        )

    _run.user = user
    yield _run
    assert not fuse_mounts(), "a mount was left behind"


def peer(
    debian: Debian, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str] | None:
    """The same command with Apptainer as root on the same SIF, None without it."""
    exe = peer_apptainer()
    if exe is None:
        return None
    env = {**os.environ, "APPTAINER_CACHEDIR": str(debian.base / "peer-cache"), **(env or {})}
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=debian.base, timeout=120)


def scratch(debian: Debian, name: str, owner) -> Path:
    """A fresh directory under the module's base, owned by whoever runs the test's hpcsif."""
    d = debian.base / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    if owner is not None:
        os.chown(d, owner.uid, owner.gid)
    return d


def test_day_one(hpcsif, debian: Debian) -> None:
    """Who and where one is, the locale and the standard library's native parts."""
    script = (
        "id -un; echo $HOME $PWD; umask; echo $LANG; getent passwd $(id -u) | cut -d: -f1,6;"
        "python3 -c 'import ssl, sqlite3, venv, multiprocessing, sys;"
        'print(sqlite3.connect(":memory:").execute("select 6*7").fetchone()[0], sys.stdout.encoding)\''
    )
    res = hpcsif("exec", str(debian.sif), "bash", "-c", script)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    name = hpcsif.user.name if hpcsif.user else "root"
    home = hpcsif.user.home if hpcsif.user else "/root"
    assert res.stdout.splitlines() == [
        name,
        f"{home} {debian.base}",
        "0022",
        "C.UTF-8",
        f"{name}:{home}",
        "42 utf-8",
    ]
    if hpcsif.user is None and (theirs := peer(debian, "exec", str(debian.sif), "bash", "-c", script)):
        assert (theirs.returncode, theirs.stdout) == (0, res.stdout)


def test_multiprocessing_with_shared_memory_semaphores(hpcsif, debian: Debian) -> None:
    """A process pool, POSIX semaphores and shared memory in /dev/shm work in the container."""
    script = (
        "import multiprocessing as mp\n"
        "from multiprocessing import shared_memory\n"
        "with mp.get_context('fork').Pool(2) as pool: print(sum(pool.map(abs, range(-10, 0))))\n"
        "s = mp.Semaphore(2); s.acquire(); print(s.get_value())\n"
        "m = shared_memory.SharedMemory(create=True, size=8); m.buf[0] = 7; print(m.buf[0])\n"
        "m.close(); m.unlink()\n"
    )
    res = hpcsif("exec", str(debian.sif), "python3", "-c", script)
    assert (res.returncode, res.stdout) == (0, "55\n1\n7\n"), res.stderr


def test_writable_tmpfs_changes_the_images_files(hpcsif, debian: Debian) -> None:
    """--writable-tmpfs: files of the image (root's) can be made, edited in place, renamed over
    and removed, by a user too, as in Apptainer; so can the files it adds (/etc/hosts, /etc/passwd);
    the changes go with the container."""
    script = (
        "touch /usr/x && stat -c %U /usr/x && sed -i s/Debian/Deb/ /etc/issue && head -c 3 /etc/issue && echo"
        " && rm /etc/motd && mv /usr/x /etc/y && ls /etc/motd /etc/y 2>&1; getent hosts localhost | wc -l"
    )
    # (not compared with Apptainer: as root its /etc/hosts there is the host's own, and writable)
    added = (
        "; echo '127.0.0.2 myhost' >> /etc/hosts && getent hosts myhost"
        " && echo 'x:x:5:5::/:/bin/sh' >> /etc/passwd && getent passwd x"
    )
    res = hpcsif("exec", "--writable-tmpfs", str(debian.sif), "sh", "-c", script + added)
    name = hpcsif.user.name if hpcsif.user else "root"
    expected = f"{name}\nDeb\nls: cannot access '/etc/motd': No such file or directory\n/etc/y\n1\n"
    assert (res.returncode, res.stdout, res.stderr) == (
        0,
        expected + "127.0.0.2       myhost\nx:x:5:5::/:/bin/sh\n",
        "",
    )
    assert "myhost" not in Path("/etc/hosts").read_text()
    res = hpcsif(
        "exec", str(debian.sif), "sh", "-c", "head -c 6 /etc/issue; ls /etc/motd; getent hosts myhost"
    )
    assert res.stdout == "Debian/etc/motd\n" and res.returncode != 0  # nothing kept
    if hpcsif.user is None and (
        theirs := peer(debian, "exec", "--writable-tmpfs", str(debian.sif), "sh", "-c", script)
    ):
        assert (theirs.returncode, theirs.stdout) == (0, expected)


def test_persistent_overlay_keeps_only_what_the_user_wrote(hpcsif, debian: Debian) -> None:
    """--overlay DIR: the default files (/etc/hosts …) are there without a warning, what is written
    anywhere (/, /etc) is kept in DIR, and no mount point lands in it, as in Apptainer."""
    overlay = scratch(debian, f"overlay-{'user' if hpcsif.user else 'root'}", hpcsif.user)
    bound = scratch(debian, f"bound-{'user' if hpcsif.user else 'root'}", hpcsif.user)
    script = "getent hosts localhost | wc -l; echo 1 > /kept; echo 2 > /etc/kept; ls /data"
    args = ["--overlay", str(overlay), "-B", f"{bound}:/data", str(debian.sif)]
    res = hpcsif("exec", *args, "sh", "-c", script)
    assert (res.returncode, res.stdout, res.stderr) == (0, "1\n", "")
    found = sorted(str(p.relative_to(overlay)) for p in overlay.rglob("*"))
    assert found == ["upper", "upper/etc", "upper/etc/kept", "upper/kept", "work", "work/work"]
    res = hpcsif("exec", "--overlay", str(overlay), str(debian.sif), "cat", "/kept", "/etc/kept")
    assert (res.returncode, res.stdout) == (0, "1\n2\n"), res.stderr


def test_venv_and_pip_install_user(debian: Debian, unpriv_user) -> None:
    """A user's venv in the (bound) current directory, and ``pip install --user`` of a local
    wheel into the home directory."""
    if not debian.has_pip:
        pytest.skip("this host has no python3-pip and python3.11-venv to put in the image")
    work = scratch(debian, "work", unpriv_user)
    wheel = work / "hello8-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.writestr("hello8.py", "def hi():\n    print('hello8')\n")
        info = "hello8-1.0.dist-info/"
        whl.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: hello8\nVersion: 1.0\n")
        whl.writestr(
            info + "WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(info + "entry_points.txt", "[console_scripts]\nhello8 = hello8:hi\n")
        whl.writestr(info + "RECORD", "")
    wheel.chmod(0o644)
    script = (
        "python3 -m venv ./venv && ./venv/bin/pip --version | cut -d' ' -f1 && "
        f"pip install -q --user --no-index --break-system-packages {wheel.name} && ~/.local/bin/hello8"
    )
    cmd, env = as_user(
        unpriv_user, hpcsif_cmd("exec", "--home", str(work), str(debian.sif), "sh", "-c", script)
    )
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert (res.returncode, res.stdout) == (0, "pip\nhello8\n"), res.stderr
    assert (work / "venv/bin/python").is_symlink() and (work / ".local/bin/hello8").is_file()


@pytest.mark.parametrize(
    ("variables", "flags", "path"),
    [
        # a PATH of the user's own is the whole PATH: PREPEND_PATH and APPEND_PATH are not added
        ({"APPTAINERENV_PREPEND_PATH": "/pre"}, ["--env", "PATH=/opt/p:/bin"], "/opt/p:/bin"),
        ({"APPTAINERENV_APPEND_PATH": "/app"}, ["--env", "PATH=$PATH:/x"], ENV[0][5:] + ":/x"),
        ({"APPTAINERENV_PATH": "/q:/bin", "SINGULARITYENV_APPEND_PATH": "/app"}, [], "/q:/bin"),
        ({"APPTAINERENV_APPEND_PATH": "/app"}, ["--env", "PREPEND_PATH=/p2"], f"/p2:{ENV[0][5:]}:/app"),
    ],
)
def test_path_settings(debian: Debian, variables: dict[str, str], flags: list[str], path: str) -> None:
    """APPTAINERENV_/SINGULARITYENV_ and --env settings of PATH combine as in Apptainer."""
    args = ["exec", *flags, str(debian.sif), "sh", "-c", "echo $PATH"]
    res = subprocess.run(hpcsif_cmd(*args), capture_output=True, text=True, env={**os.environ, **variables})
    assert (res.returncode, res.stdout) == (0, path + "\n"), res.stderr
    if theirs := peer(debian, *args, env=variables):
        assert (theirs.returncode, theirs.stdout) == (0, path + "\n"), theirs.stderr


def test_warning_names_apptainers_path_setting(debian: Debian) -> None:
    variables = {"SINGULARITYENV_PREPEND_PATH": "/a", "APPTAINERENV_PREPEND_PATH": "/b"}
    res = subprocess.run(
        hpcsif_cmd("exec", str(debian.sif), "true"),
        capture_output=True,
        text=True,
        env={**os.environ, **variables},
    )
    expected = (
        "WARNING: Skipping environment variable [SINGULARITYENV_PREPEND_PATH=/a], "
        "SING_USER_DEFINED_PREPEND_PATH is already overridden with different value [/b]"
    )
    assert res.returncode == 0 and expected in res.stderr.splitlines(), res.stderr


def test_group_file_names_every_group_of_the_user(debian: Debian, unpriv_user) -> None:
    """/etc/group keeps the image's lines and adds one for each of the user's groups, supplementary
    ones too, as Apptainer's (a tool looking up its groups by name finds them)."""
    cmd, env = as_user(unpriv_user, hpcsif_cmd("exec", str(debian.sif), "cat", "/etc/group"))
    # the user in the groups users (100) and nogroup (65534) besides its own
    cmd = [c.replace("--init-groups", "--groups=100,65534") for c in cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=debian.base, timeout=60)
    lines = res.stdout.splitlines()
    name, gid = unpriv_user.name, unpriv_user.gid
    assert lines[-3:] == [f"users:x:100:{name}", f"nogroup:x:65534:{name}", f"{name}:x:{gid}:{name}"]
    image = Path("/usr/share/base-passwd/group.master").read_text().splitlines()
    assert lines[:-3] == image, res.stderr
