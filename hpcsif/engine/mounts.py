"""Node-local FUSE mounts shared by concurrent containers, reference counted, crash safe.

Every mount lives in its own directory under the per-user runtime directory
(``engine.mount_dir``, else ``$XDG_RUNTIME_DIR/hpcsif``, else ``/tmp/hpcsif-$UID``)::

    <key>/lock          flock(2) taken around every state change
    <key>/mnt/          the mount point
    <key>/holders/      one empty file ``<pid>.<starttime>`` per process using the mount

The key of a SIF mount is the image file's identity (device, inode, mtime, size) and the
partition offset, so all containers of one image on a node share one ``squashfuse``. The last
holder to leave unmounts. A holder that dies without leaving (SIGKILL) is covered by a small
watchdog process started with the mount: it wakes on every mount-table change and every half
second, and unmounts once no holder is alive (pid reuse is ruled out by the start time). The
watchdog is started before the mount command, which runs in the watchdog's process group; the
watchdog looks after the mount once the command has ended, so that a holder killed while it
mounts leaves no mount without a watchdog. Whoever finds a dead holder also ends the bwrap
processes on the mount that no live holder started (:func:`end_orphaned_bwraps`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hpcsif.errors import EngineError, MissingToolError

log = logging.getLogger(__name__)

_POLL_MS = 500
#: after this many failed (busy) unmounts the watchdog detaches the mount lazily
_LAZY_AFTER = 20


def runtime_dir() -> Path:
    """The per-user directory holding mount points (created 0700; must be owned by the caller)."""
    from hpcsif.config import get_config

    configured = get_config().get("engine.mount_dir")
    return private_dir(Path(os.path.expanduser(configured)) if configured else default_runtime_base())


def default_runtime_base() -> Path:
    """``$XDG_RUNTIME_DIR/hpcsif`` when that is writable, else ``/tmp/hpcsif-$UID``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "hpcsif"
    return Path(f"/tmp/hpcsif-{os.getuid()}")


def private_dir(base: Path) -> Path:
    """*base*, created 0700 if missing; refused unless the caller owns it and only the caller may write."""
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = base.lstat()
    except OSError as exc:
        raise EngineError(f"cannot create the mount directory {base}: {exc.strerror}") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o022 or not stat.S_ISDIR(st.st_mode):
        # someone else made it (e.g. /tmp squatting): never mount or run from there
        raise EngineError(
            f"mount directory {base} is not private to uid {os.getuid()}; remove it or set engine.mount_dir"
        )
    return base


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` from the state on (``[0]`` state, ``[1]`` parent,
    ``[2]`` process group, ``[19]`` start time); None when *pid* does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: fields start after the last ')'
    return stat[stat.rindex(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of *pid*, None when it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _mount_state(mnt: Path) -> str:
    """``mounted``, ``absent`` or ``stale`` (a FUSE mount whose daemon is gone)."""
    try:
        inner = os.stat(mnt).st_dev
    except OSError:
        # even lstat reaches a FUSE mount's root (a damaged squashfs answers ENOENT there):
        # the parent's listing says whether the mount point is there
        try:
            return "stale" if mnt.name in os.listdir(mnt.parent) else "absent"
        except OSError:
            return "absent"
    return "mounted" if inner != os.stat(mnt.parent).st_dev else "absent"


def unmount(mnt: Path, *, lazy: bool = False) -> bool:
    """Unmount the FUSE mount at *mnt*; True on success (False: busy or not mounted)."""
    import subprocess

    for prog in ("fusermount3", "fusermount"):
        cmd = [prog, "-u", "-q", *(["-z"] if lazy else []), str(mnt)]
        try:
            res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        except FileNotFoundError:
            continue
        if res.returncode == 0:
            return True
        log.debug("%s: %s", " ".join(cmd), res.stderr.strip())
        return False
    raise MissingToolError("fusermount3", "fuse3")


#: seconds between the tries of :func:`_unmount_soon` (0.2 s in all)
UNMOUNT_BACKOFF = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.073)


def _unmount_soon(mnt: Path) -> bool:
    """:func:`unmount`, retried briefly (about 0.2 s, soon at first) while *mnt* is busy.

    A container's mount namespace lets go of *mnt* only a moment after its last process has
    exited, and a FUSE daemon stacked on it (fuse-overlayfs over squashfuse) only just after
    its own unmount.
    """
    for delay in UNMOUNT_BACKOFF:
        if unmount(mnt):
            return True
        time.sleep(delay)
    return unmount(mnt)


class SharedMount:
    """A reference-counted mount; :meth:`acquire` mounts if needed, :meth:`release` unmounts if last.

    *mount_cmd* builds the mount command line for a mount point. The directory is removed
    when the mount goes away.
    """

    def __init__(self, key: str, mount_cmd: Callable[[Path], list[str]]) -> None:
        self.dir = runtime_dir() / key
        self.mnt = self.dir / "mnt"
        self._mount_cmd = mount_cmd
        self._holder: Path | None = None
        #: called with the mount point by the last holder to leave, before it unmounts
        self.before_unmount: Callable[[Path], None] | None = None
        #: descriptors the mount command inherits (a lock that must live as long as the mount)
        self.pass_fds: tuple[int, ...] = ()

    @classmethod
    def existing(cls, directory: Path) -> SharedMount:
        """The mount kept in *directory*, to look after (it is never mounted from here)."""
        mount = cls.__new__(cls)
        mount.dir, mount.mnt, mount._holder = directory, directory / "mnt", None
        mount.before_unmount, mount.pass_fds = None, ()
        return mount

    # -- locking -----------------------------------------------------------------------------
    def _locked(self) -> int:
        """Take the mount's lock; retried when the directory was removed while we waited."""
        lock = self.dir / "lock"
        while True:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue  # the directory went away between mkdir and open
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the last user removed the directory: start again

    def _remove(self) -> None:
        """Delete the mount's directory (lock held, nothing mounted); the lock file goes last."""
        _remove_tree(self.dir / "holders")
        for name in ("upper", "work", "points"):
            _remove_tree(self.dir / name)
        with contextlib.suppress(OSError):
            os.rmdir(self.mnt)
        _unlink(self.dir / "lock")
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)

    def live_holders(self) -> list[str]:
        """Names of holder files whose process is alive; removes those of dead processes, and
        ends what a holder that died without leaving (SIGKILL) left of its container."""
        alive = []
        try:
            names = os.listdir(self.dir / "holders")
        except FileNotFoundError:
            return []
        dead = False
        for name in names:
            pid, _, start = name.partition(".")
            if pid.isdigit() and str(process_start_time(int(pid))) == start:
                alive.append(name)
            else:
                _unlink(self.dir / "holders" / name)
                dead = True
        if dead:
            end_orphaned_bwraps(self.mnt, {int(name.partition(".")[0]) for name in alive})
        return alive

    # -- public --------------------------------------------------------------------------------
    def acquire(self, pid: int | None = None) -> Path:
        """Register *pid* (default: this process) as a user and make sure the mount exists."""
        pid = pid or os.getpid()
        fd = self._locked()
        try:
            state = _mount_state(self.mnt)
            if state == "stale":
                unmount(self.mnt, lazy=True)
            if state != "mounted":
                self._mount()
            (self.dir / "holders").mkdir(exist_ok=True)
            holder = self.dir / "holders" / f"{pid}.{process_start_time(pid)}"
            holder.touch()
            self._holder = holder
        finally:
            os.close(fd)
        return self.mnt

    def release(self) -> None:
        """Drop this process's registration; unmount when no live holder remains."""
        if self._holder is None:
            return
        fd = self._locked()
        try:
            _unlink(self._holder)
            self._holder = None
            if self.live_holders():
                return
            if self.before_unmount and _mount_state(self.mnt) == "mounted":
                self.before_unmount(self.mnt)
            if _mount_state(self.mnt) != "absent" and not _unmount_soon(self.mnt):
                log.debug("%s busy; the watchdog will unmount it", self.mnt)
                return
            self._remove()
        finally:
            os.close(fd)

    def command(self) -> list[str]:
        """The command line that mounts it (the native front repeats it, hpcsif/native/front.c)."""
        return self._mount_cmd(self.mnt)

    def __enter__(self) -> Path:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _mount(self) -> None:
        import subprocess

        self.mnt.mkdir(exist_ok=True)
        cmd = self._mount_cmd(self.mnt)
        # the watchdog first: should we be killed while the command mounts, the mount it makes
        # has a watchdog all the same (one that waits for the command's end: see watch())
        group = self._start_watchdog()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                process_group=group,
                pass_fds=self.pass_fds,
            )
        except FileNotFoundError:
            raise _missing(cmd[0]) from None
        stderr = proc.communicate()[1]
        if proc.returncode != 0:
            msg = stderr.strip().splitlines()
            hint = ""
            if not os.access("/dev/fuse", os.R_OK | os.W_OK):
                hint = (
                    " (/dev/fuse is not usable by this user: an admin must make it mode 0666,"
                    " or run a SIF with --unsquash)"
                )
            raise EngineError(
                f"{cmd[0]} failed to mount {self.dir.name}: {msg[-1] if msg else proc.returncode}{hint}"
            )

    def _start_watchdog(self) -> int:
        """``python -m hpcsif.engine.mounts --watch DIR --group``, which cleans up after crashes:
        its pid, the id of the process group it leads (for the mount command)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent(), env.get("PYTHONPATH")) if p)
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            return os.posix_spawn(
                sys.executable,
                [sys.executable, "-m", "hpcsif.engine.mounts", "--watch", str(self.dir), "--group"],
                env,
                file_actions=[(os.POSIX_SPAWN_DUP2, devnull, i) for i in (0, 1, 2)],
                setpgroup=0,
                # until it ignores it: a group orphaned (we are killed) while a member is stopped
                # gets a SIGHUP
                setsigmask=[signal.SIGHUP],
            )
        finally:
            os.close(devnull)


def package_parent() -> str:
    """The directory holding the ``hpcsif`` package (on the watchdog's ``PYTHONPATH``)."""
    import hpcsif

    return str(Path(hpcsif.__file__).resolve().parent.parent)


def _missing(tool: str) -> MissingToolError:
    name = os.path.basename(tool)
    package = {"squashfuse": "squashfuse", "squashfuse_ll": "squashfuse", "fuse-overlayfs": "fuse-overlayfs"}
    return MissingToolError(name, package.get(name, name))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_tree(path: Path) -> None:
    """rm -r *path*, ignoring errors (it may be gone already)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def squashfuse_program() -> str:
    """The squashfuse program: ``engine.squashfuse``, else ``squashfuse_ll``, else ``squashfuse``.

    ``squashfuse_ll`` (same Debian package, FUSE's low-level API, as Apptainer prefers) reads
    many small files several times faster, which is what a Python program's start is made of.
    """
    from shutil import which

    from hpcsif.config import get_config

    configured = str(get_config().get("engine.squashfuse") or "")
    for prog in [configured] if configured else ["squashfuse_ll", "squashfuse"]:
        found = which(prog)
        if found:
            return found
    raise _missing(configured or "squashfuse")


def image_key(prefix: str, image: str | os.PathLike, offset: int) -> str:
    """The name of a shared mount of what is at *offset* in the file *image*: the file's identity
    (device, inode, mtime, size), so that a changed or replaced file gets a mount of its own."""
    st = os.stat(image)
    return f"{prefix}-{st.st_dev:x}-{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}-{offset:x}"


def squashfs_mount(image: str, offset: int) -> SharedMount:
    """The shared read-only ``squashfuse`` mount of the squashfs at *offset* in *image*."""
    key = image_key("sif", image, offset)
    prog = squashfuse_program()
    return SharedMount(key, lambda mnt: [prog, "-o", f"ro,offset={offset}", image, str(mnt)])


def overlay_mount(
    lower: Path,
    layers: list[Path] | None = None,
    upper: Path | None = None,
    points: dict[str, bool] | None = None,
    files: dict[str, bytes] | None = None,
) -> SharedMount:
    """A writable ``fuse-overlayfs`` over *lower*, with read-only *layers* above it (lowest first).

    Changes go to *upper*'s ``upper/`` directory (``work/`` beside it), as in an Apptainer
    overlay directory; without *upper* they live in the runtime dir and vanish with the mount.
    *points* (path -> is a directory) are empty mount points made in a layer of their own,
    above the others and below *upper*, so that they are never written into *upper*; *files*
    (path -> content) go in that layer too.
    """
    key = f"overlay-{os.getpid()}-{time.monotonic_ns():x}"

    def cmd(mnt: Path) -> list[str]:
        base = upper or mnt.parent
        up, work = base / "upper", base / "work"
        up.mkdir(exist_ok=True)
        work.mkdir(exist_ok=True)
        stack = [*reversed(layers or []), lower]
        if points or files:
            stack.insert(0, _mount_point_layer(mnt.parent / "points", lower, points or {}, files or {}))
        options = f"lowerdir={':'.join(map(str, stack))},upperdir={up},workdir={work}"
        if os.getuid() != 0:
            # the image's files show as the user's own, as in Apptainer (whose squashfuse mounts
            # with uid=/gid=): otherwise they are nobody's and a user cannot change any of them
            options += f",squash_to_uid={os.getuid()},squash_to_gid={os.getgid()}"
        return ["fuse-overlayfs", "-o", options, str(mnt)]

    return SharedMount(key, cmd)


def _mount_point_layer(layer: Path, lower: Path, points: dict[str, bool], files: dict[str, bytes]) -> Path:
    """*layer* holding the empty files and directories *points* and the *files*; the directories
    on their way keep the mode, owner and time of the same directories in *lower* (the layer
    hides those).
    """
    made: list[str] = []  # the directories on the way, parents first
    layer.mkdir(exist_ok=True)
    for path, is_dir in sorted({**points, **dict.fromkeys(files, False)}.items()):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            rel = "/".join(parts[:i])
            if not (layer / rel).exists():
                (layer / rel).mkdir()
                made.append(rel)
        if is_dir:
            (layer / path.strip("/")).mkdir(exist_ok=True)
        else:
            (layer / path.strip("/")).write_bytes(files.get(path, b""))
            os.chmod(layer / path.strip("/"), 0o644)
    for rel in reversed(made):  # children first: making an entry changes its parent's time
        try:
            st = os.lstat(lower / rel)
        except OSError:
            continue  # not in the image either: a plain new directory
        if not stat.S_ISDIR(st.st_mode):
            continue
        if os.getuid() == 0:
            os.lchown(layer / rel, st.st_uid, st.st_gid)
        # (the owner keeps write access, so that the layer can be removed again)
        os.chmod(layer / rel, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
        os.utime(layer / rel, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return layer


def _detach_after_mount(directory: Path) -> bool:
    """Become a daemon of our own session once the mount command in our process group has ended;
    False (nothing to look after) when the mount's directory is gone already.

    The command is started (in our group) by whoever holds the mount's lock: once we hold it,
    the command, if ever there is one, is in the group. The group is left (a fork in a session
    of its own) and waited for until only zombies are in it: the command has mounted or failed,
    and a FUSE daemon it forked has gone to a session of its own.
    """
    group = os.getpgrp()
    try:
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        if _mount_state(directory / "mnt") == "absent":
            return False  # mounted and unmounted again (or never mounted) before we ran
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.close(fd)
    if os.fork():
        os._exit(0)
    os.setsid()
    while _live_members(group):
        time.sleep(0.01)
    return True


def _live_members(group: int) -> bool:
    """Whether a process other than a zombie is in the process group *group*."""
    for name in os.listdir("/proc"):
        fields = _stat_fields(name) if name.isdigit() else None
        if fields and int(fields[2]) == group and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _orphaned_bwrap(pid: int, mnt: Path, holders: set[int]) -> bool:
    """Whether *pid* is a ``bwrap`` set up on *mnt* that no live holder started (its holder
    was SIGKILLed: bwrap's ``--die-with-parent`` leaves a child it had not yet armed waiting
    for its dead parent for ever, holding the caller's output pipe and the mount)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    root = os.fsencode(mnt)
    if os.path.basename(argv[0]) != b"bwrap" or not any(a == root or a.startswith(root + b"/") for a in argv):
        return False
    ancestor = pid
    for _ in range(64):  # (a holder's container is a few generations below it)
        fields = _stat_fields(ancestor)
        if not fields:
            return True
        ancestor = int(fields[1])
        if ancestor in holders:
            return False
        if ancestor <= 1:
            return True
    return False


def end_orphaned_bwraps(mnt: Path, holders: set[int]) -> None:
    """SIGKILL every :func:`_orphaned_bwrap` of *mnt*, until none is left (a killed bwrap may
    have just started a child of its own)."""
    for _ in range(10):
        ended = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                pidfd = os.pidfd_open(int(name))  # the process itself, whatever reuses its pid
            except OSError:
                continue
            try:
                if _orphaned_bwrap(int(name), mnt, holders):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    log.debug("ended bwrap %s, left by a killed holder of %s", name, mnt)
                    ended += 1
            except OSError:
                pass
            finally:
                os.close(pidfd)
        if not ended:
            return
        time.sleep(0.02)


def watch(directory: Path) -> int:
    """Watchdog loop: unmount *directory*'s mount once no holder is alive, then exit."""
    import select

    mount = SharedMount.existing(directory)
    poller = select.poll()
    mounts_fd = os.open("/proc/self/mounts", os.O_RDONLY)
    poller.register(mounts_fd, select.POLLPRI | select.POLLERR)
    failures = 0
    wait = 0  # (a look at once: the mount may be unused already)
    while True:
        poller.poll(wait)
        wait = _POLL_MS
        os.lseek(mounts_fd, 0, os.SEEK_SET)
        os.read(mounts_fd, 1 << 20)  # re-arm the change notification
        if not directory.exists() or _mount_state(mount.mnt) == "absent":
            return 0
        fd = mount._locked()
        try:
            if _mount_state(mount.mnt) == "absent":
                mount._remove()  # unmounted while we waited for the lock
                return 0
            if mount.live_holders():
                failures = 0
                continue
            if unmount(mount.mnt, lazy=failures >= _LAZY_AFTER):
                mount._remove()
                return 0
            failures += 1
        finally:
            os.close(fd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--watch"] and sys.argv[3:] in ([], ["--group"]):
        # drop descriptors inherited from whoever started the first container (a pipe held open
        # here would keep that caller waiting for EOF)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        if sys.argv[3:]:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGHUP])
            if not _detach_after_mount(Path(sys.argv[2])):
                sys.exit(0)
        sys.exit(watch(Path(sys.argv[2])))
    sys.exit("usage: python -m hpcsif.engine.mounts --watch DIR [--group]")
