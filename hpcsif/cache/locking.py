"""Per-key locks that make a conversion happen exactly once.

Two modes, chosen by ``cache.lock_mode``:

``fcntl``
    ``flock`` on the lock file. The kernel drops the lock when the holder dies, even by
    SIGKILL, and wakes waiters the moment it is released. Right for node-local disks.
``excl``
    A lock file created with ``O_CREAT|O_EXCL`` holding the holder's pid, host and a
    random token, kept fresh by a heartbeat thread that touches it. A waiter takes over a
    lock whose heartbeat stopped for ``cache.stale_lock_seconds`` (or whose holder is a dead
    process on this host). For NFS and Lustre, where ``fcntl`` locks are unreliable.

Either way a waiter logs one "waiting for conversion of … (held by pid P on HOST)" line and
raises :class:`~hpcsif.errors.CacheBusy` when ``cache.lock_timeout`` runs out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcsif.cache.layout import hostname
from hpcsif.config import get_config
from hpcsif.errors import CacheBusy, CacheError

log = logging.getLogger(__name__)


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (None if it does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields restart after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, start: int | None = None) -> bool:
    """True if ``pid`` runs on this host (and, when ``start`` is given, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    if start is None:
        return True
    actual = process_start_time(pid)
    return actual is None or actual == start


def holder_record(what: str) -> dict[str, Any]:
    """Who holds a lock or lease: this process, on this host."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": hostname(),
        "start": process_start_time(pid),
        "what": what,
        "time": time.time(),
    }


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "held by another process"
    return f"held by pid {info.get('pid', '?')} on {info.get('host', '?')}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_advisory(path: Path, data: bytes) -> None:
    """Replace a small advisory file atomically; no fsync, it only feeds "held by" messages."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.debug("cannot record the lock holder in %s: %s", path, exc)


class KeyLock(ABC):
    """An exclusive lock on one cache key; a context manager."""

    def __init__(self, path: Path, what: str, timeout: float) -> None:
        self.path = path
        self.what = what
        self.timeout = timeout

    @abstractmethod
    def try_acquire(self) -> bool:
        """Take the lock if it is free; True on success. Never waits."""

    @abstractmethod
    def release(self) -> None:
        """Give the lock back (idempotent)."""

    @abstractmethod
    def holder(self) -> dict[str, Any] | None:
        """What is known about the current holder (pid, host …), if anything."""

    def still_held(self) -> bool:
        """False if the lock was lost while held (only the ``excl`` mode can lose it)."""
        return True

    def discard(self) -> None:
        """Release the lock and remove its files: only once what it guards is done for good.

        A process still queued on the removed file, and one that creates it anew, may then
        both hold "the" lock, so this is only right when any later holder has nothing to do.
        """
        self.release()

    def acquire(self, timeout: float | None = None, *, done: Callable[[], bool] | None = None) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds (default: the configured timeout).

        While waiting, ``done()`` is checked too: once it is true (the holder published what we
        want) this returns False without taking the lock, so waiters do not file through the
        lock one by one after the work is done. Returns True when the lock was taken.
        """
        timeout = self.timeout if timeout is None else timeout
        if self.try_acquire():
            return True
        log.warning("waiting for %s (%s)", self.what, _describe(self.holder()))
        taken = self._wait(time.monotonic() + timeout, done)
        if taken is None:
            raise CacheBusy(
                f"gave up waiting for {self.what} after {timeout:g}s ({_describe(self.holder())}); "
                "raise cache.lock_timeout or try again later"
            )
        return taken

    def _wait(self, deadline: float, done: Callable[[], bool] | None) -> bool | None:
        """Wait until the lock is taken (True), ``done()`` (False) or ``deadline`` passes (None).

        This default polls; ``deadline`` is on the :func:`time.monotonic` clock.
        """
        pause = 0.01
        while not self.try_acquire():
            if done is not None and done():
                return False
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 1.5, 0.1)
        return True

    def __enter__(self) -> KeyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock(path: Path, operation: int) -> int | None:
    """Open ``path`` and ``flock`` it; the descriptor, or None when ``LOCK_NB`` found it taken.

    Lock files are never removed, but should one be replaced under us, the lock we got guards
    nothing: then this locks the new file instead.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CacheError(f"cannot open lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, operation)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:
            same = False
        except OSError as exc:
            os.close(fd)
            raise CacheError(f"cannot lock {path}: {exc.strerror}") from None
        if same:
            return fd
        os.close(fd)


class _BlockingFlock:
    """A blocking ``flock`` in a daemon thread, so that the waiter can give up at a deadline.

    The kernel wakes the thread the moment the lock can be had. A waiter that gives up calls
    :meth:`abandon`: the descriptor is closed (dropping the lock) whether the thread got it
    before or gets it after, so no lock outlives its waiter's interest.
    """

    def __init__(self, path: Path, operation: int) -> None:
        self._mutex = threading.Lock()
        self._ready = threading.Event()
        self._fd: int | None = None
        self._error: CacheError | None = None
        self._abandoned = False
        threading.Thread(
            target=self._run, args=(path, operation), name=f"hpcsif-flock-{path.name}", daemon=True
        ).start()

    def _run(self, path: Path, operation: int) -> None:
        try:
            fd = _flock(path, operation)
        except CacheError as exc:
            self._error = exc
        else:
            with self._mutex:
                if self._abandoned and fd is not None:  # blocking: fd is never None
                    os.close(fd)
                    return
                self._fd = fd
        self._ready.set()

    def wait(self, timeout: float) -> int | None:
        """The locked descriptor once the lock is had (within ``timeout`` seconds), else None."""
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error
        with self._mutex:
            fd, self._fd = self._fd, None
        return fd

    def abandon(self) -> None:
        """Stop wanting the lock: the thread drops it as soon as it gets it."""
        with self._mutex:
            self._abandoned = True
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class FcntlLock(KeyLock):
    """``flock``-based lock with a side file naming the holder.

    The stdlib ``fcntl.flock`` rather than :mod:`filelock`: every one of the many processes
    that wait for a conversion takes this lock, and ``filelock`` 4 costs each about 12 ms to
    import and 20 ms more at interpreter exit, which at 64 waiters on 2 cores is most of the
    wait. What is needed here is the bare kernel primitive, plus a kernel wait (not polling).
    """

    def __init__(self, path: Path, what: str, timeout: float) -> None:
        super().__init__(path, what, timeout)
        self._info_path = path.with_name(path.name + ".holder")
        self._fd: int | None = None
        self._owner = 0  # the pid that took the lock: a forked child must not unlock it

    def try_acquire(self) -> bool:
        """Take the ``flock`` if free and record this process as its holder."""
        if self._fd is None:
            fd = _flock(self.path, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                return False
            self._took(fd)
        return True

    def _took(self, fd: int) -> None:
        self._fd, self._owner = fd, os.getpid()
        _write_advisory(self._info_path, json.dumps(holder_record(self.what)).encode())

    def _wait(self, deadline: float, done: Callable[[], bool] | None) -> bool | None:
        """Sleep in the kernel until the lock is released, checking ``done()`` at each release.

        Waiters first ask for a shared lock, which every one of them gets the moment the
        holder lets go: all see its result at once instead of taking the lock in turn. Only
        when nothing was published (the holder died or failed) do they queue for the
        exclusive lock, and the one that gets it takes over. ``done()`` is also checked now
        and then, in case what we wait for appears while the lock stays held.
        """
        # with nothing to watch for, there is no result to see: queue for the lock itself
        operation = fcntl.LOCK_EX if done is None else fcntl.LOCK_SH
        finished = done or (lambda: False)
        while True:
            if finished():
                return False
            waiter = _BlockingFlock(self.path, operation)
            try:
                fd = self._await(waiter, deadline, finished)
            finally:
                waiter.abandon()  # gave up, or was interrupted: the thread must not keep the lock
            if fd is None:  # done, or out of time
                return False if finished() else None
            if operation == fcntl.LOCK_EX and not finished():
                self._took(fd)
                return True
            os.close(fd)  # seen what there was to see
            operation = fcntl.LOCK_EX

    @staticmethod
    def _await(waiter: _BlockingFlock, deadline: float, finished: Callable[[], bool]) -> int | None:
        """The locked descriptor, or None once ``finished()`` or at the deadline."""
        pause = 0.05
        while (fd := waiter.wait(min(pause, max(deadline - time.monotonic(), 0)))) is None:
            if finished() or time.monotonic() >= deadline:
                return None
            pause = min(pause * 2, 0.5)
        return fd

    def release(self) -> None:
        """Drop the ``flock``."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._owner == os.getpid():
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def discard(self) -> None:
        """Remove the lock file and its holder note, then drop the ``flock``."""
        if self._fd is not None:
            for path in (self._info_path, self.path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.release()

    def holder(self) -> dict[str, Any] | None:
        """The last recorded holder."""
        return _read_json(self._info_path)


class ExclLock(KeyLock):
    """``O_EXCL`` lock file with a heartbeat and stale-holder takeover (NFS/Lustre)."""

    def __init__(self, path: Path, what: str, timeout: float, stale_seconds: float) -> None:
        super().__init__(path, what, timeout)
        self.stale_seconds = stale_seconds
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False

    def try_acquire(self) -> bool:
        """Create the lock file; when it exists, take it over if its holder is stale or dead."""
        if self._try_create():
            return True
        info, age = self._observe()
        if info is not None and self._is_stale(info, age):
            self._take_over(info, age)
            return self._try_create()
        return False

    def _try_create(self) -> bool:
        token = secrets.token_hex(8)
        record = {**holder_record(self.what), "token": token}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise CacheError(f"cannot create lock {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        self._token, self._lost = token, False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"hpcsif-lock-{self.path.name}", daemon=True
        )
        self._thread.start()
        return True

    def _observe(self) -> tuple[dict[str, Any] | None, float]:
        """The holder record and seconds since its last heartbeat (None if no lock file)."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        # a lock file being written right now may still be empty: treat it as fresh
        return _read_json(self.path) or {}, time.time() - mtime

    def _is_stale(self, info: dict[str, Any], age: float) -> bool:
        if age > self.stale_seconds:
            return True
        pid = info.get("pid")
        return (
            info.get("host") == hostname()
            and isinstance(pid, int)
            and not process_alive(pid, info.get("start"))
        )

    def _take_over(self, info: dict[str, Any], age: float) -> None:
        """Remove a stale lock file; a ``.break`` file makes sure only one waiter does it."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - breaker.stat().st_mtime > self.stale_seconds:
                    breaker.unlink()  # a breaker that died mid-takeover
            return
        os.close(fd)
        try:
            current, current_age = self._observe()
            # only remove the very lock file we judged stale, not a fresh one created since
            if (
                current is not None
                and current.get("token") == info.get("token")
                and self._is_stale(current, current_age)
            ):
                log.warning(
                    "taking over the lock on %s from pid %s on %s (no heartbeat for %.0fs)",
                    self.what,
                    info.get("pid", "?"),
                    info.get("host", "?"),
                    current_age,
                )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            with contextlib.suppress(FileNotFoundError):
                breaker.unlink()

    def _heartbeat(self) -> None:
        interval = max(self.stale_seconds / 4, 0.05)
        while not self._stop.wait(interval):
            info = _read_json(self.path)
            if info is None or info.get("token") != self._token:
                self._lost = True
                log.error("lost the lock on %s: another process took it over", self.what)
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def still_held(self) -> bool:
        """False if another process took the lock over (our heartbeat was too late)."""
        return self._token is not None and not self._lost

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        if self._token is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        info = _read_json(self.path)
        if info is not None and info.get("token") == self._token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._token = None

    def holder(self) -> dict[str, Any] | None:
        """The record in the lock file."""
        return _read_json(self.path)


def key_lock(path: Path, what: str, *, mode: str | None = None) -> KeyLock:
    """A lock on ``path`` in the configured (or given) mode, with the configured timeouts."""
    cfg = get_config()
    mode = mode or cfg.get("cache.lock_mode", "fcntl")
    timeout = float(cfg.get("cache.lock_timeout", 3600))
    if mode == "fcntl":
        return FcntlLock(path, what, timeout)
    if mode == "excl":
        return ExclLock(path, what, timeout, float(cfg.get("cache.stale_lock_seconds", 120)))
    raise CacheError(f"cache.lock_mode {mode!r} is not one of: fcntl, excl")
