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
    """A relative command is run, and named when it is not there, joined to the working directory
    and cleaned, as Go's filepath.Abs makes it (hpcsif ran and printed it as given)."""
    for flags, command in ((["--pwd", "/"], "./bin/../bin/sh"), (["--pwd", "/", "--env", "PATH=bin"], "sh")):
        res = run("exec", *flags, str(images.sif), command, "-c", 'echo "$0"')
        assert (res.returncode, res.stdout) == (0, "/bin/sh\n"), res.stderr
    res = run("exec", "--pwd", "/opt", str(images.sif), "./sub/../nothere")
    assert (res.returncode, res.stderr) == (255, "FATAL:   stat /opt/nothere: no such file or directory\n")
    res = run("exec", "--pwd", "/", str(images.sif), "../x//y/")
    assert (res.returncode, res.stderr) == (255, "FATAL:   stat /x/y: no such file or directory\n")


def test_singularity_variables_of_flags_get_apptainers_lines(run, images: Images) -> None:
    """``SINGULARITY_<K>`` of a flag: Apptainer's INFO that ``APPTAINER_<K>`` is preferred (global
    flags first, then the command's in flag order, even empty); where both are set and differ,
    a WARNING, and ``APPTAINER_<K>`` wins even empty (hpcsif said nothing and took the other)."""
    legacy = {"SINGULARITY_NV": "0", "SINGULARITY_CLEANENV": "", "SINGULARITY_DEBUG": "0"}
    legacy |= {"SINGULARITY_NOHTTPS": "0"}
    res = run("exec", str(images.sif), "true", env=legacy)
    lines = [
        f"INFO:    Environment variable SINGULARITY_{k} is set, but APPTAINER_{k} is preferred\n"
        for k in ("DEBUG", "CLEANENV", "NOHTTPS", "NV")
    ]
    assert (res.returncode, res.stderr) == (0, "".join(lines))
    assert run("-q", "exec", str(images.sif), "true", env=legacy).stderr == ""
    # (images.base is under /var/tmp, which --contain makes the container's own)
    contain = {"SINGULARITY_CONTAIN": "1", "APPTAINER_CONTAIN": ""}
    res = run("exec", str(images.sif), "ls", str(images.sif), env=contain)
    warning = "WARNING: SINGULARITY_CONTAIN and APPTAINER_CONTAIN have different values, using the latter\n"
    assert (res.returncode, res.stdout, res.stderr) == (0, f"{images.sif}\n", warning)
    assert run("-s", "exec", str(images.sif), "true", env=contain).stderr == ""
    res = run("exec", str(images.sif), "ls", str(images.sif), env={"SINGULARITY_CONTAIN": "1"})
    assert res.returncode == 1 and "Environment variable SINGULARITY_CONTAIN is set" in res.stderr


def test_work_directory_made_as_apptainer_makes_it(run, images: Images, pub_tmp: Path) -> None:
    """``-W``: scratch directories are made with their parents (mode 0750), the work directory
    too, as Go's MkdirAll makes them; under ``--contain`` the home, /tmp and /var/tmp are made
    in an existing one only; failures in Apptainer's words (hpcsif refused a missing work
    directory for -S, and said it in words of its own)."""
    work = pub_tmp / "work"
    res = run("exec", "-S", "/scr", "-W", str(work), str(images.sif), "sh", "-c", "touch /scr/x")
    assert (res.returncode, res.stderr) == (0, "")
    made = {p.relative_to(pub_tmp): p.stat().st_mode & 0o7777 for p in sorted(work.rglob("*"))}
    assert (work.stat().st_mode & 0o7777, made) == (
        0o750,
        {Path("work/scratch"): 0o750, Path("work/scratch/scr"): 0o750, Path("work/scratch/scr/x"): 0o644},
    )
    missing, file = pub_tmp / "missing", pub_tmp / "file"
    file.write_text("")
    for flags, why in (
        (
            ["-c", "-S", "/scr", "-W", str(missing)],
            f"failed to create {missing}/home: mkdir {missing}/home: no such file or directory",
        ),
        (
            ["-c", "--no-home", "-W", str(file)],
            f"failed to create {file}/tmp: mkdir {file}/tmp: not a directory",
        ),
        (
            ["-S", "/scr", "-W", str(file)],
            f"could not create scratch working directory {file}/scratch: mkdir {file}: not a directory",
        ),
    ):
        res = run("exec", *flags, str(images.sif), "true")
        assert (res.returncode, res.stderr) == (255, f"FATAL:   container creation failed: {why}\n")
    assert not missing.exists()


def test_empty_overrides_as_apptainer_reads_them(run, images: Images, pub_tmp: Path) -> None:
    """An empty PATH or PS1 given (--env, APPTAINERENV_*, an env file) leaves the container's
    own, and an empty LD_LIBRARY_PATH stays empty, as in Apptainer (hpcsif set them empty, and
    added /.singularity.d/libs); an env file that sets PATH or the positional parameters is read
    (hpcsif's reader lost the env it ran by name, or by $2)."""
    show = 'echo "[$PATH][$PS1][$LD_LIBRARY_PATH]"'
    image_path = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    want = f"[{image_path}][Apptainer> ][]\n"
    res = run("exec", "--env", "PATH=,PS1=,LD_LIBRARY_PATH=", str(images.sif), "/bin/sh", "-c", show)
    assert (res.returncode, res.stdout, res.stderr) == (0, want, "")
    empty = {"APPTAINERENV_PATH": "", "APPTAINERENV_PS1": "$NOSUCH", "APPTAINERENV_LD_LIBRARY_PATH": ""}
    res = run("exec", str(images.sif), "/bin/sh", "-c", show, env=empty)
    assert (res.returncode, res.stdout) == (0, want)
    env_file = pub_tmp / "env"
    env_file.write_text("PATH=\n")
    res = run("exec", "--env-file", str(env_file), str(images.sif), "/bin/sh", "-c", show)
    assert (res.returncode, res.stdout) == (0, f"[{image_path}][Apptainer> ][/.singularity.d/libs]\n")
    env_file.write_text("PATH=/opt/x\nA=$PATH\nset -- x\nB=$1\n")
    res = run("exec", "--env-file", str(env_file), str(images.sif), "/bin/sh", "-c", 'echo "$PATH|$A|$B"')
    assert (res.returncode, res.stdout, res.stderr) == (0, "/opt/x|/opt/x|x\n", "")


def test_cleanenv_keeps_the_proxies_in_either_case(run, images: Images) -> None:
    """--cleanenv (and --containall) keep TERM and the proxy variables, upper case too, as
    Apptainer does (hpcsif dropped HTTP_PROXY and the other upper-case ones)."""
    proxies = {
        "HTTP_PROXY": "hp",
        "HTTPS_PROXY": "hsp",
        "NO_PROXY": "np",
        "ALL_PROXY": "ap",
        "FTP_PROXY": "fp",
    }
    proxies |= {"http_proxy": "lhp", "OTHER": "x"}
    for flag in ("--cleanenv", "--containall"):
        res = run(
            "exec", flag, str(images.sif), "sh", "-c", "env | grep -i -e proxy -e other | sort", env=proxies
        )
        assert res.stdout.split() == sorted(f"{k}={v}" for k, v in proxies.items() if k != "OTHER"), (
            res.stderr
        )
