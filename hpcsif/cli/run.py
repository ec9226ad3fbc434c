"""``hpcsif run|exec|shell|test``: start a container with Apptainer's flags.

Only the standard library is imported here; the engine is imported inside the handler, and
for a local SIF nothing of the cache or registry code is loaded at all (startup time).
"""

from __future__ import annotations

import argparse
import os

_HELPS = {
    "exec": "run a command in a container",
    "run": "run the container's runscript with arguments",
    "shell": "start an interactive shell in a container",
    "test": "run the container's test script",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run``, ``exec``, ``shell`` and ``test`` commands."""
    for action in _HELPS:
        register_one(subparsers, action)


def register_one(subparsers: argparse._SubParsersAction, action: str) -> None:
    """Add the command ``action`` alone: a container start builds one parser of ~80 flags, not four."""
    text = _HELPS[action]
    p = subparsers.add_parser(action, help=text, description=text)
    _add_flags(p, action)
    image = p.add_argument(
        "image", help="SIF file, sandbox directory or URI (docker://, oras://, oci-archive:// …)"
    )
    image.words_follow = True  # type: ignore[attr-defined]  # a `--` after it is the container's
    words = p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="command and arguments" if action == "exec" else "arguments",
    )
    words.required = action == "exec"  # argparse requires every REMAINDER; only exec needs words
    p.set_defaults(func=handle, action=action)


#: Apptainer flags only a delegated Apptainer honours (the built-in engine refuses them, see
#: hpcsif.engine.base.APPTAINER_ONLY): flag -> kind of value
APPTAINER_ONLY = {
    **dict.fromkeys(("--apply-cgroups", "--blkio-weight", "--cpu-shares", "--cpus"), "value"),
    **dict.fromkeys(("--cpuset-cpus", "--cpuset-mems", "--memory", "--memory-reservation"), "value"),
    **dict.fromkeys(("--memory-swap", "--pids-limit", "--pem-path", "--netns-path"), "value"),
    **dict.fromkeys(("--blkio-weight-device", "--security", "--fusemount", "--network-args"), "list"),
    **dict.fromkeys(("--oom-kill-disable", "--allow-setuid", "--passphrase", "--sharens"), "switch"),
}
#: accepted and passed to a delegated Apptainer; the built-in engine needs nothing for them
PASSTHROUGH = {
    "--userns": "run in a user namespace (as the built-in engine always runs a user other than root)",
    "--keep-privs": "accepted: root keeps its capabilities anyway",
}


def _add_flags(p: argparse.ArgumentParser, action: str) -> None:
    a = p.add_argument
    a("-B", "--bind", action="append", default=[], metavar="SPEC", help="src[:dst[:ro|rw]], comma-separated")
    a(
        "--mount",
        action="append",
        default=[],
        metavar="SPEC",
        help="type=bind,source=SRC,destination=DST[,ro] (Apptainer's --mount; like -B)",
    )
    a("--pwd", "--cwd", help="working directory inside the container")
    a("-e", "--cleanenv", action="store_true", help="do not pass the host environment")
    a(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="set variables inside (wins over the image); comma-separated as Apptainer's",
    )
    a("--env-file", action="append", default=[], metavar="FILE", help="KEY=VALUE lines to set inside")
    a("--no-eval", action="store_true", help="do not shell-evaluate --env and APPTAINERENV_* values")
    a(
        "-c",
        "--contain",
        action="store_true",
        help="private /tmp and home, minimal /dev, no current directory",
    )
    a(
        "-C",
        "--containall",
        action="store_true",
        help="--contain plus --cleanenv and private PID/IPC namespaces",
    )
    a(
        "--compat",
        action="store_true",
        help="OCI/Docker-like: --containall --no-init --no-umask --no-eval --writable-tmpfs",
    )
    a("--writable-tmpfs", action="store_true", help="writable root file system; changes are discarded")
    a(
        "-w",
        "--writable",
        action="store_true",
        help="a sandbox directory is bound read-write (a SIF would need an overlay partition: refused)",
    )
    a(
        "-o",
        "--overlay",
        action="append",
        default=[],
        metavar="DIR[:ro]",
        help="overlay directory (changes persist there; :ro for a read-only layer); "
        "ext3 overlay images need --engine apptainer",
    )
    a("-S", "--scratch", action="append", default=[], metavar="DIR", help="private writable directory inside")
    a(
        "-W",
        "--workdir",
        metavar="DIR",
        help="host directory backing --scratch (and /tmp, /var/tmp, home with --contain)",
    )
    a(
        "--no-mount",
        action="append",
        default=[],
        metavar="LIST",
        help="leave out default mounts: home, tmp, cwd, bind-paths or a destination path (comma-separated)",
    )
    a("-H", "--home", metavar="SRC[:DST]", help="home directory to bind (and set as $HOME)")
    a("--no-home", action="store_true", help="do not bind the home directory")
    a("-f", "--fakeroot", action="store_true", help="appear as root inside (no real privilege)")
    a("-p", "--pid", action="store_true", help="new PID namespace")
    a("--no-pid", action="store_true", help="no new PID namespace (even with --containall)")
    a("-i", "--ipc", action="store_true", help="new IPC namespace")
    a("--uts", action="store_true", help="new UTS namespace")
    a("--hostname", metavar="NAME", help="host name inside (implies --uts)")
    a("-n", "--net", action="store_true", help="new network namespace: loopback only (no privileges)")
    a(
        "--network",
        metavar="TYPE",
        help="network type (implies --net): only 'none' without --engine apptainer",
    )
    a("--dns", metavar="IP[,IP]", help="name servers of the container's /etc/resolv.conf")
    a("--no-init", action="store_true", help="with a PID namespace, the payload itself is PID 1")
    a("--no-umask", action="store_true", help="umask 0022 inside instead of the caller's")
    a("--no-privs", action="store_true", help="drop all capabilities (root's, or --fakeroot's)")
    a("--add-caps", metavar="CAPS", help="capabilities to add, comma-separated (within the user namespace)")
    a("--drop-caps", metavar="CAPS", help="capabilities to drop, comma-separated")
    for flag, why in PASSTHROUGH.items():
        names = ["-u", flag] if flag == "--userns" else [flag]
        a(*names, action="store_true", help=why)
    only = p.add_argument_group(
        "Apptainer-only flags",
        "cgroup limits, security profiles, encryption …: passed on by --engine apptainer; "
        "the built-in engine refuses them with the reason",
    ).add_argument
    for flag, kind in APPTAINER_ONLY.items():
        if kind == "switch":
            only(flag, action="store_true")
        else:
            only(flag, action="append" if kind == "list" else None, metavar="VALUE")
    a(
        "--unsquash",
        action="store_true",
        help="run from a temporary sandbox unpacked from the SIF (removed when the container ends)",
    )
    a("--nv", action="store_true", help="NVIDIA GPU devices and driver libraries")
    a("--nvccli", action="store_true", help="--nv, set up with nvidia-container-cli")
    a("--rocm", action="store_true", help="AMD GPU devices and ROCm libraries")
    a("--mpi", metavar="PROFILE", help="MPI profile (conf/mpi/PROFILE.toml or a path); default per partition")
    a("--app", metavar="NAME", help="SCIF app to run")
    if action == "shell":
        a("-s", "--shell", metavar="PATH", help="program to run as the interactive shell")
    if action == "run":
        a("--runscript-timeout", metavar="DURATION", help="accepted for compatibility (no effect)")
    # for images given as URIs (docker:// …): how to fetch them
    a("--disable-cache", action="store_true", help="convert a URI image into a temporary SIF, not the cache")
    a("--docker-login", action="store_true", help="prompt for a registry user name and password")
    a("--nohttps", "--no-https", action="store_true", dest="nohttps", help="use plain HTTP for the registry")
    a("--authfile", metavar="FILE", help="Docker-style auth file with registry credentials")
    a("--docker-host", metavar="HOST", help="Docker daemon for docker-daemon:// (default $DOCKER_HOST)")
    a("--docker-username", help=argparse.SUPPRESS)
    a("--docker-password", help=argparse.SUPPRESS)
    a(
        "--engine",
        choices=("auto", "bwrap", "apptainer", "singularity"),
        help="container engine (default: config)",
    )


def handle(args: argparse.Namespace) -> int:
    """Resolve the image, then launch it with the selected engine."""
    from hpcsif.errors import AppNotFoundError

    try:
        return _handle(args)
    except AppNotFoundError as exc:
        print(exc, flush=True)  # (Apptainer's line, on standard output)
        return exc.exit_code


def _info(args: argparse.Namespace, message: str) -> None:
    from hpcsif.cli.pull import info

    info(args, message)


def _handle(args: argparse.Namespace) -> int:
    from hpcsif.cli.envflags import flags_from_env
    from hpcsif.cli.pull import REGISTRY_ENV
    from hpcsif.engine.base import LaunchOptions, select_engine

    recorder = None
    if getattr(args, "front_words", None) is not None:  # the native front may repeat this launch
        import logging

        from hpcsif.engine.launch_plan import Recorder

        recorder = Recorder(args.front_words)
        logging.getLogger("hpcsif").addHandler(recorder)  # it counts what the command prints
    flags_from_env(args, {**_ENV, **REGISTRY_ENV}, append=_ENV_APPEND)  # (in one pass: Apptainer's order)
    if args.action == "shell" and args.args:
        # as Apptainer's shell: the interactive shell starts without them (`shell IMG -c CMD` too)
        import logging

        logging.getLogger("hpcsif").warning("Parameters to shell command are ignored")
        args.args = []
    # (a network type refused later gets its one FATAL line alone)
    if args.network and not args.net and all(n.strip() == "none" for n in args.network.split(",")):
        if not (args.quiet or args.silent):  # (Apptainer's INFO line: shown by default)
            import sys

            print("INFO:    Setting --net (required by --network)", file=sys.stderr, flush=True)
        if recorder is not None:
            recorder.refuse()  # the front would start it without the line
    opts = LaunchOptions(
        action=args.action,
        command=list(args.args),
        binds=args.bind,
        pwd=args.pwd,
        cleanenv=args.cleanenv,
        env=args.env,
        env_files=_env_files(args.env_file),
        contain=args.contain,
        containall=args.containall,
        writable_tmpfs=args.writable_tmpfs,
        home=args.home,
        no_home=args.no_home,
        nv=args.nv,
        rocm=args.rocm,
        mpi=args.mpi,
        app=args.app,
        no_mount=_no_mount(args.no_mount),
        fakeroot=args.fakeroot,
        writable=args.writable,
        pid=args.pid,
        no_pid=args.no_pid,
        ipc=args.ipc,
        uts=args.uts,
        hostname=args.hostname,
        net=args.net,
        network=args.network,
        dns=args.dns,
        no_init=args.no_init,
        no_umask=args.no_umask,
        no_eval=args.no_eval,
        compat=args.compat,
        scratch=args.scratch,
        workdir=args.workdir,
        mounts=args.mount,
        overlay=args.overlay,
        unsquash=args.unsquash,
        no_privs=args.no_privs,
        add_caps=args.add_caps,
        drop_caps=args.drop_caps,
        shell=getattr(args, "shell", None),
        nvccli=args.nvccli,
        passthrough=_passthrough(args),
        apptainer_only=_apptainer_only(args),
        notify=lambda message: _info(args, message),
    )
    engine = select_engine(args.engine)
    said = engine.name == "bwrap" and _legacy_env_notices(args)  # (Apptainer prints these itself)
    if recorder and (said or getattr(args, "env_notices", False)):  # the front would not say them
        recorder.refuse()
    image = args.image
    if os.path.exists(image):
        from pathlib import Path

        path = Path(os.path.abspath(image))
        _check_trusted(path)
        opts.sandbox = path.is_dir()
        opts.recorder = recorder  # a local image only: a URI goes through the cache each time
        return engine.launch(path, opts)
    from hpcsif.cli.pull import Notices, registry_options
    from hpcsif.slurm.jobrecord import job_image

    # inside a job: the digest the prolog pinned, or the prolog's staging error at once
    image = job_image(image)
    notices = Notices(args)  # Apptainer's INFO lines: converting, or using the cached SIF
    source_options = {**registry_options(args), "notify": notices}
    from hpcsif.cli.build import user_cache

    if args.disable_cache or user_cache() is None:  # (the latter after Apptainer's warning)
        return _launch_uncached(engine, image, opts, source_options)
    from hpcsif.cache.api import leased_image

    # the lease keeps the cached image from eviction for the whole run
    with leased_image(image, source_options=source_options) as path:
        notices.done()
        opts.sandbox = path.is_dir()
        return engine.launch(path, opts)


def _legacy_env_notices(args: argparse.Namespace) -> bool:
    """Apptainer's INFO line for each ``SINGULARITYENV_X`` given without ``APPTAINERENV_X`` (or
    ``--env X=``, the same to Apptainer); True if any."""
    from hpcsif.engine.environment import parse_assignments
    from hpcsif.errors import UsageError

    try:
        given = parse_assignments(args.env or [], quiet=True)
    except UsageError:
        given = {}  # (the launch says what is wrong)
    said = False
    for key in os.environ:
        name = key.removeprefix("SINGULARITYENV_")
        if name != key and f"APPTAINERENV_{name}" not in os.environ and name not in given:
            from hpcsif.cli.pull import info

            info(args, f"Environment variable {key} is set, but APPTAINERENV_{name} is preferred")
            said = True
    return said


def _launch_uncached(engine, image: str, opts, source_options: dict) -> int:  # Engine, LaunchOptions
    """``--disable-cache``: convert *image* into a temporary SIF, run it, remove it (as Apptainer)."""
    import tempfile
    from pathlib import Path

    from hpcsif.convert import convert_ref
    from hpcsif.refs import parse

    ref = parse(image)
    if ref.transport in ("sif", "sandbox"):
        opts.sandbox = os.path.isdir(ref.path or image)
        return engine.launch(Path(os.path.abspath(ref.path or image)), opts)
    with tempfile.TemporaryDirectory(prefix="hpcsif-nocache-") as tmp:
        sif = Path(tmp) / "image.sif"
        from hpcsif.sources import SIF_TRANSPORTS, download_sif

        if ref.transport in SIF_TRANSPORTS:  # a SIF already: downloaded, not converted
            download_sif(ref, sif, source_options)
        else:
            convert_ref(ref, sif, source_options=source_options)
        if notify := source_options.get("notify"):
            notify.done()
        return engine.launch(sif, opts)


def _passthrough(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The given :data:`PASSTHROUGH` flags (and run's ``--runscript-timeout``) for Apptainer."""
    given: list[tuple[str, str | None]] = [(flag, None) for flag in PASSTHROUGH if getattr(args, _dest(flag))]
    if getattr(args, "runscript_timeout", None):
        given.append(("--runscript-timeout", args.runscript_timeout))
    return given


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _apptainer_only(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The given flags of :data:`APPTAINER_ONLY` as (flag, value) pairs, in Apptainer's syntax."""
    given: list[tuple[str, str | None]] = []
    for flag, kind in APPTAINER_ONLY.items():
        value = getattr(args, _dest(flag))
        if kind == "switch":
            given += [(flag, None)] if value else []
        elif kind == "list":
            given += [(flag, v) for v in value or []]
        elif value is not None:
            given.append((flag, value))
    return given


#: flag dest -> Apptainer's environment keys (``APPTAINER_<KEY>``/``SINGULARITY_<KEY>``) of a switch
_ENV_SWITCHES = {
    **{
        d: (d.upper(),)
        for d in (
            *("cleanenv", "contain", "containall", "writable_tmpfs", "no_home", "nv", "rocm", "fakeroot"),
            *("writable", "compat", "no_eval", "no_umask", "nvccli", "unsquash", "no_privs", "keep_privs"),
            *("allow_setuid", "oom_kill_disable", "disable_cache"),
        )
    },
    "pid": ("PID", "UNSHARE_PID"),
    "ipc": ("IPC", "UNSHARE_IPC"),
    "net": ("NET", "UNSHARE_NET"),
    "uts": ("UTS", "UNSHARE_UTS"),
    "userns": ("USERNS", "UNSHARE_USERNS"),
    "no_init": ("NOSHIMINIT",),
}
#: flag dest -> keys of a value flag, used when the flag is not given
_ENV_VALUES = {
    "home": ("HOME",),
    "pwd": ("PWD", "CWD", "TARGET_PWD", "TARGET_CWD"),
    "workdir": ("WORKDIR",),
    "hostname": ("HOSTNAME",),
    "network": ("NETWORK",),
    "dns": ("DNS",),
    "add_caps": ("ADD_CAPS",),
    "drop_caps": ("DROP_CAPS",),
    "shell": ("SHELL",),
    "app": ("APP", "APPNAME"),
}
#: flag dest -> keys of a list flag the variable replaces when the flag is not given
_ENV_LISTS = {
    "no_mount": ("NO_MOUNT",),
    "env_file": ("ENV_FILE",),
    "scratch": ("SCRATCH", "SCRATCHDIR"),
    "overlay": ("OVERLAY", "OVERLAYIMAGE"),
    "security": ("SECURITY",),
}
#: flag dest -> keys of a list flag the variable adds to (Apptainer's EnvAppendValue)
_ENV_APPEND = {"bind": ("BIND", "BINDPATH"), "mount": ("MOUNT",)}
_ENV = {**_ENV_SWITCHES, **_ENV_VALUES, **_ENV_LISTS, **_ENV_APPEND}


def _no_mount(specs: list[str]) -> list[str]:
    """``--no-mount`` values as a list; an unknown name is ignored with Apptainer's warning."""
    import logging

    from hpcsif.engine.binds import NO_MOUNT

    names = [n.strip() for spec in specs for n in spec.split(",") if n.strip()]
    for name in names:
        if name not in NO_MOUNT and not name.startswith("/"):
            logging.getLogger(__name__).warning("Ignoring unknown mount type '%s'", name)
    return names


def _env_files(specs: list[str]) -> list[str]:
    """``--env-file`` values as files: each may name several, comma separated (Apptainer's string
    slice, read as CSV, so a quoted name keeps its comma); later files win, as in Apptainer."""
    import csv

    return [name for spec in specs for row in csv.reader([spec]) for name in row if name]


def _check_trusted(path: os.PathLike) -> None:
    """Refuse an image (SIF or sandbox) another user could have replaced (the cache helper's check)."""
    try:
        from hpcsif.cache.trust import check_trusted_path
    except ImportError:
        return
    check_trusted_path(path)
