"""What a container run looks like from inside, compared with Apptainer 1.4 (round 10).

Expectations are Apptainer 1.4.5's outputs for the same commands (``peer-apptainer``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.engine.conftest import Images

pytestmark = pytest.mark.slow


def test_image_without_passwd_and_group_gets_none(run, images: Images, pub_tmp: Path) -> None:
    """An image FROM scratch has no /etc/passwd or /etc/group: as Apptainer, none is made, with
    its two warnings (hpcsif made both, silently); with an overlay it says nothing, as there."""
    pub_tmp.chmod(0o755)  # (a sandbox in a directory every user may write is refused)
    sandbox = pub_tmp / "scratch"
    shutil.copytree(images.sandbox, sandbox, symlinks=True)
    (sandbox / "etc/passwd").unlink()
    (sandbox / "etc/group").unlink()
    res = run("exec", str(sandbox), "sh", "-c", "ls /etc; id -u; id -un")
    assert res.returncode == 1
    assert res.stderr == (
        "WARNING: passwd file doesn't exist in container, not updating\n"
        "WARNING: group file doesn't exist in container, not updating\n"
        f"id: unknown ID {res.stdout.split()[-1]}\n"
    )
    assert res.stdout.split()[:3] == ["hosts", "localtime", "resolv.conf"]
    res = run("exec", "--writable-tmpfs", str(sandbox), "sh", "-c", "ls /etc")
    assert (res.returncode, res.stderr, res.stdout.split()) == (0, "", ["hosts", "localtime", "resolv.conf"])


def test_program_whose_loader_the_image_lacks(run, images: Images, pub_tmp: Path) -> None:
    """A dynamic program without its ELF loader in the image fails with Apptainer's line and 255
    (hpcsif showed the shell's 'not found' and 127); with the loader there it runs."""
    pub_tmp.chmod(0o755)
    sandbox = pub_tmp / "noloader"
    shutil.copytree(images.sandbox, sandbox, symlinks=True)
    shutil.copy(os.path.realpath(shutil.which("true")), sandbox / "bin/dyntrue")
    missing = "FATAL:   exec /bin/dyntrue failed: a shared library is likely missing in the image\n"
    for command in ("dyntrue", "/bin/dyntrue"):
        res = run("exec", str(sandbox), command)
        assert (res.returncode, res.stdout, res.stderr) == (255, "", missing)
    (sandbox / "lib64").symlink_to("usr/lib64")  # (as Debian's, whose loader links to /lib/…)
    (sandbox / "lib").symlink_to("usr/lib")
    libs = [f"-B{d}" for d in ("/usr/lib64", "/usr/lib/x86_64-linux-gnu") if os.path.isdir(d)]
    res = run("exec", *libs, str(sandbox), "dyntrue")
    assert (res.returncode, res.stderr) == (0, "")


def _interp_check() -> str:
    """The launcher's check of a program's interpreter, as a script run on its arguments."""
    from hpcsif.engine.environment import LAUNCHER

    start = LAUNCHER.index("__interp() {")
    end = LAUNCHER.index("\n}\n", start) + 3
    return LAUNCHER[start:end] + 'for f in "$@"; do (__interp "$f") || echo "refused $f"; done\n'


def test_loader_check_reads_programs_as_bytes(tmp_path: Path) -> None:
    """Whatever the image's shell (dash, bash in a UTF-8 locale, busybox), the loader check lets
    the host's own programs run, even with printable bytes either side of the loader's path,
    and refuses one whose loader is missing."""
    true = Path(os.path.realpath(shutil.which("true"))).read_bytes()
    loader = b"/lib64/ld-linux-x86-64.so.2\0"
    at = true.find(loader)
    if at < 0:
        pytest.skip("the host's programs have another loader")
    end = at + len(loader)
    cases = {
        "junk-after": true[:end] + b"jB" + true[end + 2 :],
        "junk-before": true[: at - 2] + b"/8" + true[at:],
        "missing": true.replace(loader, b"/lib64/ld-nothere-x86-6.so.2\0"),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    programs = [str(tmp_path / n) for n in cases]
    programs += [p for p in map(shutil.which, ("ls", "bwrap", "python3", "skopeo", "squashfuse")) if p]
    (tmp_path / "check.sh").write_text(_interp_check())
    for shell in ("dash", "bash", "busybox sh"):
        res = subprocess.run(
            [*shell.split(), str(tmp_path / "check.sh"), *programs],
            capture_output=True,
            text=True,
            env={**os.environ, "LANG": "C.UTF-8"},
        )
        assert res.stdout == f"refused {tmp_path / 'missing'}\n", (shell, res.stdout)


def test_relative_command_named_as_apptainer_does(run, images: Images) -> None:
    """A relative command that is not there is named joined to the working directory and
    cleaned, as Go's filepath.Abs names it (hpcsif printed it as given)."""
    res = run("exec", "--pwd", "/opt", str(images.sif), "./sub/../nothere")
    assert (res.returncode, res.stderr) == (255, "FATAL:   stat /opt/nothere: no such file or directory\n")
    res = run("exec", "--pwd", "/", str(images.sif), "../x//y/")
    assert (res.returncode, res.stderr) == (255, "FATAL:   stat /x/y: no such file or directory\n")
