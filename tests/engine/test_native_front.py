"""The native ``hpcsif`` front (hpcsif/native/front.c): a saved launch repeated without Python.

Each test builds the front from its source with ``cc``, with a small ``python`` wrapper as its
interpreter that counts how often the front had to start the Python CLI. A repeated start must
not start Python, and must give exactly what the Python CLI gives for the same command (output,
exit status, signals, stdin). Anything that changed since the plan was saved must send the
start back to Python.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.engine.conftest import (
    ROOT,
    USER_PYTHON,
    as_user,
    build_rootfs,
    catch_child,
    fuse_mounts,
    hpcsif_cmd,
    hpcsif_processes,
    left_behind,
    make_sif,
)

pytestmark = pytest.mark.slow

PROBE = "env | sort; cat /etc/passwd /etc/group /etc/resolv.conf; pwd; umask; id; hostname; ls /; exit 3"


@dataclass
class Front:
    """A built front and the file its python wrapper appends one line to per Python start."""

    binary: Path
    starts: Path

    def python_starts(self) -> list[str]:
        """The Python CLI starts so far (the mount watchdogs the front starts are not counted)."""
        lines = self.starts.read_text().splitlines() if self.starts.exists() else []
        return [line for line in lines if "--watch" not in line]

    def watchdogs(self) -> int:
        """How many mount watchdogs the front (or the Python CLI behind it) started."""
        return self.starts.read_text().count("--watch") if self.starts.exists() else 0

    def run(self, *args: str, **kw) -> tuple[subprocess.CompletedProcess, bool]:
        """Run ``hpcsif ARGS`` through the front; also says whether it started Python."""
        before = len(self.python_starts())
        kw.setdefault("env", dict(os.environ))
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=60, **kw)
        return proc, len(self.python_starts()) > before


#: the interpreter the test front starts: it notes each start, then runs the real one (a shell
#: script would not do: the shell adds PWD to the environment, which is part of the plan's key)
COUNTING_PYTHON = r"""
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    FILE *f = fopen(STARTS, "a");
    if (f) {
        for (int i = 1; i < argc; i++) fprintf(f, "%s ", argv[i]);
        fputc('\n', f);
        fclose(f);
    }
    argv[0] = PYTHON;
    execv(PYTHON, argv);
    return 127;
}
"""


def build_front(directory: Path, python: str) -> Front:
    """Compile the front into *directory* with a counting wrapper around *python*."""
    if not shutil.which("cc"):
        pytest.skip("no C compiler")
    directory.mkdir(parents=True, exist_ok=True)
    starts = directory / "python-starts"
    wrapper = directory / "python"
    (directory / "python.c").write_text(COUNTING_PYTHON)
    defs = [f'-DSTARTS="{starts}"', f'-DPYTHON="{python}"']
    subprocess.run(["cc", "-O2", *defs, "-o", str(wrapper), str(directory / "python.c")], check=True)
    out = directory / "hpcsif"
    src = ROOT / "hpcsif/native/front.c"
    cmd = [
        "cc",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        f'-DHPCSIF_PYTHON="{wrapper}"',
        "-o",
        str(out),
        str(src),
    ]
    subprocess.run(cmd, check=True)
    return Front(out, starts)


@pytest.fixture
def front(tmp_path: Path) -> Front:
    return build_front(tmp_path / "front", sys.executable)


@contextlib.contextmanager
def holding(sif: Path) -> Iterator[None]:
    """A long-running container of *sif*: its mount is shared, as on a busy node."""
    proc = mounted_by(hpcsif_cmd("exec", str(sif), "sleep", "300"))
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def mounted_by(cmd: list[str]) -> subprocess.Popen:
    """Start *cmd* (a Python CLI container start) and wait until its mount is there."""
    before = len(fuse_mounts())
    proc = subprocess.Popen(cmd)
    for _ in range(200):
        if len(fuse_mounts()) > before:
            break
        time.sleep(0.05)
    return proc


def short_holder(sif: str) -> subprocess.Popen:
    """A Python CLI container of *sif* that holds its mount for a second."""
    return mounted_by(hpcsif_cmd("exec", sif, "sleep", "1"))


def no_mounts_left() -> bool:
    for _ in range(100):
        if not fuse_mounts():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def holder(images):
    """The test SIF held by a long-running container for the whole test."""
    with holding(images.sif):
        yield
    assert no_mounts_left(), "a mount was left behind"


def plans() -> list[Path]:
    base = Path(os.environ["XDG_RUNTIME_DIR"]) / "hpcsif/plans"
    return sorted(base.glob("*.plan")) if base.is_dir() else []


def python_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", dict(os.environ))
    return subprocess.run(hpcsif_cmd(*args), capture_output=True, text=True, timeout=60, **kw)


OPTION_SETS = [
    [],
    ["--cleanenv"],
    ["--env", "X=1 2", "--env", "Y=$HOME", "-B", "{data}:/data:ro", "--pwd", "/data"],
    ["--containall"],
    ["-p"],
    ["--no-umask", "--dns", "10.0.0.1"],
    ["-S", "/scratch", "--hostname", "box", "-n"],
    ["--no-home", "--no-mount", "tmp,cwd", "--pwd", "/"],
    ["--home", "{data}:/home/elsewhere", "--add-caps", "chown"],
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: " ".join(o) or "plain")
def test_repeat_runs_without_python_as_python_would(front, holder, images, tmp_path, options):
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("in data\n")
    opts = [o.format(data=data) for o in options]
    args = ["exec", *opts, str(images.sif), "sh", "-c", PROBE, "arg", "with space"]
    first, started = front.run(*args)
    assert started, "the first start must go through Python (it saves the plan)"
    again, started = front.run(*args)
    assert not started, f"the repeat started Python: {front.python_starts()[-1:]}"
    direct = python_cli(*args)
    assert (again.returncode, again.stdout, again.stderr) == (direct.returncode, direct.stdout, direct.stderr)
    assert again.returncode == 3 and "in data" not in again.stderr
    assert (first.stdout, first.returncode) == (direct.stdout, direct.returncode)


def test_run_and_test_actions_repeat(front, holder, images):
    runs = (
        ["run", str(images.sif), "a b", "c"],
        ["test", str(images.sif)],
        ["run", str(images.sif)],
        ["run", str(images.sif), "--", "x"],  # a -- after the image is the container's, as in Apptainer
    )
    for args in runs:
        front.run(*args)
        again, started = front.run(*args)
        direct = python_cli(*args)
        assert not started
        assert (again.returncode, again.stdout, again.stderr) == (
            direct.returncode,
            direct.stdout,
            direct.stderr,
        )
    # exec saved with a command needs one: without, Python says so
    front.run("exec", str(images.sif), "true")
    proc, started = front.run("exec", str(images.sif))
    assert started and proc.returncode == 2 and "needs a command" in proc.stderr


def test_status_signals_and_stdin_reach_the_payload(front, holder, images):
    sif = str(images.sif)
    for args in (["sh", "-c", "exit 42"], ["sh", "-c", "kill -9 $$"], ["cat"]):
        front.run("exec", sif, *args, input="fed on stdin\n")
    proc, started = front.run("exec", sif, "sh", "-c", "exit 42")
    assert (proc.returncode, started) == (42, False)
    proc, started = front.run("exec", sif, "sh", "-c", "kill -9 $$")
    assert (proc.returncode, started) == (137, False)
    proc, started = front.run("exec", sif, "cat", input="fed on stdin\n")
    assert (proc.stdout, started) == ("fed on stdin\n", False)

    # (a background child could still be between fork and exec when the signal comes, and live on)
    trap = 'trap "echo got TERM; exit 7" TERM; echo ready; while :; do sleep 1; done'
    before = len(front.python_starts())
    p = subprocess.Popen(
        [str(front.binary), "exec", sif, "sh", "-c", trap],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert (out, p.returncode) == ("got TERM\n", 7)
    assert len(front.python_starts()) == before, "the start was not repeated by the front"


def test_anything_changed_goes_back_to_python(front, images, tmp_path):
    sif = tmp_path / "app.sif"
    shutil.copy(images.sif, sif)
    with holding(sif):
        _check_changes(front, sif, tmp_path)
    assert no_mounts_left()


def _check_changes(front: Front, sif: Path, tmp_path: Path) -> None:
    args = [
        "exec",
        "-B",
        f"{tmp_path}/src:/src",
        str(sif),
        "sh",
        "-c",
        "cat /etc/variant 2>/dev/null; ls /src",
    ]
    (tmp_path / "src").mkdir()
    (tmp_path / "src/one").write_text("")

    def repeat_starts_python(**kw) -> tuple[subprocess.CompletedProcess, bool]:
        front.run(*args, **kw)
        return front.run(*args, **kw)

    assert repeat_starts_python()[1] is False
    # a configuration file appears
    conf = Path(os.environ["XDG_CONFIG_HOME"]) / "hpcsif/hpcsif.toml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("[engine]\nbwrap = 'bwrap'\n")
    assert front.run(*args)[1] is True
    assert front.run(*args)[1] is False
    # the environment, the directory
    assert front.run(*args, env={**os.environ, "NEW_VAR": "1"})[1] is True
    assert front.run(*args, cwd=tmp_path / "src")[1] is True
    # the bind source is replaced by a file: Python decides (and refuses the directory bind's target)
    shutil.rmtree(tmp_path / "src")
    (tmp_path / "src").write_text("a file now")
    proc, started = front.run(*args)
    assert started
    assert (proc.returncode, proc.stdout, proc.stderr) == (lambda d: (d.returncode, d.stdout, d.stderr))(
        python_cli(*args)
    )
    (tmp_path / "src").unlink()
    (tmp_path / "src").mkdir()
    assert repeat_starts_python()[1] is False
    # the --pwd directory inside a bind goes away: Python's own message, not bwrap's
    (tmp_path / "src/sub").mkdir()
    pwd_args = ["exec", "-B", f"{tmp_path}/src:/src", "--pwd", "/src/sub", str(sif), "pwd"]
    assert front.run(*pwd_args)[0].stdout == "/src/sub\n"
    assert front.run(*pwd_args)[1] is False
    (tmp_path / "src/sub").rmdir()
    proc, started = front.run(*pwd_args)
    assert started and proc.returncode == 255
    assert (
        proc.stderr == "FATAL:   failed to set working directory: chdir /src/sub: no such file or directory\n"
    )
    # another image at the same path (same size, new inode): the new one runs
    variant = tmp_path / "variant"
    build_rootfs(variant)
    (variant / "etc/variant").write_text("the variant\n")
    make_sif(variant, tmp_path / "variant.sif")
    os.replace(tmp_path / "variant.sif", sif)
    proc, started = front.run(*args)
    assert started and proc.stdout == "the variant\n"
    with holding(sif):
        assert front.run(*args)[1] is False
        # a damaged plan: Python, which writes it anew
        for plan in plans():
            plan.write_bytes(plan.read_bytes()[:100])
        proc, started = front.run(*args)
        assert started and proc.stdout == "the variant\n"
        proc, started = front.run(*args)
        assert (proc.stdout, started) == ("the variant\n", False)


def test_nothing_is_saved_for_starts_made_anew_each_time(front, holder, images, tmp_path):
    sif = str(images.sif)
    env_file = tmp_path / "env"
    env_file.write_text("STAMP=$(date +%N)\n")
    cases = [
        ["exec", "--no-mount", "bogus", sif, "true"],  # prints a warning
        ["exec", "--writable-tmpfs", sif, "true"],  # a fresh overlay
        ["exec", "-W", str(tmp_path), "--contain", sif, "true"],  # creates directories
        ["exec", "--fakeroot", sif, "true"],
        ["exec", str(images.sandbox), "true"],  # a directory can change under us
        ["exec", "--env-file", str(env_file), sif, "true"],  # a script the host evaluates
        ["shell", sif],
    ]
    for args in cases:
        before = plans()
        for _ in range(2):
            proc, started = front.run(*args, input="exit\n")
            assert started, args
        assert proc.returncode == 0, proc.stderr
        assert plans() == before, args


def test_plans_hold_no_host_variable_values(front, holder, images):
    secret = "s3cr3t-never-on-disk"
    env = {**os.environ, "SINGULARITY_DOCKER_PASSWORD": secret, "APPTAINERENV_TOKEN": secret}
    args = ["exec", str(images.sif), "sh", "-c", 'echo "$SINGULARITY_DOCKER_PASSWORD $TOKEN"']
    front.run(*args, env=env)
    proc, started = front.run(*args, env=env)
    # Apptainer's own variables stay outside; APPTAINERENV_TOKEN becomes TOKEN
    assert (proc.stdout, started) == (python_cli(*args, env=env).stdout, False)
    assert proc.stdout == f" {secret}\n"
    assert plans()
    for plan in plans():
        assert secret.encode() not in plan.read_bytes()
        assert plan.stat().st_mode & 0o777 == 0o600


def test_nothing_mounted_the_front_mounts_and_unmounts(front, images):
    sif = str(images.sif)
    front.run("exec", sif, "true")  # saves the plan; nothing mounted afterwards
    assert not fuse_mounts()
    for status in (0, 9):
        proc, started = front.run("exec", sif, "sh", "-c", f"ls /.singularity.d/env | wc -l; exit {status}")
        assert (proc.returncode, started, proc.stderr) == (status, False, "")
        assert int(proc.stdout) > 0
        assert not fuse_mounts() and not list(Path(os.environ["XDG_RUNTIME_DIR"], "hpcsif").glob("sif-*"))
    # the front watches the mounts it made itself: no Python started for a cold start either
    assert front.watchdogs() == 0
    for _ in range(100):  # each watchdog ends once its mount is gone
        if not hpcsif_processes():
            break
        time.sleep(0.05)
    assert not hpcsif_processes()


def test_last_holder_unmounts_and_a_killed_front_leaves_nothing(front, images):
    sif = str(images.sif)
    front.run("exec", sif, "true")  # saves the plan; nothing mounted afterwards
    first = short_holder(sif)
    # the front's container outlives the Python one: it is the last holder and unmounts
    proc, started = front.run("exec", sif, "sh", "-c", "sleep 2; exit 5")
    first.wait(timeout=30)
    assert (proc.returncode, started) == (5, False)
    assert not fuse_mounts()

    # SIGKILL, with the mount the front made itself: bwrap dies with its parent, the watchdog
    # the front started unmounts
    before = len(front.python_starts())
    # (os.environ, as front.run passes: a library in this process may have put more into environ)
    killed = subprocess.Popen([str(front.binary), "exec", sif, "sleep", "60"], env=dict(os.environ))
    for _ in range(100):
        if fuse_mounts() and hpcsif_processes():
            break
        time.sleep(0.05)
    time.sleep(0.3)
    # the front's own watchdog, under a name that `pkill -f "hpcsif exec"` does not match
    assert any(" hpcsif-mount-watchdog " in p for p in hpcsif_processes()), hpcsif_processes()
    killed.kill()
    killed.wait()
    for _ in range(100):
        if not fuse_mounts() and not hpcsif_processes():
            break
        time.sleep(0.1)
    assert len(front.python_starts()) == before, front.python_starts()
    assert not fuse_mounts() and not hpcsif_processes()


def test_a_front_killed_while_it_mounts_leaves_nothing(front, images):
    """SIGKILL the moment squashfuse runs: the mount it makes after the front is gone has the
    watchdog the front started before it, which unmounts it."""
    sif = str(images.sif)
    front.run("exec", sif, "true")  # saves the plan; nothing mounted afterwards
    for _ in range(10):  # (a command that ends before it is seen cannot be caught)
        victim = subprocess.Popen([str(front.binary), "exec", sif, "true"], env=dict(os.environ))
        mounter = catch_child(victim.pid, "squashfuse_ll", stop=False)
        victim.kill()
        victim.wait()
        assert not left_behind()
        if mounter:
            return
    pytest.fail("squashfuse_ll was never seen mounting")


def test_a_closed_stdin_is_dev_null_for_the_payload(front, holder, images):
    """As in the Python engine: with stdin closed the payload reads nothing, not one of the
    launch's pipes that took descriptor 0."""
    for _ in range(2):  # the first start saves the plan, the second repeats it
        proc, started = front.run("exec", str(images.sif), "cat", stdin=None, preexec_fn=lambda: os.close(0))
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert not started


def test_a_plans_directory_others_could_write_is_ignored(front, holder, images):
    args = ["exec", str(images.sif), "echo", "ok"]
    front.run(*args)
    base = Path(os.environ["XDG_RUNTIME_DIR"]) / "hpcsif/plans"
    base.chmod(0o777)
    try:
        for _ in range(2):
            proc, started = front.run(*args)
            assert (proc.stdout, proc.returncode, started) == ("ok\n", 0, True)
    finally:
        base.chmod(0o700)
    assert front.run(*args)[1] is False


def test_repeat_as_an_unprivileged_user(images, unpriv_user, session_base):
    user_front = build_front(session_base / f"front-user-{os.getpid()}", USER_PYTHON)
    for p in (user_front.binary.parent, user_front.binary, user_front.binary.parent / "python"):
        p.chmod(0o755)
    user_front.starts.touch()
    user_front.starts.chmod(0o666)
    sif = str(images.sif)
    hold_cmd, env = as_user(unpriv_user, hpcsif_cmd("exec", sif, "sleep", "300"))
    holder = subprocess.Popen(hold_cmd, env=env, cwd=unpriv_user.home)
    try:
        time.sleep(1.5)
        probe = ["exec", sif, "sh", "-c", PROBE]
        results = []
        for _ in range(2):
            before = len(user_front.python_starts())
            cmd, env = as_user(unpriv_user, [str(user_front.binary), *probe])
            proc = subprocess.run(
                cmd, env=env, cwd=unpriv_user.home, capture_output=True, text=True, timeout=60
            )
            results.append((proc, len(user_front.python_starts()) > before))
        cmd, env = as_user(unpriv_user, hpcsif_cmd(*probe))
        direct = subprocess.run(
            cmd, env=env, cwd=unpriv_user.home, capture_output=True, text=True, timeout=60
        )
        (first, first_python), (again, again_python) = results
        assert first_python and not again_python and first.returncode == 3
        assert (again.returncode, again.stdout, again.stderr) == (
            direct.returncode,
            direct.stdout,
            direct.stderr,
        )
        assert f"uid={unpriv_user.uid}" in again.stdout
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    for _ in range(100):
        if not fuse_mounts():
            break
        time.sleep(0.05)
    assert not fuse_mounts()


def test_the_ranks_of_a_job_share_one_plan(front, holder, images):
    """Slurm's (slurmd's node name too), PMI's and the mpirun launchers' per-task variables pass
    through: their values are not part of the key."""
    probe = (
        'echo "$SLURM_PROCID $SLURM_STEP_ID $PMI_RANK $PMIX_RANK $OMPI_COMM_WORLD_RANK $MPI_LOCALRANKID '
        '$PALS_RANKID $SLURMD_NODENAME"; env | grep -c __HPCSIF || true'
    )
    args = ["exec", str(images.sif), "sh", "-c", probe]

    def rank(n: int, **extra: str) -> dict[str, str]:
        ids = {"SLURM_PROCID": str(n), "SLURM_STEP_ID": str(10 + n), "PMI_RANK": str(n), "PMIX_RANK": str(n)}
        ids.update(OMPI_COMM_WORLD_RANK=str(n), MPI_LOCALRANKID=str(n), PALS_RANKID=str(n))
        ids["SLURMD_NODENAME"] = f"node{n}"  # another node's ranks, under another srun
        return {**os.environ, "SLURM_JOB_PARTITION": "batch", **ids, **extra}

    proc, started = front.run(*args, env=rank(0))
    assert started and proc.stdout.startswith("0 10 0 0 0 0 0 node0\n")
    for n in (1, 7):
        proc, started = front.run(*args, env=rank(n))
        assert not started
        direct = python_cli(*args, env=rank(n))
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            direct.returncode,
            direct.stdout,
            direct.stderr,
        )
        assert proc.stdout.startswith(f"{n} {10 + n} {n} {n} {n} {n} {n} node{n}\n")
    # the partition is read (MPI profile defaults), and a new variable's name counts
    assert front.run(*args, env=rank(1, SLURM_JOB_PARTITION="gpu"))[1] is True
    assert front.run(*args, env=rank(1, SLURM_NEW_THING="x"))[1] is True


def test_32_concurrent_repeats_share_the_mount_and_leave_nothing(front, images):
    sif = str(images.sif)
    front.run("exec", sif, "true")
    first = short_holder(sif)
    before = len(front.python_starts())
    procs = [
        subprocess.Popen(
            [str(front.binary), "exec", sif, "sh", "-c", f"sleep 1.5; exit {i % 7}"],
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
        )
        for i in range(32)
    ]
    time.sleep(0.5)
    assert len(fuse_mounts()) == 1
    assert [p.wait(timeout=60) for p in procs] == [i % 7 for i in range(32)]
    first.wait(timeout=30)
    assert front.python_starts()[before:] == []
    assert left_behind() == []


#: launch flags for random combinations ({d}: a directory with a subdirectory ``sub``)
FLAG_POOL = [
    ["--cleanenv"],
    ["--env", "A=1"],
    ["--env", "B=$HOME x"],
    ["-B", "{d}:/data"],
    ["-B", "{d}:/data:ro"],
    ["--pwd", "/tmp"],
    ["--pwd", "/data/sub"],
    ["--contain"],
    ["--containall"],
    ["-p"],
    ["-i"],
    ["--hostname", "hx"],
    ["-n"],
    ["--no-home"],
    ["--no-mount", "tmp"],
    ["--no-mount", "home,cwd"],
    ["--home", "{d}:/h"],
    ["-S", "/s1"],
    ["--dns", "1.2.3.4"],
    ["--no-umask"],
    ["--no-eval"],
    ["--drop-caps", "all"],
    ["--mount", "type=bind,src={d},dst=/m"],
    ["--no-init", "-p"],
]


def test_random_flag_combinations_repeat_as_python_runs_them(front, holder, images, tmp_path):
    (tmp_path / "d/sub").mkdir(parents=True)
    rng = random.Random(20261127)
    env = {**os.environ, "APPTAINERENV_NEW": "n", "SLURM_PROCID": "3"}
    probe = PROBE.replace("ls /;", "ls / /data;")
    repeated = 0
    for _ in range(24):
        flags = [
            f.format(d=tmp_path / "d") for pick in rng.sample(FLAG_POOL, rng.randint(1, 4)) for f in pick
        ]
        action = rng.choice(["exec", "run", "test"])
        args = [action, *flags, str(images.sif), *(["sh", "-c", probe] if action == "exec" else ["x y"])]
        front.run(*args, env=env)
        again, started = front.run(*args, env=env)
        repeated += not started
        direct = python_cli(*args, env=env)
        assert (again.returncode, again.stdout, again.stderr) == (
            direct.returncode,
            direct.stdout,
            direct.stderr,
        ), args
    assert repeated >= 18  # a few print a warning (then nothing is saved)


def test_a_start_on_a_terminal_goes_to_python(front, holder, images):
    """On a terminal the engine gives the container the terminal (job control, /dev/tty), which
    a saved plan does not do: the front leaves such starts to Python."""
    import pty

    args = ["exec", str(images.sif), "sh", "-c", "test -t 0 && echo tty"]
    front.run(*args)
    assert front.run(*args)[1] is False  # saved, repeated without a terminal
    before = len(front.python_starts())
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal and stdin
        os.execve(str(front.binary), [str(front.binary), *args], dict(os.environ))
    out = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 1024):
            out += chunk
    os.waitpid(pid, 0)
    os.close(fd)
    assert b"tty" in out
    assert len(front.python_starts()) == before + 1


def test_other_supplementary_groups_make_a_new_plan(front, holder, images):
    """The container's /etc/group names the caller's groups: other groups, other plan."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to change the supplementary groups")
    import grp

    named = next(g for g in grp.getgrall() if g.gr_gid not in (0, os.getgid()))
    args = ["exec", str(images.sif), "cat", "/etc/group"]

    def with_groups(groups: str) -> tuple[subprocess.CompletedProcess, bool]:
        before = len(front.python_starts())
        cmd = ["setpriv", f"--groups={groups}", str(front.binary), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return proc, len(front.python_starts()) > before

    with_groups("0")
    assert with_groups("0")[1] is False  # saved, then repeated
    line = f"{named.gr_name}:x:{named.gr_gid}:root"
    for _ in range(2):  # through Python, then repeated: the same file both times
        proc, _started = with_groups(f"0,{named.gr_gid}")
        assert line in proc.stdout.splitlines(), proc.stdout


def test_nv_repeats_until_the_driver_changes(front, images, fake_driver):
    """``--nv`` starts repeat without Python (GPU jobs start often) and as Python runs them, until
    anything the binds were found from changes: a device node, the linker cache, a program in
    the driver's directories, or the device selection in the environment."""
    driver = Path(str(fake_driver).replace("hpcsif.toml", "driver"))
    dev = fake_driver.parent / "dev"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VISIBLE_DEVICES")}
    env["HPCSIF_CONFIG"] = str(fake_driver)
    args = ["exec", "--nv", str(images.sif), "sh", "-c", "ls /dev /.singularity.d/libs /usr/local/bin"]

    def repeats(*seen: str, **extra: str) -> None:
        run_env = {**env, **extra}
        first, started = front.run(*args, env=run_env)
        assert started, "a change must send the start back to Python"
        assert first.returncode == 0, first.stderr
        assert all(name in first.stdout.split() for name in seen), first.stdout
        again, started = front.run(*args, env=run_env)
        assert not started, f"the repeat started Python: {front.python_starts()[-1:]}"
        direct = python_cli(*args, env=run_env)
        assert (again.returncode, again.stdout, again.stderr) == (
            direct.returncode,
            direct.stdout,
            direct.stderr,
        )

    repeats("nvidia0", "nvidia1", "libcuda.so.1", "nvidia-smi")
    (dev / "nvidia2").write_text("nvidia2")
    repeats("nvidia2")
    lib = driver / "usr/lib/x86_64-linux-gnu"
    soname, real = "libnvidia-ptxjitcompiler.so.1", lib / "libnvidia-ptxjitcompiler.so.535.104.05"
    gcc = ["gcc", "-shared", f"-Wl,-soname,{soname}", "-o", str(real), "-x", "c", "/dev/null"]
    subprocess.run(gcc, check=True)
    subprocess.run(["ldconfig", "-r", str(driver)], check=True)  # (makes the .so.1 link too)
    repeats("libnvidia-ptxjitcompiler.so.1")
    (driver / "usr/sbin").mkdir()
    (driver / "usr/sbin/nvidia-persistenced").write_text("#!/bin/sh\n")
    (driver / "usr/sbin/nvidia-persistenced").chmod(0o755)
    repeats("nvidia-persistenced")
    repeats("nvidia1", NVIDIA_VISIBLE_DEVICES="1")
    proc, _ = front.run(*args, env={**env, "NVIDIA_VISIBLE_DEVICES": "1"})
    assert "nvidia0" not in proc.stdout.split()
    assert no_mounts_left()
