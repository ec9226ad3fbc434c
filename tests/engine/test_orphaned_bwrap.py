"""A holder SIGKILLed while its bwrap starts leaves nothing behind (hpcsif/engine/mounts.py,
``end_orphaned_bwraps``, and its twin in hpcsif/native/front.c).

bwrap arms ``--die-with-parent`` in its sandbox child only after cloning it: a front or Python
CLI killed in between takes the bwrap parent with it, and the child waits for that dead parent
for ever, holding the caller's output pipe and the mount. Whoever next finds the dead holder (the
mount's watchdog, or the next container to leave) ends every bwrap on the mount that no live
holder started. The moment cannot be hit on purpose, so the tests make such a process: a bwrap
on the mount whose parent is gone (a shell that started it in the background and ended).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.conftest import fuse_mounts, hpcsif_cmd, hpcsif_processes, left_behind
from tests.engine.test_native_front import build_front

pytestmark = pytest.mark.slow


def _bwraps_on(mnt: str) -> dict[int, int]:
    """pid -> parent pid of the live bwrap processes whose command line names *mnt*."""
    found = {}
    for name in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            fields = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        if os.path.basename(argv[0]) == b"bwrap" and mnt.encode() in argv and fields[0] != "Z":
            found[int(name)] = int(fields[1])
    return found


@pytest.mark.skipif(os.getuid() != 0, reason="the test's own bwrap runs without a user namespace")
@pytest.mark.parametrize("via", ["native front", "Python CLI"])
def test_a_bwrap_a_killed_holder_left_is_ended(via, tmp_path, images):
    sif = str(images.sif)
    if via == "native front":
        front = build_front(tmp_path / "front", sys.executable)
        front.run("exec", sif, "true")  # saves the plan: the next start is the front's own
        cmd = [str(front.binary)]
    else:
        cmd = hpcsif_cmd()
    holder = subprocess.Popen([*cmd, "exec", sif, "sleep", "60"], env=dict(os.environ))
    try:
        deadline = time.monotonic() + 30
        while not (fuse_mounts() and any("bwrap" in p for p in hpcsif_processes())):
            assert time.monotonic() < deadline, "the container never started"
            time.sleep(0.05)
        mnt = fuse_mounts()[0].split()[1]
        started = set(_bwraps_on(mnt))
        bwrap = f"bwrap --die-with-parent --ro-bind {mnt} / --proc /proc --dev /dev sleep 60"
        script = f"{bwrap} </dev/null >/dev/null 2>&1 &"
        subprocess.run(["sh", "-c", script], check=True)
        orphans = {}
        while not orphans:
            assert time.monotonic() < deadline, "the orphaned bwrap never started"
            orphans = {pid for pid in _bwraps_on(mnt) if pid not in started}
            time.sleep(0.05)
    finally:
        holder.kill()
        holder.wait()
    assert not left_behind(), "a bwrap on the mount, or the mount itself, outlived the killed holder"
    assert not _bwraps_on(mnt)
