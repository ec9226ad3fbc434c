"""Saved launches, which the native ``hpcsif`` front (``hpcsif/native/front.c``) repeats without Python.

A container start through the Python CLI spends tens of milliseconds before bwrap runs: the
interpreter, the imports, the plan. ``make native`` installs a small C program as ``hpcsif``
that looks up a plan saved here for its exact command line, environment, working directory,
uid, gid and umask. When every host file the plan was made from is unchanged and the caller's
passwd entry is the same, it registers as a holder of the image's shared mount (mounting it as
:class:`~hpcsif.engine.mounts.SharedMount` does when nobody has, and unmounting it as the last
holder) and starts bwrap itself, staying its parent as :func:`hpcsif.engine.supervise.run_bwrap` does.
Anything else runs this CLI (``console(front=True)``), which saves what it launches.

Only launches that need nothing made per run are saved: a SIF file on its shared
``squashfuse`` mount (no sandbox, overlay, ``--writable-tmpfs``, ``--workdir``, ``--fakeroot``,
``--env-file``), no MPI profile (``--nv``/``--rocm`` binds repeat while what they were found
from is unchanged, unless ``nvidia-container-cli`` found them), an image with a shell, not
``shell``, and nothing printed before the start. The host environment is never written down
(it may hold registry passwords): the plan names, for each variable the container gets,
whether it is passed on or copied from a host variable; only values the launch made itself
are written.

``<runtime dir>/plans/<key>.plan`` (private to the user, the newest 64 kept) is a list of
NUL-terminated fields: the format name; the witnesses (kind ``f`` file, ``d`` identity,
``-`` absent; path, device, inode, mode, uid, gid, size, mtime and ctime in ns); the passwd
entry and group name; the least number of command words; the mount directory, the command
that mounts the image there (counted); the umask to set (``-``: none); whether the payload runs
in a PID namespace; the bwrap program; bwrap's arguments, without the container's command; the
``--ro-bind-data`` contents with their argument index; the environment as (``i`` inherit |
``c`` copy from | ``s`` set, name, value); ``end``. The key is the 128-bit FNV-1a hash of the
format name, uid, gid, the supplementary groups (:func:`groups_field`: the container's
``/etc/group`` names them), umask (octal), working directory, the sorted environment entries (only
the name of a task's own variable, :func:`per_task`: the ranks of one ``srun`` share a plan), an
empty field and the command words before the container's command, each NUL-terminated, in hex.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
from pathlib import Path

from hpcsif.errors import HpcsifError

log = logging.getLogger(__name__)

FORMAT = "hpcsif-plan-3"
MAX_PLANS = 64
_FNV_BASIS = 0x6C62272E07BB014262B821756295C58D
_FNV_PRIME = (1 << 88) + 0x13B
_MASK = (1 << 128) - 1


def fnv1a_128(fields: list[bytes]) -> str:
    """The key: FNV-1a (128 bits) over *fields*, each NUL-terminated, as 32 hex digits."""
    h = _FNV_BASIS
    for byte in b"".join(f + b"\0" for f in fields):
        h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return f"{h:032x}"


def groups_field() -> str:
    """The caller's groups as the key holds them: sorted, unique, comma-separated decimal ids."""
    return ",".join(str(g) for g in sorted(set(os.getgroups())))


def current_umask() -> int:
    """The process's umask, read without changing it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise OSError("no Umask line in /proc/self/status")


def plans_dir() -> Path:
    """``$XDG_RUNTIME_DIR/hpcsif/plans``, else ``/tmp/hpcsif-$UID/plans``: where the front looks.

    Not under ``engine.mount_dir``: the front reads no configuration.
    """
    from hpcsif.engine.mounts import default_runtime_base, private_dir

    return private_dir(private_dir(default_runtime_base()) / "plans")


#: variables that differ between the tasks and steps of a job (rank, step, task pid …) but only
#: pass through to the container: the key holds their names, not their values, so that every
#: rank of an ``srun`` (or of Open MPI's ``mpirun``, MPICH's Hydra, Cray's PALS) shares one plan,
#: on whichever node (``SLURMD_NODENAME``) it lands
PER_TASK_PREFIXES = (b"SLURM_", b"SLURMD_", b"PMI_", b"PMIX_", b"OMPI_", b"MPI_LOCAL", b"PALS_")
#: … except those hpcsif reads (``mpi.partition_defaults``)
KEYED_ANYWAY = (b"SLURM_JOB_PARTITION",)


def per_task(name: bytes) -> bool:
    """True for a variable of :data:`PER_TASK_PREFIXES` whose value the key leaves out."""
    return name.startswith(PER_TASK_PREFIXES) and name not in KEYED_ANYWAY


class Recorder(logging.Handler):
    """Collects what the native front needs to repeat one launch, and saves it.

    Attached to the ``hpcsif`` logger for the whole command, it also counts the messages the
    command printed: a launch that said something (a warning) is not saved, since the front
    would start it silently.
    """

    def __init__(self, words: list[str]) -> None:
        super().__init__()
        self.words = words
        self.printed = 0
        self.witnesses: list[str] = []
        self.ok = True
        from hpcsif.engine.environment import initial_environ

        self._environ = initial_environ()  # as the front saw it
        self._umask = current_umask()

    def emit(self, record: logging.LogRecord) -> None:
        self.printed += 1

    def refuse(self) -> None:
        """This launch must not be saved (something in it is made anew each time)."""
        self.ok = False

    # -- witnesses ------------------------------------------------------------------------------
    def file(self, path: str) -> None:
        """*path*'s content matters: device, inode, mode, owner, size, mtime and ctime must stay."""
        self._witness("f", path)

    def identity(self, path: str) -> None:
        """*path*'s kind and owner matter (a bind source, a directory): device, inode, mode, owner."""
        self._witness("d", path)

    def _witness(self, kind: str, path: str) -> None:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self.witnesses += ["-", path, *["0"] * 8]
            return
        except OSError:
            self.ok = False  # the front could not check it either
            return
        self.witnesses += [kind, path, *(str(v) for v in _stat_fields(st))]

    def which(self, program: str, found: str) -> None:
        """The program ``PATH`` found: it, and the absence of the same name earlier on ``PATH``."""
        if os.sep not in program:
            for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
                cand = os.path.join(d or ".", program)
                if cand == found:
                    break
                self._witness("d", cand)
        self.file(found)

    # -- saving ---------------------------------------------------------------------------------
    def save(
        self,
        *,
        command: list[str],
        min_command: int,
        bwrap: str,
        argv: list[str],
        data: dict[str, str],
        env: dict[str, str],
        mount_dir: Path,
        mount_cmd: list[str],
        umask: int | None,
        pidns: bool,
    ) -> None:
        """Write the plan of the launch about to start (never fails the launch: logs at debug)."""
        if not self.ok or self.printed:
            return
        n = len(command)
        words = self.words
        if len(words) < n + 2 or words[len(words) - n :] != command or any("\0" in t for t in data.values()):
            return  # the command is not the tail of what the front saw
        prefix = words[: len(words) - n]
        tail = argv[len(argv) - n :] if n else []
        if tail != command:
            return
        import pwd

        try:
            for m in list(sys.modules.values()):
                if getattr(m, "__name__", "").startswith("hpcsif") and getattr(m, "__file__", None):
                    self.file(m.__file__)
            self.file("/etc/group")  # the container's /etc/group names the caller's groups
            user = pwd.getpwuid(os.getuid())
            group = _group_name(user.pw_gid)
            key = fnv1a_128(
                [
                    FORMAT.encode(),
                    str(os.getuid()).encode(),
                    str(os.getgid()).encode(),
                    groups_field().encode(),
                    f"{self._umask:o}".encode(),
                    os.fsencode(os.getcwd()),
                    *sorted(
                        e.partition(b"=")[0] if per_task(e.partition(b"=")[0]) else e for e in self._environ
                    ),
                    b"",
                    *(os.fsencode(w) for w in prefix),
                ]
            )
            bwrap_args = argv[1 : len(argv) - n]
            data_fields = []
            for i, arg in enumerate(bwrap_args):
                if arg in data and i and bwrap_args[i - 1] == "--ro-bind-data":
                    data_fields += [str(i), data[arg]]
            fields = [
                FORMAT,
                str(len(self.witnesses) // 10),
                *self.witnesses,
                user.pw_name,
                str(user.pw_uid),
                str(user.pw_gid),
                user.pw_gecos,
                user.pw_dir,
                group,
                str(min_command),
                str(mount_dir),
                str(len(mount_cmd)),
                *mount_cmd,
                "-" if umask is None else f"{umask:o}",
                "1" if pidns else "0",
                bwrap,
                str(len(bwrap_args)),
                *bwrap_args,
                str(len(data_fields) // 2),
                *data_fields,
                *self._env_fields(env),
                "end",
            ]
            if not self.ok:
                return
            _write(plans_dir(), key, b"".join(os.fsencode(f) + b"\0" for f in fields))
        except (OSError, ValueError, HpcsifError) as exc:  # a squatted plans directory …
            log.debug("launch plan not saved: %s", exc)

    def _env_fields(self, env: dict[str, str]) -> list[str]:
        """The container's environment as inherit/copy/set triples (host values are never written).

        A task's own variable (:func:`per_task`), which the key does not hold, may reach the
        container only as itself or as the launcher's ``__HPCSIF_HOST_<NAME>`` copy of it.
        """
        host: dict[bytes, bytes] = {}
        for entry in self._environ:
            k, sep, v = entry.partition(b"=")
            if sep:
                host.setdefault(k, v)
        by_value = {v: k for k, v in reversed(host.items()) if v and not per_task(k)}
        out = []
        for k, v in env.items():
            if k == "__HPCSIF_READY":
                continue  # set per start
            kb, vb = os.fsencode(k), os.fsencode(v)
            source = kb.removeprefix(b"__HPCSIF_HOST_")
            if "\0" in k or "\0" in v:
                self.ok = False
            elif host.get(kb) == vb:
                out += ["i", k, ""]
            elif host.get(source) == vb:
                out += ["c", k, os.fsdecode(source)]
            elif per_task(source):
                self.ok = False  # a task's variable made into something else
            elif vb in by_value:
                out += ["c", k, os.fsdecode(by_value[vb])]
            else:
                out += ["s", k, v]
        return [str(len(out) // 3), *out]


def _stat_fields(st: os.stat_result) -> tuple[int, ...]:
    return (
        st.st_dev,
        st.st_ino,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _write(directory: Path, key: str, content: bytes) -> None:
    """Publish the plan atomically (0600), then keep only the newest :data:`MAX_PLANS`."""
    tmp = directory / f".{key}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.rename(tmp, directory / f"{key}.plan")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    plans = []
    with os.scandir(directory) as it:
        for e in it:
            with contextlib.suppress(OSError):
                if e.name.endswith(".plan") and stat.S_ISREG(e.stat(follow_symlinks=False).st_mode):
                    plans.append((e.stat(follow_symlinks=False).st_mtime_ns, e.path))
    for _, path in sorted(plans)[: max(0, len(plans) - MAX_PLANS)]:
        with contextlib.suppress(OSError):
            os.unlink(path)
