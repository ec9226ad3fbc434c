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


@pytest.fixture
def as_root(images: Images):
    """``as_root(*args, env=…)``: hpcsif as root only, for what does not depend on the user."""

    def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(hpcsif_cmd(*args), capture_output=True, text=True, env=full_env, timeout=60)

    return _run


def run_in(run, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """hpcsif ARGS… started in *cwd*, as the user of the *run* fixture."""
    cmd, env = hpcsif_cmd(*args), dict(os.environ)
    if run.user is not None:
        cmd, env = as_user(run.user, cmd)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def test_prepend_and_append_path_are_expanded(as_root, images: Images) -> None:
    """PREPEND_PATH and APPEND_PATH given by --env or APPTAINERENV_ are expanded as every other
    such value (hpcsif put '$HOME/bin' on PATH literally); quotes and backslashes stay."""
    image_path = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    show = ["sh", "-c", 'echo "$PATH"']
    res = as_root(
        "exec", "--env", "PREPEND_PATH=$HOME/p", "--env", 'APPEND_PATH=a"b\\c', str(images.sif), *show
    )
    home = res.stdout.partition("/p:")[0]
    assert (res.returncode, res.stderr, res.stdout) == (0, "", f'{home}/p:{image_path}:a"b\\c\n')
    assert home.startswith("/")
    env = {"APPTAINERENV_PREPEND_PATH": "$(echo /x)", "APPTAINERENV_APPEND_PATH": "${NOSUCH:-/y}"}
    res = as_root("exec", str(images.sif), *show, env=env)
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


def test_bind_variable_lists_every_destination_given(as_root, images: Images, pub_tmp: Path) -> None:
    """APPTAINER_BIND inside names every -B destination as given, a repeated one too, as in
    Apptainer (hpcsif left the repeat out); the repeat itself is still not bound. The
    environment's warnings come before the binds', as there (they came after)."""
    binds = ["-B", f"{pub_tmp}:/mnt", "-B", f"{images.base}:/mnt"]
    show = ["sh", "-c", "echo $APPTAINER_BIND $SINGULARITY_BIND"]
    res = as_root("exec", *binds, "--env", "HOME=/x", str(images.sif), *show)
    assert res.stdout == "/mnt,/mnt /mnt,/mnt\n"
    repeated = (
        f"WARNING: While bind mounting '{images.base}:/mnt': destination is already in the mount point list\n"
    )
    assert res.stderr == (
        "WARNING: Overriding HOME environment variable with APPTAINERENV_HOME is not permitted\n" + repeated
    )
    # and before what another option's check says (they came after)
    res = as_root("exec", *binds, "--scratch", "rel", str(images.sif), "true")
    assert res.stderr == repeated + (
        "FATAL:   container creation failed: could not bind scratch directory rel into container: destination"
        " must be an absolute path\n"
    )


def test_empty_path_override_keeps_prepend_path(as_root, images: Images) -> None:
    """An empty PATH given leaves the container's, and PREPEND_PATH/APPEND_PATH still go on it,
    as in Apptainer (hpcsif dropped them as it does for a PATH of the user's own)."""
    env = {"APPTAINERENV_PATH": "", "APPTAINERENV_PREPEND_PATH": "/p", "APPTAINERENV_APPEND_PATH": "/a"}
    res = as_root("exec", str(images.sif), "sh", "-c", 'echo "$PATH"', env=env)
    image_path = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    assert (res.returncode, res.stderr, res.stdout) == (0, "", f"/p:{image_path}:/a\n")


def test_contain_leaves_what_no_mount_names(run, images: Images, pub_tmp: Path) -> None:
    """--contain with --no-mount tmp leaves the image's own /tmp and /var/tmp, as Apptainer
    does (hpcsif still gave private writable ones, with --workdir its WORKDIR/tmp)."""
    show = ["sh", "-c", "touch /tmp/x /var/tmp/x 2>&1; echo done"]
    want = "touch: /tmp/x: Read-only file system\ntouch: /var/tmp/x: Read-only file system\ndone\n"
    res = run("exec", "--contain", "--no-mount", "tmp", str(images.sif), *show)
    assert (res.returncode, res.stdout) == (0, want), res.stderr
    res = run("exec", "--contain", "--no-mount", "tmp", "--workdir", str(pub_tmp), str(images.sif), *show)
    assert (res.returncode, res.stdout) == (0, want), res.stderr
    assert sorted(p.name for p in pub_tmp.iterdir()) == ["home"]


def test_env_flag_is_an_apptainerenv_value_against_singularityenv(as_root, images: Images) -> None:
    """--env X= is APPTAINERENV_X to Apptainer: a SINGULARITYENV_X beside it gets the two
    warnings where the values differ and nothing where they agree (hpcsif said the INFO line
    that APPTAINERENV_X is preferred, as if none were given)."""
    show = [str(images.sif), "sh", "-c", 'echo "$E1"']
    res = as_root("exec", "--env", "E1=b", *show, env={"SINGULARITYENV_E1": "a"})
    assert (res.returncode, res.stdout) == (0, "b\n")
    assert res.stderr == (
        "WARNING: SINGULARITYENV_E1 and APPTAINERENV_E1 have different values, using the latter\n"
        "WARNING: Skipping environment variable [SINGULARITYENV_E1=a], E1 is already overridden with"
        " different value [b]\n"
    )
    res = as_root("exec", "--env", "E1=a", *show, env={"SINGULARITYENV_E1": "a", "APPTAINERENV_E1": "c"})
    assert (res.returncode, res.stdout, res.stderr) == (0, "a\n", "")
    # Apptainer's order: the values that differ, HOME refused, then the values skipped
    res = as_root("exec", "--env", "E1=b", "--env", "HOME=/x", *show, env={"SINGULARITYENV_E1": "a"})
    assert res.stderr == (
        "WARNING: SINGULARITYENV_E1 and APPTAINERENV_E1 have different values, using the latter\n"
        "WARNING: Overriding HOME environment variable with APPTAINERENV_HOME is not permitted\n"
        "WARNING: Skipping environment variable [SINGULARITYENV_E1=a], E1 is already overridden with"
        " different value [b]\n"
    )


def test_no_mount_home_wins_over_home(run, images: Images, pub_tmp: Path) -> None:
    """--no-mount home leaves out the home directory that --home names too, as in Apptainer
    (hpcsif bound it); under --contain the start falls back to / with Apptainer's warning, which
    names the home (hpcsif named the current directory that failed first)."""
    (pub_tmp / "marker").write_text("")
    show = [str(images.sif), "sh", "-c", 'echo "$HOME"; pwd; ls /data/home 2>&1; true']
    res = run("exec", "--home", f"{pub_tmp}:/data/home", "--no-mount", "home", "--pwd", "/", *show)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == "/data/home\n/\nls: /data/home: No such file or directory\n"
    warning = (
        "WARNING: Error changing the container working directory. Using '/' instead: chdir /data/home:"
        " no such file or directory\n"
    )
    res = run("exec", "--containall", "--home", f"{pub_tmp}:/data/home", "--no-mount", "home", *show)
    assert res.stdout == "/data/home\n/\nls: /data/home: No such file or directory\n"
    assert res.stderr == warning
    # the current directory not bound either: the warning names the home, which failed last
    res = run_in(run, pub_tmp, "exec", "--home", f"{pub_tmp}:/data/home", "--no-mount", "home,cwd,tmp", *show)
    assert (res.stdout, res.stderr) == ("/data/home\n/\nls: /data/home: No such file or directory\n", warning)


def test_contain_without_its_home_starts_in_root(run, images: Images, pub_tmp: Path) -> None:
    """--contain --no-home with a home the image lacks starts in / with Apptainer's warning
    (hpcsif failed in bwrap's chdir); no directory is made for the home (it was, with an overlay)."""
    show = [str(images.sif), "sh", "-c", "pwd; ls -d /home/u 2>&1; true"]
    warning = (
        "WARNING: Error changing the container working directory. Using '/' instead: chdir /home/u:"
        " no such file or directory\n"
    )
    for extra in ([], ["--writable-tmpfs"]):
        res = run("exec", "--contain", "--no-home", "--home", f"{pub_tmp}:/home/u", *extra, *show)
        assert (res.returncode, res.stdout) == (0, "/\nls: /home/u: No such file or directory\n")
        assert res.stderr == warning


def test_pwd_to_the_parent_made_for_a_bind(run, images: Images, pub_tmp: Path) -> None:
    """--pwd may name a directory the image lacks that is made as the parent of a bind's
    destination (-B /x:/work/data --pwd /work), as in Apptainer (hpcsif refused it)."""
    res = run(
        "exec",
        "-B",
        f"{pub_tmp}:/work/data",
        "--pwd",
        "/work",
        str(images.sif),
        "sh",
        "-c",
        "pwd; ls -d data",
    )
    assert (res.returncode, res.stdout, res.stderr) == (0, "/work\ndata\n", "")
    res = run("exec", "-B", f"{pub_tmp}:/work/data", "--pwd", "/other", str(images.sif), "true")
    assert (res.returncode, res.stderr) == (
        255,
        "FATAL:   failed to set working directory: chdir /other: no such file or directory\n",
    )


def test_env_value_without_a_name_is_ignored_with_a_warning(as_root, images: Images) -> None:
    """--env =x is left out with Apptainer's warning and the container runs (hpcsif refused the
    run); a name the shell cannot hold stays one FATAL line (Apptainer's interpreter prints a
    parse error and runs on)."""
    res = as_root("exec", "--env", "A=1,=2", str(images.sif), "sh", "-c", 'echo "[$A]"')
    assert (res.returncode, res.stdout) == (0, "[1]\n")
    assert res.stderr == "WARNING: Ignore environment variable =2: variable name missing\n"
    res = as_root("exec", "--env", "1X=y", str(images.sif), "true")
    assert (res.returncode, res.stderr) == (2, "FATAL:   invalid --env value '1X=y' (expected NAME=VALUE)\n")


def test_path_given_is_set_after_the_other_values_are_expanded(as_root, images: Images) -> None:
    """A PATH given with --env is set after the other --env values are expanded, as Apptainer
    sets it last: their $(…) commands are found on the container's PATH, and their $PATH is it
    (hpcsif expanded them under the new PATH: 'id: not found')."""
    image_path = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    flags = ["--env", "PATH=/nowhere", "--env", "E1=[$(id -u)]", "--env", "E2=$PATH"]
    res = as_root("exec", *flags, str(images.sif), "/bin/sh", "-c", 'echo "$E1 $E2 $PATH"')
    assert (res.returncode, res.stderr, res.stdout) == (0, "", f"[0] {image_path} /nowhere\n")


def test_path_entries_are_not_patterns(as_root, images: Images) -> None:
    """A PATH entry is a directory's name, never a pattern: with PATH='*' in / the command is not
    found, as in Apptainer (hpcsif's lookup expanded '*' to the image's bin and ran bin/sh)."""
    res = as_root("exec", "--env", "PATH=*", "--pwd", "/", str(images.sif), "sh", "-c", "echo ran")
    assert (res.returncode, res.stdout, res.stderr) == (
        255,
        "",
        'FATAL:   "sh": executable file not found in $PATH\n',
    )
    res = as_root("exec", "--env", "PATH=bin", "--pwd", "/", str(images.sif), "sh", "-c", "echo ran")
    assert (res.returncode, res.stdout, res.stderr) == (0, "ran\n", "")


def test_contain_home_inside_a_read_only_bind_of_home(run, images: Images, pub_tmp: Path) -> None:
    """--contain's private home inside a read-only -B of /home that lacks it gets its mount point
    on a tmpfs, the host directory untouched, as other mount points there (hpcsif failed in
    bwrap: "Can't mkdir /home/<user>: Read-only file system")."""
    homes = pub_tmp / "homes"
    homes.mkdir(mode=0o755)
    (homes / "other").mkdir()
    show = ["sh", "-c", 'cd && touch x && echo "$PWD wrote"; ls /home']
    res = run("exec", "--contain", "-B", f"{homes}:/home:ro", str(images.sif), *show)
    home = res.stdout.split()[0] if res.stdout else ""
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    assert res.stdout.startswith(f"{home} wrote\n") and "other" in res.stdout.split()
    assert [p.name for p in homes.iterdir()] == ["other"]


def test_paths_as_written(as_root, images: Images, pub_tmp: Path) -> None:
    """$HOME keeps a trailing / of --home and APPTAINER_BIND the -B/--mount destinations as
    written, while --pwd /tmp/ is /tmp, as in Apptainer (hpcsif cleaned the first two and kept
    the slash of the last)."""
    show = ["sh", "-c", 'echo "$HOME|$APPTAINER_BIND|$(pwd)"']
    binds = ["-B", f"{pub_tmp}:/mnt/x/", "--mount", f"type=bind,src={pub_tmp},dst=/mnt/../mnt/y"]
    res = as_root("exec", "--home", f"{pub_tmp}:/data/h/", *binds, "--pwd", "/tmp/", str(images.sif), *show)
    assert (res.returncode, res.stderr, res.stdout) == (0, "", "/data/h/|/mnt/x/,/mnt/../mnt/y|/tmp\n")
