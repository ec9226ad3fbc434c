"""What a container run looks like from inside under combinations of flags (round 11).

Found by a seeded differential fuzzer of run/exec/shell flag combinations; expectations are
Apptainer 1.4.5's outputs for the same commands (``peer-apptainer``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.engine.conftest import Images, as_user, hpcsif_cmd

pytestmark = pytest.mark.slow


def run_in(run, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """hpcsif ARGS… started in *cwd*, as the user of the *run* fixture."""
    cmd, env = hpcsif_cmd(*args), dict(os.environ)
    if run.user is not None:
        cmd, env = as_user(run.user, cmd)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def test_prepend_and_append_path_are_expanded(run, images: Images) -> None:
    """PREPEND_PATH and APPEND_PATH given by --env or APPTAINERENV_ are expanded as every other
    such value (hpcsif put '$HOME/bin' on PATH literally); quotes and backslashes stay."""
    image_path = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    show = ["sh", "-c", 'echo "$PATH"']
    res = run("exec", "--env", "PREPEND_PATH=$HOME/p", "--env", 'APPEND_PATH=a"b\\c', str(images.sif), *show)
    home = res.stdout.partition("/p:")[0]
    assert (res.returncode, res.stderr, res.stdout) == (0, "", f'{home}/p:{image_path}:a"b\\c\n')
    assert home.startswith("/")
    env = {"APPTAINERENV_PREPEND_PATH": "$(echo /x)", "APPTAINERENV_APPEND_PATH": "${NOSUCH:-/y}"}
    res = run("exec", str(images.sif), *show, env=env)
    assert (res.returncode, res.stderr, res.stdout) == (0, "", f"/x:{image_path}:/y\n")


def test_current_directory_not_bound_over_what_shows_it(run, images: Images, pub_tmp: Path) -> None:
    """The current directory is not bound where another mount already shows it, as Apptainer
    decides: at the destination of --home (hpcsif showed the host's directory instead of the
    home asked for) and inside a read-only bind (hpcsif made it writable there)."""
    home, work = pub_tmp / "home", pub_tmp / "work"
    home.mkdir()
    work.mkdir()
    (home / "in-home").write_text("")
    (work / "in-work").write_text("")
    for d in (home, work):
        d.chmod(0o777)
    show = ["sh", "-c", "pwd; ls; touch new 2>&1"]
    res = run_in(run, work, "exec", "--home", f"{home}:{work}", str(images.sif), *show)
    assert (res.returncode, res.stderr, res.stdout) == (0, "", f"{work}\nin-home\n")
    assert (home / "new").exists() and not (work / "new").exists()
    res = run_in(run, work, "exec", "-B", f"{pub_tmp}:{pub_tmp}:ro", str(images.sif), *show)
    assert res.stdout == f"{work}\nin-work\ntouch: new: Read-only file system\n", res.stderr
    assert not (work / "new").exists()


def test_bind_variable_lists_every_destination_given(run, images: Images, pub_tmp: Path) -> None:
    """APPTAINER_BIND inside names every -B destination as given, a repeated one too, as in
    Apptainer (hpcsif left the repeat out); the repeat itself is still not bound."""
    res = run(
        "exec",
        "-B",
        f"{pub_tmp}:/mnt",
        "-B",
        f"{images.base}:/mnt",
        str(images.sif),
        "sh",
        "-c",
        "echo $APPTAINER_BIND $SINGULARITY_BIND",
    )
    assert res.stdout == "/mnt,/mnt /mnt,/mnt\n"
    warning = (
        f"WARNING: While bind mounting '{images.base}:/mnt': destination is already in the mount point list"
    )
    assert res.stderr == warning + "\n"


def test_empty_path_override_keeps_prepend_path(run, images: Images) -> None:
    """An empty PATH given leaves the container's, and PREPEND_PATH/APPEND_PATH still go on it,
    as in Apptainer (hpcsif dropped them as it does for a PATH of the user's own)."""
    env = {"APPTAINERENV_PATH": "", "APPTAINERENV_PREPEND_PATH": "/p", "APPTAINERENV_APPEND_PATH": "/a"}
    res = run("exec", str(images.sif), "sh", "-c", 'echo "$PATH"', env=env)
    image_path = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    assert (res.returncode, res.stderr, res.stdout) == (0, "", f"/p:{image_path}:/a\n")
