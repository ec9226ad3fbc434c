"""The engine interface shared by the bwrap and Apptainer engines.

:class:`LaunchOptions` holds Apptainer's launch flags in one place so that each option means the
same in every engine; an :class:`Engine` turns an image path plus options into a running
container and returns the payload's exit status.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hpcsif.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Callable

ACTIONS = ("exec", "run", "shell", "test")
ENGINE_NAMES = ("auto", "bwrap", "apptainer", "singularity")


@dataclass
class LaunchOptions:
    """What to run and how: the flags of ``apptainer exec|run|shell|test``."""

    action: str = "exec"  # exec | run | shell | test
    command: list[str] = field(default_factory=list)  # exec: program + args; run/test: args
    binds: list[str] = field(default_factory=list)  # -B specs: src[:dst[:ro|rw]][,…]
    pwd: str | None = None  # --pwd: working directory inside
    cleanenv: bool = False  # -e/--cleanenv: start from an empty host environment
    env: list[str] = field(default_factory=list)  # --env KEY=VALUE (override the image)
    env_files: list[str] = field(default_factory=list)  # --env-file FILE
    contain: bool = False  # -c/--contain: private /tmp, home, minimal /dev, no cwd bind
    containall: bool = False  # -C/--containall: contain + cleanenv + private PID and IPC
    writable_tmpfs: bool = False  # --writable-tmpfs: root file system writable, changes discarded
    home: str | None = None  # --home SRC[:DST]
    no_home: bool = False  # --no-home: do not bind the home directory
    nv: bool = False  # --nv: NVIDIA devices and driver libraries
    rocm: bool = False  # --rocm: AMD devices and ROCm libraries
    mpi: str | None = None  # --mpi PROFILE (name in conf/mpi or a .toml path)
    app: str | None = None  # --app NAME (SCIF app)
    sandbox: bool = False  # the image is a directory (set by the caller when it is)
    #: --no-mount: default mounts left out (home, tmp, cwd, bind-paths or a destination path)
    no_mount: list[str] = field(default_factory=list)
    fakeroot: bool = False  # -f/--fakeroot: uid and gid 0 inside the user namespace
    writable: bool = False  # -w/--writable: a sandbox directory bound read-write
    pid: bool = False  # -p/--pid: new PID namespace (also implied by --containall)
    no_pid: bool = False  # --no-pid: no PID namespace, even with --containall
    ipc: bool = False  # -i/--ipc: new IPC namespace
    uts: bool = False  # --uts: new UTS namespace (implied by --hostname)
    hostname: str | None = None  # --hostname NAME
    net: bool = False  # -n/--net: new network namespace
    network: str | None = None  # --network TYPE[,TYPE] (only "none" without Apptainer)
    dns: str | None = None  # --dns IP[,IP]: nameservers of the container's resolv.conf
    no_init: bool = False  # --no-init: the payload is PID 1 of a PID namespace
    no_umask: bool = False  # --no-umask: umask 0022 instead of the caller's
    no_eval: bool = False  # --no-eval: --env/APPTAINERENV_ values are not shell-evaluated
    compat: bool = False  # --compat: --containall --no-init --no-umask --no-eval --writable-tmpfs
    scratch: list[str] = field(default_factory=list)  # -S/--scratch DIR[,DIR]: private writable dirs
    workdir: str | None = None  # -W/--workdir: host dir backing scratch (and /tmp, home with --contain)
    mounts: list[str] = field(default_factory=list)  # --mount type=bind,source=…,destination=…
    overlay: list[str] = field(default_factory=list)  # -o/--overlay DIR[:ro]
    unsquash: bool = False  # --unsquash: run from a temporary sandbox extracted from the SIF
    no_privs: bool = False  # --no-privs: drop all capabilities
    add_caps: str | None = None  # --add-caps CAP[,CAP]
    drop_caps: str | None = None  # --drop-caps CAP[,CAP]
    shell: str | None = None  # shell -s/--shell PATH
    nvccli: bool = False  # --nvccli: nvidia-container-cli (implies --nv)
    #: Apptainer flags that need no work here but go to a delegated Apptainer unchanged
    #: (``--userns``, ``--no-privs`` …), as (flag, value or None)
    passthrough: list[tuple[str, str | None]] = field(default_factory=list)
    #: flags only Apptainer can honour (cgroups, --security …): the built-in engine refuses them
    apptainer_only: list[tuple[str, str | None]] = field(default_factory=list)
    #: set by the CLI when the native front may repeat this launch (a launch_plan.Recorder)
    recorder: object | None = None
    #: prints one of Apptainer's INFO lines the engine has to say (set by the CLI; else logged)
    notify: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise UsageError(f"unknown action {self.action!r} (expected one of {', '.join(ACTIONS)})")
        if self.compat:
            self.containall = self.no_init = self.no_umask = self.no_eval = self.writable_tmpfs = True
        if self.containall:
            self.contain = True
            self.cleanenv = True
        if self.hostname:
            self.uts = True
        if self.nvccli:
            self.nv = True
        if self.network:
            self.net = True
        if self.action == "exec" and not self.command:
            raise UsageError("exec needs a command to run in the container")

    @property
    def pid_namespace(self) -> bool:
        """Whether the container gets its own PID namespace (``--pid``, ``--containall``)."""
        return (self.pid or self.containall) and not self.no_pid


_CGROUPS = "cgroup limits need Apptainer's privileged set-up (use --engine apptainer, or Slurm's limits)"
_ENCRYPTED = "encrypted images need Apptainer (use --engine apptainer)"
#: why the built-in engine refuses the flags only a delegated Apptainer can honour
APPTAINER_ONLY = {
    **dict.fromkeys(
        (
            "--apply-cgroups",
            "--blkio-weight",
            "--blkio-weight-device",
            "--cpu-shares",
            "--cpus",
            "--cpuset-cpus",
            "--cpuset-mems",
            "--memory",
            "--memory-reservation",
            "--memory-swap",
            "--oom-kill-disable",
            "--pids-limit",
        ),
        _CGROUPS,
    ),
    "--security": "SELinux, AppArmor and seccomp profiles need Apptainer (use --engine apptainer)",
    "--allow-setuid": "setuid programs cannot gain privileges in the unprivileged sandbox "
    "(use --engine apptainer as root)",
    "--fusemount": "FUSE mounts inside the container need Apptainer (use --engine apptainer, or mount "
    "on the host and -B it)",
    "--pem-path": _ENCRYPTED,
    "--passphrase": _ENCRYPTED,
    "--sharens": "shared namespaces between containers need Apptainer (use --engine apptainer)",
    "--netns-path": "joining a network namespace needs privileges (use --engine apptainer)",
    "--network-args": "CNI network plugins need privileges (use --engine apptainer)",
}


def refuse_apptainer_only(opts: LaunchOptions) -> None:
    """Raise :class:`UsageError` for the first flag of *opts* only Apptainer can honour."""
    for flag, _value in opts.apptainer_only:
        raise UsageError(f"{flag} is not supported by hpcsif: {APPTAINER_ONLY[flag]}")


@dataclass
class HostContribution:
    """What a GPU or MPI profile adds to a container: binds, environment, library paths."""

    binds: list = field(default_factory=list)  # list[hpcsif.engine.binds.Bind]
    env: dict[str, str] = field(default_factory=dict)  # set inside, over the image's values
    ld_paths: list[str] = field(default_factory=list)  # container dirs put on LD_LIBRARY_PATH
    pass_prefixes: tuple[str, ...] = ()  # host variables kept even with --cleanenv
    #: checks run against the mounted root before launch; each returns warning lines
    checks: list = field(default_factory=list)
    #: host files these parts were found from (a directory: its entries), which a saved launch
    #: (:mod:`hpcsif.engine.launch_plan`) checks before it repeats them; absent ones must stay so
    witnesses: list[str] = field(default_factory=list)
    #: whether a saved launch may repeat these parts at all (False: found anew each time)
    replayable: bool = True

    def merge(self, other: HostContribution) -> None:
        """Add *other*'s parts to this one."""
        self.binds += other.binds
        self.env.update(other.env)
        self.ld_paths += [p for p in other.ld_paths if p not in self.ld_paths]
        self.pass_prefixes += tuple(p for p in other.pass_prefixes if p not in self.pass_prefixes)
        self.checks += other.checks
        self.witnesses += other.witnesses
        self.replayable = self.replayable and other.replayable


def host_contributions(opts: LaunchOptions) -> HostContribution:
    """The GPU (``--nv``/``--rocm``) and MPI (``--mpi`` or the partition default) additions."""
    total = HostContribution()
    if opts.nv or opts.rocm:
        from hpcsif.engine import gpu

        if opts.nv:
            total.merge(gpu.nvidia())
        if opts.rocm:
            total.merge(gpu.rocm())
    name = mpi_profile_name(opts.mpi)
    if name:
        from hpcsif.engine.mpi import load_profile

        total.merge(load_profile(name).contribution())
    return total


def mpi_profile_name(requested: str | None) -> str | None:
    """The MPI profile a launch uses: *requested*, else ``mpi.partition_defaults[$SLURM_JOB_PARTITION]``,
    else ``mpi.default``; None for no profile (also for the name ``none``).
    """
    name = requested
    if not name:
        from hpcsif.config import get_config

        cfg = get_config()
        part = os.environ.get("SLURM_JOB_PARTITION", "")
        name = (cfg.get("mpi.partition_defaults") or {}).get(part) if part else None
        name = name or cfg.get("mpi.default")
    return None if not name or name == "none" else str(name)


class Engine(ABC):
    """A way to start a container from an image file or sandbox directory."""

    name = ""

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """True when the host programs this engine needs are installed."""

    @abstractmethod
    def launch(self, image: Path, opts: LaunchOptions) -> int:
        """Run the container in the foreground; returns the payload's exit status (128+N on signal N)."""


def select_engine(name: str | None = None) -> Engine:
    """The engine for ``--engine NAME`` (``None``: config ``engine.default``; ``auto``: bwrap if usable).

    ``auto`` prefers the built-in bwrap engine when bubblewrap and squashfuse are installed,
    then Apptainer, then Singularity.
    """
    if not name:
        from hpcsif.config import get_config

        name = str(get_config().get("engine.default") or "auto")
    if name not in ENGINE_NAMES:
        raise UsageError(f"unknown engine {name!r} (expected one of {', '.join(ENGINE_NAMES)})")
    if name in ("apptainer", "singularity"):
        from hpcsif.engine.apptainer import ApptainerEngine

        return ApptainerEngine(name)
    from hpcsif.engine.bwrap import BwrapEngine

    if name == "bwrap" or BwrapEngine.available():
        return BwrapEngine()
    from hpcsif.engine.apptainer import ApptainerEngine

    for prog in ("apptainer", "singularity"):
        if ApptainerEngine.find_program(prog):
            return ApptainerEngine(prog)
    # nothing usable: let the bwrap engine name the missing Debian package
    return BwrapEngine()


def which(program: str) -> str | None:
    """The full path of *program* on ``$PATH`` (or *program* itself when it is a path), else None.

    A few lines instead of ``shutil.which`` keep ``hpcsif exec`` from importing shutil.
    """
    if os.sep in program:
        return program if os.access(program, os.X_OK) else None
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        cand = os.path.join(d or ".", program)
        if os.access(cand, os.X_OK) and not os.path.isdir(cand):
            return cand
    return None
