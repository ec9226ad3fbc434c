"""The ``fcntl`` lock mode waits in the kernel: prompt wake-ups, honest timeouts, takeover.

Holders and waiters are real processes; ``/proc/locks`` shows who holds or waits for a lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hpcsif.cache.locking import FcntlLock
from hpcsif.errors import CacheBusy
from tests.cache.conftest import CacheEnv, reap, wait_until

# holds the lock until told (a line on stdin); marks the work done first if given a path
HOLDER = """
import sys, time
from pathlib import Path
from hpcsif.cache.locking import FcntlLock
lock = FcntlLock(Path(sys.argv[1]), "the test image", 5)
assert lock.try_acquire()
print("held", flush=True)
sys.stdin.readline()
if len(sys.argv) > 2:
    Path(sys.argv[2]).touch()
released = time.time()
lock.release()
print(released, flush=True)
sys.stdin.readline()
"""

# waits until it gets the lock or the work is done; a taker does the work
WAITER = """
import sys, time
from pathlib import Path
from hpcsif.cache.locking import FcntlLock
lock = FcntlLock(Path(sys.argv[1]), "the test image", 30)
done = Path(sys.argv[2])
taken = lock.acquire(done=done.exists)
print("took" if taken else "done", time.time(), flush=True)
if taken:
    time.sleep(0.3)
    done.touch()
    lock.release()
"""


def _flocks(path: Path) -> list[tuple[bool, str, int]]:
    """(blocked, READ/WRITE, pid) of every ``flock`` held or awaited on ``path``."""
    suffix = f":{os.stat(path).st_ino}"
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        blocked = fields[1] == "->"
        fields = fields[2:] if blocked else fields[1:]
        if fields[0] == "FLOCK" and fields[4].endswith(suffix):
            found.append((blocked, fields[2], int(fields[3])))
    return found


def _hold(cache_env: CacheEnv, path: Path, *done: Path) -> subprocess.Popen:
    holder = cache_env.spawn(HOLDER, str(path), *map(str, done))
    assert holder.stdout.readline().strip() == "held"
    return holder


def _tell(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()


def _blocked(path: Path, n: int) -> bool:
    return sum(blocked for blocked, _, _ in _flocks(path)) == n


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    path = tmp_path / "k.lock"
    path.touch()
    return path


def test_waiter_wakes_when_the_holder_releases(cache_env: CacheEnv, lock_path: Path) -> None:
    holder = _hold(cache_env, lock_path)
    try:
        # released long after the waiter's occasional checks have slowed to one per 0.5 s
        threading.Timer(1.3, _tell, (holder,)).start()
        assert FcntlLock(lock_path, "the test image", 10).acquire()
        taken = time.time()
        released = float(holder.stdout.readline())
        assert 0 <= taken - released < 0.2
    finally:
        reap(holder)


def test_all_waiters_see_the_result_at_once(cache_env: CacheEnv, lock_path: Path, tmp_path: Path) -> None:
    done = tmp_path / "published"
    holder = _hold(cache_env, lock_path, done)
    waiters = [cache_env.spawn(WAITER, str(lock_path), str(done)) for _ in range(8)]
    try:
        wait_until(lambda: _blocked(lock_path, 8), 60, "8 waiters blocked on the lock")
        assert {kind for blocked, kind, _ in _flocks(lock_path) if blocked} == {"READ"}
        _tell(holder)
        released = float(holder.stdout.readline())
        outcomes = [w.communicate(timeout=30)[0].split() for w in waiters]
        # none of them took the lock after the work was published, none waited in line
        assert {kind for kind, _ in outcomes} == {"done"}
        assert max(float(t) for _, t in outcomes) - released < 0.5
    finally:
        reap(holder, *waiters)


def test_waiter_that_times_out_holds_nothing(cache_env: CacheEnv, lock_path: Path) -> None:
    holder = _hold(cache_env, lock_path)
    try:
        started = time.monotonic()
        with pytest.raises(CacheBusy, match=f"held by pid {holder.pid}"):
            FcntlLock(lock_path, "the test image", 0.5).acquire()
        assert 0.5 <= time.monotonic() - started < 2.0
        assert (False, "WRITE", holder.pid) in _flocks(lock_path)
        _tell(holder)
        holder.stdout.readline()
        # the abandoned wait gets the lock from the kernel now and must drop it at once
        time.sleep(0.3)
        assert _flocks(lock_path) == []
        other = _hold(cache_env, lock_path)  # takes it without waiting
        other.kill()
        other.wait()
    finally:
        reap(holder)


def test_interrupted_waiter_holds_nothing(cache_env: CacheEnv, lock_path: Path) -> None:
    holder = _hold(cache_env, lock_path)
    checks = 0

    def interrupted() -> bool:
        nonlocal checks
        checks += 1
        if checks == 3:
            raise KeyboardInterrupt
        return False

    try:
        with pytest.raises(KeyboardInterrupt):
            FcntlLock(lock_path, "the test image", 10).acquire(done=interrupted)
        _tell(holder)
        holder.stdout.readline()
        time.sleep(0.3)
        assert _flocks(lock_path) == []
    finally:
        reap(holder)


def test_sigkilled_holder_is_taken_over_by_one_waiter(
    cache_env: CacheEnv, lock_path: Path, tmp_path: Path
) -> None:
    done = tmp_path / "published"
    holder = _hold(cache_env, lock_path)
    waiters = [cache_env.spawn(WAITER, str(lock_path), str(done)) for _ in range(4)]
    try:
        wait_until(lambda: _blocked(lock_path, 4), 60, "4 waiters blocked on the lock")
        holder.send_signal(signal.SIGKILL)
        outcomes = [w.communicate(timeout=30)[0].split()[0] for w in waiters]
        assert sorted(outcomes) == ["done", "done", "done", "took"]
        assert _flocks(lock_path) == []
    finally:
        reap(holder, *waiters)


def test_fcntl_lock_is_not_reentrant_across_instances(lock_path: Path) -> None:
    a = FcntlLock(lock_path, "x", 0.1)
    b = FcntlLock(lock_path, "x", 0.1)
    assert a.try_acquire() and a.try_acquire()  # idempotent for the holder
    assert not b.try_acquire()
    a.release()
    a.release()
    assert b.try_acquire()
    b.release()
