"""The O_EXCL lock mode: takeover of a holder that stopped heartbeating, never of a live one."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from hpcsif.cache.locking import ExclLock, FcntlLock
from hpcsif.errors import CacheBusy
from tests.cache.conftest import CacheEnv

HOLDER = """
import sys, time
from hpcsif.cache.locking import ExclLock
lock = ExclLock(__import__("pathlib").Path(sys.argv[1]), "the test image", 5, float(sys.argv[2]))
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def _hold(cache_env: CacheEnv, path: Path, stale: float):
    proc = cache_env.spawn(HOLDER, str(path), str(stale))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_holder_is_not_taken_over(cache_env: CacheEnv, tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    holder = _hold(cache_env, path, 1.0)
    try:
        started = time.monotonic()
        with pytest.raises(CacheBusy, match=f"held by pid {holder.pid}"):
            ExclLock(path, "the test image", 3.0, 1.0).acquire()
        assert time.monotonic() - started >= 3.0  # three stale periods passed, the heartbeat kept it
        assert path.exists()
    finally:
        holder.kill()
        holder.wait()


def test_holder_without_heartbeat_is_taken_over_after_stale_timeout(
    cache_env: CacheEnv, tmp_path: Path
) -> None:
    path = tmp_path / "k.lock"
    holder = _hold(cache_env, path, 0.5)
    try:
        holder.send_signal(signal.SIGSTOP)  # alive, but its heartbeat thread stops
        stopped = time.monotonic()
        waiter = ExclLock(path, "the test image", 10.0, 0.5)
        waiter.acquire()
        waited = time.monotonic() - stopped
        assert 0.4 <= waited < 5.0
        assert waiter.holder()["pid"] != holder.pid and waiter.still_held()
        waiter.release()
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait()


def test_dead_holder_on_this_host_is_taken_over_at_once(cache_env: CacheEnv, tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    holder = _hold(cache_env, path, 60)
    holder.kill()
    holder.wait()
    started = time.monotonic()
    with ExclLock(path, "the test image", 10.0, 60) as lock:
        assert lock.still_held()
    assert time.monotonic() - started < 2.0


def test_excl_lock_excludes_within_one_process(tmp_path: Path) -> None:
    a = ExclLock(tmp_path / "k.lock", "x", 0.2, 30)
    b = ExclLock(tmp_path / "k.lock", "x", 0.2, 30)
    assert a.try_acquire()
    assert not b.try_acquire()
    a.release()
    assert b.try_acquire()
    b.release()


def test_fcntl_lock_names_its_holder(tmp_path: Path) -> None:
    a = FcntlLock(tmp_path / "k.lock", "x", 0.1)
    b = FcntlLock(tmp_path / "k.lock", "x", 0.1)
    a.acquire()
    with pytest.raises(CacheBusy, match="held by pid"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()
