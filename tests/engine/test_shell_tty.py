"""``hpcsif shell`` on a terminal: the prompt names the container, job control works, exit code returns."""

from __future__ import annotations

import os
import pty
import select
import time

import pytest

from tests.engine.conftest import fuse_mounts, hpcsif_cmd

pytestmark = pytest.mark.slow


def _read_until(fd: int, needle: bytes, timeout: float = 20.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_shell(images):
    cmd = hpcsif_cmd("shell", str(images.sif))
    pid, fd = pty.fork()
    if pid == 0:  # child: has the pty as its controlling terminal
        os.execv(cmd[0], cmd)
    try:
        prompt = _read_until(fd, b"> ", timeout=60)
        assert b"Apptainer> " in prompt  # Apptainer's prompt
        # job control: a background job is listed and can be brought back
        os.write(fd, b"sleep 30 &\njobs\n")
        assert b"sleep 30" in _read_until(fd, b"Running")
        os.write(fd, b'kill %1; echo "in=$SINGULARITY_NAME"; exit 3\n')
        assert f"in={images.sif.name}".encode() in _read_until(fd, b"in=" + images.sif.name.encode())
        _read_until(fd, b"\0", timeout=5)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 3
    assert not fuse_mounts()


def test_exec_on_terminal_reads_input_and_ctrl_c_reaches_payload(images):
    # the signal must find the shell in `wait` (a builtin), not racing with the start of a child
    script = (
        "trap 'echo got-INT; kill $p; exit 9' INT; echo ready; read x; echo \"read=$x\"; "
        "sleep 30 & p=$!; echo waiting; wait"
    )
    cmd = hpcsif_cmd("exec", str(images.sif), "sh", "-c", script)
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(cmd[0], cmd)
    try:
        out = _read_until(fd, b"ready", timeout=60)
        assert b"ready" in out, out
        os.write(fd, b"typed line\n")
        out = _read_until(fd, b"waiting")
        assert b"read=typed line" in out and b"waiting" in out, out
        os.write(fd, b"\x03")  # Ctrl-C: the terminal signals our process group; hpcsif forwards it
        out = _read_until(fd, b"got-INT")
        assert b"got-INT" in out, out
        _read_until(fd, b"\0", timeout=5)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 9
    assert not fuse_mounts()


@pytest.mark.parametrize("action", ["exec", "run"])
def test_terminal_is_the_containers_controlling_terminal(images, pub_tmp, action):
    """As in Apptainer, exec and run on a terminal get it as their controlling terminal, in the
    foreground: /dev/tty opens, and an interactive shell (a runscript's, an image's CMD) has job
    control instead of 'can't access tty' (bwrap --new-session took it away)."""
    script = pub_tmp / "interactive"
    script.write_text("#!/bin/sh\necho to-tty > /dev/tty && exec sh -i\n")
    script.chmod(0o755)
    args = [str(script)] if action == "exec" else []
    cmd = hpcsif_cmd(action, "-B", f"{script}:/.singularity.d/runscript", str(images.sif), *args)
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(cmd[0], cmd)
    try:
        out = _read_until(fd, b"> ", timeout=60)
        assert b"to-tty" in out and b"job control" not in out, out
        os.write(fd, b"sleep 30 &\njobs\n")
        assert b"Running" in _read_until(fd, b"Running")
        os.write(fd, b"kill %1; exit 4\n")
        _read_until(fd, b"\0", timeout=5)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 4
    assert not fuse_mounts()


def test_background_job_leaves_the_terminal_to_the_shell(images):
    """`hpcsif exec … &` from an interactive shell: when it ends, the shell waiting at its prompt
    keeps its terminal (taking it back would leave the shell unable to read: it would exit)."""
    line = " ".join(
        f"'{a}'" for a in hpcsif_cmd("exec", str(images.sif), "sh", "-c", "sleep 1; echo job-$((6*7))")
    )
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], {**os.environ, "TERM": "xterm"})
    try:
        os.write(fd, f"{line} &\n".encode())
        assert b"job-42" in _read_until(fd, b"job-42", timeout=60)
        time.sleep(1)  # the job has ended while the shell was reading
        os.write(fd, b"echo still-$((6*7)); exit 5\n")
        assert b"still-42" in _read_until(fd, b"still-42"), "the shell lost its terminal"
        _read_until(fd, b"\0", timeout=5)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5
