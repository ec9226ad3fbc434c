"""Images whose own content is hostile at run time: links at mount destinations, odd files.

bwrap resolves a destination's symbolic links while the host is still reachable at
``/oldroot``; the engine hands it destinations with the image's links already followed inside
the image, so that nothing is created or mounted on the host. Each image is a sandbox laid out
as the converter lays one (the SIF path shares the code after the squashfuse mount; one case
runs as a SIF too), run as root and as the unprivileged test user.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import error_lines
from tests.engine.conftest import Images, build_rootfs, catch_child, hpcsif_cmd, left_behind, make_sif

pytestmark = pytest.mark.slow


def _relink(root: Path, inner: str, target: str) -> None:
    """Replace the image's *inner* path by a symbolic link to *target*."""
    path = root / inner.lstrip("/")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


@pytest.fixture(scope="module")
def hostile(images: Images) -> Callable[[str, Callable[[Path], None]], Path]:
    """``hostile(name, change)``: a world-readable busybox sandbox altered by *change*."""
    made: dict[str, Path] = {}

    def _make(name: str, change: Callable[[Path], None]) -> Path:
        if name not in made:
            root = images.base / f"hostile-{name}"
            build_rootfs(root)
            change(root)
            made[name] = root
        return made[name]

    return _make


@pytest.fixture
def host_dir(images: Images) -> Path:
    """An empty host directory anyone may write to: an image link must never put a file here."""
    d = images.base / "host-target"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    d.chmod(0o777)
    return d


@pytest.mark.parametrize("how", ["oldroot", "dotdot", "host-path"])
def test_etc_linked_to_a_host_directory_writes_nothing_there(run, hostile, host_dir: Path, how: str) -> None:
    # /oldroot/… is where bwrap sees the host while it sets the container up; a .. chain
    # climbs from /newroot to it; a plain host path lies in the bound /var/tmp
    target = {
        "oldroot": f"/oldroot{host_dir}",
        "dotdot": "../" * 8 + f"oldroot{host_dir}",
        "host-path": str(host_dir),
    }[how]
    image = hostile(f"etc-{how}", lambda root: _relink(root, "/etc", target))
    res = run("exec", str(image), "/bin/echo", "started")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "started\n"
    assert "Traceback" not in res.stderr and "bwrap" not in res.stderr
    assert os.listdir(host_dir) == []
    ps = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    assert not [ln for ln in ps.splitlines() if ln.endswith("sleep 600") and not ln.startswith("Z")]


def test_etc_link_as_sif(run, images: Images, host_dir: Path) -> None:
    root = images.base / "hostile-etc-sif"
    if not root.exists():
        build_rootfs(root)
        _relink(root, "/etc", f"/oldroot{host_dir}")
    sif = images.base / "hostile-etc.sif"
    if not sif.exists():
        make_sif(root, sif)
    res = run("exec", str(sif), "/bin/echo", "started")
    assert (res.returncode, res.stdout) == (0, "started\n"), res.stderr
    assert os.listdir(host_dir) == []
    ps = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    assert not [ln for ln in ps.splitlines() if ln.endswith("sleep 600") and not ln.startswith("Z")]


@pytest.mark.parametrize(
    "name",
    ["etc-file", "etc-loop"],
)
def test_unreachable_etc_skips_its_mounts_as_apptainer(run, hostile, name: str) -> None:
    def change(root: Path) -> None:
        shutil.rmtree(root / "etc")
        if name == "etc-file":
            (root / "etc").write_text("not a directory\n")
        else:
            (root / "etc").symlink_to("/etc2")
            (root / "etc2").symlink_to("/etc")

    res = run("exec", str(hostile(name, change)), "/bin/echo", "started")
    assert (res.returncode, res.stdout) == (0, "started\n"), res.stderr
    lines = error_lines(res.stderr)
    assert "WARNING: passwd file doesn't exist in container, not updating" in lines
    assert "WARNING: Skipping mount /etc/hosts [binds]: /etc/hosts doesn't exist in container" in lines
    assert all(ln.startswith("WARNING:") for ln in lines), lines


def test_odd_top_level_directories_still_start(run, hostile) -> None:
    def change(root: Path) -> None:
        shutil.rmtree(root / "tmp")
        (root / "tmp").write_text("a file where /tmp should be\n")
        _relink(root, "/proc", "/oldroot/proc")
        _relink(root, "/dev", "../../oldroot/dev")
        _relink(root, "/sys", "/sys")  # a loop onto itself
        _relink(root, "/var", "/oldroot/var")

    res = run(
        "exec", str(hostile("top-level", change)), "/bin/sh", "-c", "echo $$; ls /dev/null; test -d /tmp"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1] == "/dev/null"
    assert "bwrap" not in res.stderr


def test_passwd_link_to_a_host_file_is_not_read(run, hostile, images: Images) -> None:
    secret = images.base / "host-secret"
    secret.write_text("SECRET:x:0:0:host only:/:/bin/sh\n")
    secret.chmod(0o644)
    image = hostile("passwd-host", lambda root: _relink(root, "/etc/passwd", str(secret)))
    res = run("exec", str(image), "/bin/cat", "/etc/passwd")
    assert res.returncode == 0, res.stderr
    assert "SECRET" not in res.stdout
    assert res.stdout.strip()  # the caller's own entry


def test_root_missing_from_the_image_passwd_gets_an_entry(run, hostile) -> None:
    image = hostile("no-root", lambda root: (root / "etc/passwd").write_text("daemon:x:1:1::/:/bin/false\n"))
    res = run("exec", str(image), "/bin/id", "-un")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ("root\n" if run.user is None else f"{run.user.name}\n")


def test_shell_that_is_a_link_loop(run, hostile) -> None:
    def change(root: Path) -> None:
        _relink(root, "/bin/sh", "/bin/sh2")
        _relink(root, "/bin/sh2", "/bin/sh")

    image = hostile("sh-loop", change)
    res = run("exec", str(image), "/bin/echo", "started")
    assert (res.returncode, res.stdout) == (0, "started\n"), res.stderr
    res = run("run", str(image))
    assert res.returncode == 255
    assert len(error_lines(res.stderr)) == 1 and res.stderr.startswith("FATAL:   "), res.stderr


def test_runscript_that_is_a_directory_or_not_executable(run, hostile) -> None:
    def as_dir(root: Path) -> None:
        (root / ".singularity.d/runscript").unlink()
        (root / ".singularity.d/runscript").mkdir()

    res = run("run", str(hostile("runscript-dir", as_dir)))
    assert (res.returncode, error_lines(res.stderr)) == (255, ["FATAL:   is a directory"])
    image = hostile("runscript-644", lambda root: (root / ".singularity.d/runscript").chmod(0o644))
    # Apptainer: a runscript that is not executable is none; /bin/sh gets the arguments
    res = run("run", str(image), "-c", "echo from sh")
    assert res.stdout == "from sh\n"
    assert "No runscript found in container, executing /bin/sh" in res.stderr


LABELS = {
    "not-json": "{not json",
    "deep": "[" * 100000 + "]" * 100000,
    "array": '["a"]',
    "number": '{"A": 1, "B": "x"}',
}


# ids, not the texts: pytest puts the test's id into the environment of what it runs
@pytest.mark.parametrize("name", list(LABELS))
def test_labels_that_are_not_a_json_object_of_strings(hostile, name: str) -> None:
    text = LABELS[name]
    image = hostile(
        f"labels-{len(text)}", lambda root: (root / ".singularity.d/labels.json").write_text(text)
    )
    res = subprocess.run(
        [sys.executable, "-m", "hpcsif.cli.main", "inspect", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("WARNING: Unable to parse labels: ") and len(res.stderr.splitlines()) == 1
    assert res.stdout == ("A: \nB: x\n" if "B" in text else "")


def test_inspect_follows_sandbox_links_inside_the_sandbox(hostile, images: Images) -> None:
    secret = images.base / "inspect-secret"
    secret.write_text("HOST SECRET\n")

    def change(root: Path) -> None:
        sd = root / ".singularity.d"
        _relink(root, "/.singularity.d/runscript", str(secret))
        _relink(root, "/.singularity.d/test", "../" * 8 + str(secret).lstrip("/"))
        (root / "opt/env.sh").write_text("export FROM_IMAGE=1\n")
        _relink(root, "/.singularity.d/env/90-environment.sh", "/opt/env.sh")  # the image's own file
        (sd / "labels.json").unlink()
        (root / "opt/labels.json").write_text('{"FROM": "image"}')
        _relink(root, "/.singularity.d/labels.json", "../opt/labels.json")

    image = str(hostile("inspect-links", change))
    out = [
        subprocess.run(
            [sys.executable, "-m", "hpcsif.cli.main", "inspect", flag, image],
            capture_output=True,
            text=True,
            timeout=60,
        )
        for flag in ("-r", "-t", "-e", "-l")
    ]
    assert all(r.returncode == 0 for r in out), [r.stderr for r in out]
    assert not any("HOST SECRET" in r.stdout for r in out)
    assert "export FROM_IMAGE=1" in out[2].stdout
    assert out[3].stdout == "FROM: image\n"


def test_home_parent_that_is_a_link_loop(run, hostile) -> None:
    res = run(
        "exec", str(hostile("home-loop", lambda root: _relink(root, "/home", "/home"))), "/bin/echo", "hi"
    )
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
    assert all(ln.startswith("WARNING:") for ln in error_lines(res.stderr)), res.stderr


def test_concurrent_hostile_launches_leave_nothing_behind(hostile, host_dir: Path, images: Images) -> None:
    sif = images.base / "hostile-etc.sif"
    if not sif.exists():
        root = hostile("etc-for-sif", lambda root: _relink(root, "/etc", f"/oldroot{host_dir}"))
        make_sif(root, sif)
    sleepy = hostile(
        "env-sleeps", lambda root: (root / ".singularity.d/env/50-sleep.sh").write_text("sleep 600\n")
    )
    procs = [
        subprocess.Popen(
            hpcsif_cmd("exec", str(sif if i % 2 else sleepy), "/bin/true"), stderr=subprocess.DEVNULL
        )
        for i in range(24)
    ]
    # (each stuck one's bwrap is up, so its CLI handles SIGTERM: under load a fixed wait was too
    # short, and a SIGTERM that came before Python's handler killed it with -15)
    for p in procs[::2]:
        assert catch_child(p.pid, "bwrap", stop=False), "a container never started"
    time.sleep(0.5)
    for p in procs[::2]:  # the ones stuck in their image's env script: SIGTERM still ends them
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=60) for p in procs]
    assert codes[1::2] == [0] * 12
    assert codes[::2] == [128 + signal.SIGTERM] * 12
    assert left_behind() == []
    assert os.listdir(host_dir) == []
    ps = subprocess.run(["ps", "-eo", "stat,args"], capture_output=True, text=True).stdout
    assert not [ln for ln in ps.splitlines() if ln.endswith("sleep 600") and not ln.startswith("Z")]


def test_test_script_that_is_a_directory_or_not_executable(run, hostile) -> None:
    def as_dir(root: Path) -> None:
        (root / ".singularity.d/test").unlink()
        (root / ".singularity.d/test").mkdir()

    res = run("test", str(hostile("test-dir", as_dir)))
    assert (res.returncode, error_lines(res.stderr)) == (255, ["FATAL:   is a directory"])
    res = run("test", str(hostile("test-644", lambda root: (root / ".singularity.d/test").chmod(0o644))))
    assert (res.returncode, res.stdout) == (0, "No test found in container, executing /bin/sh -c true\n")


@pytest.mark.parametrize(
    ("dest", "why"),
    [
        ("/proc/foo", "destination /proc/foo doesn't exist in container"),
        ("/sys/foo", "destination /sys/foo doesn't exist in container"),
        ("/etc/passwd", "could not mount {src}: not a directory"),
        ("/bin/sh", "could not mount {src}: not a directory"),  # a link to busybox, a file
    ],
)
def test_user_bind_the_image_cannot_take(run, images: Images, pub_tmp: Path, dest: str, why: str) -> None:
    res = run("exec", "-B", f"{pub_tmp}:{dest}", str(images.sif), "/bin/true")
    assert res.returncode == 255
    assert error_lines(res.stderr) == [
        "FATAL:   container creation failed: mount hook function failure: "
        f"mount {pub_tmp}->{dest} error: while mounting {pub_tmp}: {why.format(src=pub_tmp)}"
    ]


def test_user_bind_onto_the_root_is_skipped(run, images: Images, pub_tmp: Path) -> None:
    res = run("exec", "-B", f"{pub_tmp}:/", str(images.sif), "/bin/echo", "hi")
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr


def test_env_scripts_that_change_the_shell(run, hostile) -> None:
    # set -eu, a strange IFS, noglob and a cd in the image's environment script: Apptainer's
    # interpreter keeps them from the action, and so must the launcher
    image = hostile(
        "env-shell-state",
        lambda root: (root / ".singularity.d/env/50-odd.sh").write_text(
            "set -euf\nIFS=x\ncd /opt\nexport ODD=1\n"
        ),
    )
    res = run("exec", str(image), "/bin/sh", "-c", 'echo "$ODD $(pwd) [$IFS]"')
    assert res.returncode == 0, res.stderr
    cwd = os.getcwd() if run.user is None else run.user.home
    assert res.stdout == f"1 {cwd} [ \t\n]\n"
    res = run("run", str(image), "two words")
    assert (res.returncode, res.stdout) == (0, "<two words>\n"), res.stderr


def test_damaged_squashfs_is_one_line_and_leaves_no_mount(run, images: Images) -> None:
    # the superblock is intact (squashfuse mounts it) but the tables at the end are zeros: even
    # the mount's root answers ENOENT, which made the mount look absent and stay behind
    sif = images.base / "damaged.sif"
    if not sif.exists():
        data = bytearray(images.sif.read_bytes())
        data[-20000:] = bytes(20000)
        sif.write_bytes(bytes(data))
        sif.chmod(0o644)
    res = run("exec", str(sif), "/bin/true")
    assert res.returncode == 255
    assert error_lines(res.stderr) == [
        f"FATAL:   {sif}: its squashfs file system cannot be read (No such file or directory)"
    ]
    res = subprocess.run(
        [sys.executable, "-m", "hpcsif.cli.main", "inspect", "-r", str(sif)], capture_output=True, text=True
    )
    assert res.returncode == 255  # it printed nothing and succeeded
    assert res.stderr.startswith(f"FATAL:   {sif}: its squashfs file system cannot be read (")
