"""``hpcsif run|exec|shell|test``: start a container with Apptainer's flags.

Only the standard library is imported here; the engine is imported inside the handler, and
for a local SIF nothing of the cache or registry code is loaded at all (startup time).
"""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run``, ``exec``, ``shell`` and ``test`` commands."""
    helps = {
        "exec": "run a command in a container",
        "run": "run the container's runscript with arguments",
        "shell": "start an interactive shell in a container",
        "test": "run the container's test script",
    }
    for action, text in helps.items():
        p = subparsers.add_parser(action, help=text, description=text)
        _add_flags(p)
        p.add_argument(
            "image", help="SIF file, sandbox directory or URI (docker://, oras://, oci-archive:// …)"
        )
        p.add_argument(
            "args",
            nargs=argparse.REMAINDER,
            help="command and arguments" if action == "exec" else "arguments",
        )
        p.set_defaults(func=handle, action=action)


def _add_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("-B", "--bind", action="append", default=[], metavar="SPEC", help="src[:dst[:ro|rw]], comma-separated")
    a("--pwd", "--cwd", help="working directory inside the container")
    a("-e", "--cleanenv", action="store_true", help="do not pass the host environment")
    a(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a variable inside (wins over the image)",
    )
    a("--env-file", action="append", default=[], metavar="FILE", help="KEY=VALUE lines to set inside")
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
    a("--writable-tmpfs", action="store_true", help="writable root file system; changes are discarded")
    a(
        "--no-mount",
        action="append",
        default=[],
        metavar="LIST",
        help="leave out default mounts: home, tmp, cwd, bind-paths or a destination path (comma-separated)",
    )
    a("-H", "--home", metavar="SRC[:DST]", help="home directory to bind (and set as $HOME)")
    a("--no-home", action="store_true", help="do not bind the home directory")
    a("--nv", action="store_true", help="NVIDIA GPU devices and driver libraries")
    a("--rocm", action="store_true", help="AMD GPU devices and ROCm libraries")
    a("--mpi", metavar="PROFILE", help="MPI profile (conf/mpi/PROFILE.toml or a path); default per partition")
    a("--app", metavar="NAME", help="SCIF app to run")
    a(
        "--engine",
        choices=("auto", "bwrap", "apptainer", "singularity"),
        help="container engine (default: config)",
    )


def handle(args: argparse.Namespace) -> int:
    """Resolve the image, then launch it with the selected engine."""
    from hpcsif.engine.base import LaunchOptions, select_engine

    _flags_from_environment(args)
    opts = LaunchOptions(
        action=args.action,
        command=list(args.args),
        binds=args.bind,
        pwd=args.pwd,
        cleanenv=args.cleanenv,
        env=args.env,
        env_files=args.env_file,
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
    )
    engine = select_engine(args.engine)
    image = args.image
    if os.path.exists(image):
        from pathlib import Path

        path = Path(os.path.abspath(image))
        _check_trusted(path)
        opts.sandbox = path.is_dir()
        return engine.launch(path, opts)
    from hpcsif.cache.api import leased_image
    from hpcsif.slurm.jobrecord import job_image

    # inside a job: the digest the prolog pinned, or the prolog's staging error at once
    image = job_image(image)
    # the lease keeps the cached image from eviction for the whole run
    with leased_image(image) as path:
        opts.sandbox = path.is_dir()
        return engine.launch(path, opts)


_ENV_SWITCHES = ("cleanenv", "contain", "containall", "writable_tmpfs", "no_home", "nv", "rocm")


def _flags_from_environment(args: argparse.Namespace) -> None:
    """Apptainer's ``APPTAINER_<FLAG>``/``SINGULARITY_<FLAG>`` variables for flags not given.

    ``APPTAINER_CLEANENV=1`` acts as ``--cleanenv`` and so on; ``APPTAINER_BIND`` adds to
    ``-B`` (as in Apptainer, where both apply); ``APPTAINER_HOME``/``_PWD`` apply when the
    flag is absent.
    """

    def value(dest: str) -> str:
        name = dest.upper()
        return os.environ.get(f"APPTAINER_{name}") or os.environ.get(f"SINGULARITY_{name}") or ""

    for dest in _ENV_SWITCHES:
        # Go's strconv.ParseBool, which Apptainer uses, takes 1/t/true in any case as true
        if not getattr(args, dest) and value(dest).lower() in ("1", "t", "true"):
            setattr(args, dest, True)
    for dest in ("home", "pwd"):
        if getattr(args, dest) is None and value(dest):
            setattr(args, dest, value(dest))
    if value("bind"):
        args.bind = [value("bind"), *args.bind]
    if value("no_mount") and not args.no_mount:
        args.no_mount = [value("no_mount")]
    if value("env_file") and not args.env_file:
        args.env_file = [value("env_file")]


def _no_mount(specs: list[str]) -> list[str]:
    """``--no-mount`` values as a list; an unknown name is ignored with Apptainer's warning."""
    import logging

    from hpcsif.engine.binds import NO_MOUNT

    names = [n.strip() for spec in specs for n in spec.split(",") if n.strip()]
    for name in names:
        if name not in NO_MOUNT and not name.startswith("/"):
            logging.getLogger(__name__).warning("Ignoring unknown mount type '%s'", name)
    return names


def _check_trusted(path: os.PathLike) -> None:
    """Refuse an image (SIF or sandbox) another user could have replaced (the cache helper's check)."""
    try:
        from hpcsif.cache.trust import check_trusted_path
    except ImportError:
        return
    check_trusted_path(path)
