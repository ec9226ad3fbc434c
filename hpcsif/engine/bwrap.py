"""The built-in engine: ``squashfuse`` (shared mount) + ``bwrap`` in a user namespace.

The user inside is the user outside (``--unshare-user`` maps the caller's uid to itself; no
setuid helper, no capabilities on the host; root, as in Apptainer, is the host's root). The
image's squashfs partition is mounted once per node (:mod:`hpcsif.engine.mounts`), with the
overlays a launch asks for stacked on it; :mod:`hpcsif.engine.bwrap_command` makes bwrap's
command line for it, and the launch may be saved for the native front.

Python stays the parent of ``bwrap`` (:mod:`hpcsif.engine.supervise`) and releases the mount
when the payload ends; if Python itself is SIGKILLed, the mount's watchdog unmounts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from hpcsif.engine.base import (
    Engine,
    HostContribution,
    LaunchOptions,
    host_contributions,
    refuse_apptainer_only,
    which,
)
from hpcsif.engine.bwrap_command import BwrapCommand
from hpcsif.engine.supervise import Signals, on_terminal, run_bwrap
from hpcsif.errors import EngineError, HpcsifError, MissingToolError, UsageError

if TYPE_CHECKING:
    from hpcsif.engine.mounts import SharedMount

log = logging.getLogger(__name__)


class BwrapEngine(Engine):
    """squashfuse + bubblewrap, unprivileged."""

    name = "bwrap"

    @classmethod
    def available(cls) -> bool:
        """True when bwrap is installed, and squashfuse or ``unsquashfs`` (a temporary sandbox)."""
        from hpcsif.config import get_config
        from hpcsif.engine.mounts import squashfuse_program
        from hpcsif.engine.temporary_sandbox import stands_in
        from hpcsif.errors import MissingToolError

        try:
            squashfuse_program()
        except MissingToolError:
            if not stands_in():
                return False
        return bool(which(get_config().get("engine.bwrap") or "bwrap"))

    def launch(self, image: Path, opts: LaunchOptions) -> int:
        """Mount *image* (SIF file or sandbox directory) and run the action; returns the exit status."""
        from hpcsif.config import get_config

        cfg = get_config()
        bwrap = which(cfg.get("engine.bwrap") or "bwrap")
        if not bwrap:
            raise MissingToolError("bwrap", "bubblewrap")
        _open_standard_descriptors()
        check_user_namespaces()
        refuse_apptainer_only(opts)
        _check_network(opts)
        temporary = None  # the root of a temporary sandbox the SIF was unpacked into
        if not opts.sandbox:
            from hpcsif.engine import temporary_sandbox

            say = opts.notify or log.info
            if temporary_sandbox.needed(opts.unsquash, say):
                # (as in Apptainer, --writable then writes into the sandbox, removed at the end)
                temporary = temporary_sandbox.extract(image, say)
                image, opts = temporary, replace(opts, sandbox=True)
        try:
            return self._launch(bwrap, image, opts)
        finally:
            if temporary is not None:
                temporary_sandbox.remove(temporary, say)

    def _launch(self, bwrap: str, image: Path, opts: LaunchOptions) -> int:
        if opts.writable and opts.writable_tmpfs:
            # (--writable wins below: a writable sandbox is written directly)
            log.warning("Disabling --writable-tmpfs flag, mutually exclusive with --writable")
        sif_overlay = None  # (offset, size) of the SIF overlay partition --writable writes into
        if opts.writable and not opts.sandbox:
            from hpcsif.engine.image_files import writable_overlay

            sif_overlay = writable_overlay(image)
        layers, upper = _overlays(opts.overlay)
        if sif_overlay and upper is not None:
            raise UsageError("only one writable overlay is possible: --writable or a writable --overlay")
        contrib = host_contributions(opts)
        mounts = []
        layered: frozenset[str] = frozenset()
        # from here on a SIGTERM (e.g. scancel during start-up) must not skip the cleanup below
        signals = Signals(interactive=on_terminal())
        old_umask = os.umask(0o022) if opts.no_umask else None  # bwrap and the payload inherit it
        try:
            if opts.sandbox:
                root = image
            else:
                from hpcsif.engine.image_files import mount_root

                # (checked readable: a damaged image fails there)
                root = mount_root(image, mounts, with_overlay=sif_overlay is None)
            if any(p.is_file() for p in layers):
                from hpcsif.engine.data_images import mount_overlay_image

                layers = [mount_overlay_image(p, mounts) if p.is_file() else p for p in layers]
            if sif_overlay or (upper is not None and upper.is_file()):
                from hpcsif.engine.overlay_images import writable_ext3_mount

                where = (image, *sif_overlay) if sif_overlay else (upper, 0, upper.stat().st_size)
                upper = writable_ext3_mount(*where, mounts)
            # -w on a sandbox writes into it directly; an overlay directory keeps the changes
            rw_root = (opts.writable and opts.sandbox) or upper is not None or opts.writable_tmpfs
            if layers or (rw_root and not (opts.writable and opts.sandbox)):
                from hpcsif.engine.mounts import overlay_mount

                if not which("fuse-overlayfs"):
                    why = "needed for --writable-tmpfs and --overlay"
                    raise MissingToolError("fuse-overlayfs", "fuse-overlayfs", why)
                points, files = _overlay_mount_points(root, image, opts, contrib, rw_root, mounts)
                mounts.append(overlay_mount(root, layers, upper, points, files))
                root = mounts[-1].acquire()
                layered = frozenset(files)
            for check in contrib.checks:
                for line in check(str(root)):
                    log.warning("%s", line)
            plan = BwrapCommand(root, image, opts, contrib, mounts, rw_root=rw_root, layered=layered)
            argv = plan.argv()
            # with --no-init the payload is the namespace's PID 1 itself, not a child of bwrap's
            pidns = opts.pid_namespace and not opts.no_init
            if opts.recorder is not None and len(mounts) == 1 and not opts.sandbox:
                _save_plan(opts.recorder, plan, bwrap, argv, mounts[0], pidns)
            return run_bwrap(
                bwrap, argv, plan.env, plan.fds, signals, pidns=pidns, handshake=plan.direct is None
            )
        finally:
            if old_umask is not None:
                os.umask(old_umask)
            signals.restore()
            for m in reversed(mounts):
                m.release()


def _save_plan(
    recorder, plan: BwrapCommand, bwrap: str, argv: list[str], mount: SharedMount, pidns: bool
) -> None:
    """Let the native front repeat this launch (see :mod:`hpcsif.engine.launch_plan`), when it can.

    The witnesses are every host file the plan was made from: the configuration, bwrap and
    squashfuse, the image and its directories (the trust check), the bind sources and working
    directories inside binds, the current directory, ``/etc/resolv.conf``, the bound host
    directories that lack a mount point (their entries), what GPU binds were found from
    (``HostContribution.witnesses``) and hpcsif's modules.
    """
    from hpcsif.config import config_files, get_config

    opts, contrib, cfg = plan.opts, plan.contrib, get_config()
    # (an --env-file is a script the host's shell evaluates: it may say something new each time)
    per_run = opts.action == "shell" or opts.fakeroot or opts.workdir or opts.env_files or plan.interactive
    # (GPU binds repeat where what they were found from is unchanged; MPI profiles check the
    # image's libraries against the host's before each start)
    per_run = per_run or contrib.checks or not contrib.replayable
    if per_run or plan.direct is not None or not cfg.get("engine.launch_plans"):
        return
    if cfg.get("cache.require_signed"):
        return  # the signatures are checked on every start
    for path in [*map(str, config_files()), *(s for s in cfg.sources if s.startswith("/"))]:
        recorder.file(path)
    recorder.which(cfg.get("engine.bwrap") or "bwrap", bwrap)
    mount_cmd = mount.command()
    recorder.file(mount_cmd[0])
    recorder.file(plan.image)
    real = Path(os.path.realpath(plan.image))
    for d in real.parents:
        recorder.identity(str(d))
    for path in [*plan.host_paths, *([plan.cwd] if plan.cwd else []), "/etc/resolv.conf"]:
        recorder.identity(path)
    for path in [*plan.listed, *contrib.witnesses]:
        recorder.file(path)  # (a directory's mtime changes with its entries)
    recorder.save(
        command=opts.command,
        min_command=1 if opts.action == "exec" else 0,
        bwrap=bwrap,
        argv=argv,
        data=plan.data,
        env=plan.env,
        mount_dir=mount.dir,
        mount_cmd=mount_cmd,
        umask=0o022 if opts.no_umask else None,
        pidns=pidns,
    )


def _overlay_mount_points(
    lower: Path,
    image: Path,
    opts: LaunchOptions,
    contrib: HostContribution,
    rw_root: bool,
    mounts: list[SharedMount],
) -> tuple[dict[str, bool], dict[str, bytes]]:
    """The mount points (path -> is a directory) the launch needs and the image lacks, and the
    default files (path -> content), for a layer of their own in the overlay (as Apptainer's
    session layer): an underlay instead would make the entries of their directory mount points
    (``sed -i``, ``rm`` there fail with EBUSY) and hide what the user writes there from a
    persistent overlay, and a mounted /etc/hosts could not be changed.

    Found by a silent trial plan on the image below the overlay; anything it fails on is
    reported by the real plan.
    """
    logging.disable(logging.WARNING)
    try:
        probe = BwrapCommand(lower, image, opts, contrib, mounts, rw_root=rw_root, probe=True)
        probe.argv()
        return probe.points, probe.files
    except (HpcsifError, OSError):
        return {}, {}
    finally:
        logging.disable(logging.NOTSET)


def _open_standard_descriptors() -> None:
    """A closed stdin, stdout or stderr becomes /dev/null, as for Apptainer (a Go program): the
    payload reads nothing or writes nowhere rather than failing with EBADF, and no pipe of the
    launch takes the free number (the container would write into it)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # (a lower one was closed too: it is opened first, so never here)
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)


def _check_network(opts: LaunchOptions) -> None:
    """Refuse network types other than ``none``: only a loopback-only namespace needs no privileges."""
    if opts.network and any(n.strip() != "none" for n in opts.network.split(",")):
        raise UsageError(
            f"--network {opts.network} is not supported by hpcsif: without privileges only 'none' "
            "(loopback only) is possible; use --engine apptainer"
        )


def _overlays(specs: list[str]) -> tuple[list[Path], Path | None]:
    """``--overlay DIR[:ro]`` values as (read-only layers, lowest first; the writable directory).

    A read-only directory that holds ``upper/`` (written by an earlier writable use) contributes
    that, as in Apptainer. Image files with ``:ro`` are read-only layers (mounted by
    :func:`hpcsif.engine.data_images.mount_overlay_image`), a squashfs file always (with
    Apptainer's warning unless ``:ro``); an ext3 file without ``:ro`` is the writable one
    (:mod:`hpcsif.engine.overlay_images`).
    """
    from hpcsif.sif.reader import bare_filesystem

    layers: list[Path] = []
    upper = None
    for spec in specs:
        path, _, mode = spec.rpartition(":") if spec.endswith((":ro", ":rw")) else (spec, "", "rw")
        p = Path(os.path.abspath(path))
        if not p.exists():
            raise EngineError(
                f"while loading overlay images: failed to open overlay image {path}: failed to retrieve "
                f"path for {path}: lstat {path}: no such file or directory"
            )
        if not p.is_dir():
            fstype = bare_filesystem(p)
            if fstype == "squashfs" and mode != "ro":
                log.warning("Overlay image %s is not writable, proceeding with read-only", p)
            elif fstype not in ("squashfs", "ext3"):
                raise EngineError(
                    f"while loading overlay images: failed to open overlay image {path}: "
                    "image format not recognized"
                )
            if fstype == "ext3" and mode != "ro":
                if upper is not None:
                    raise UsageError("only one writable --overlay is possible; add :ro to the others")
                upper = p
            else:
                layers.append(p)
        elif mode == "ro":
            layers.append(p / "upper" if (p / "upper").is_dir() else p)
        elif upper is not None:
            raise UsageError("only one writable --overlay is possible; add :ro to the others")
        else:
            upper = p
    return layers, upper


def squashfs_offset(image: Path) -> int:
    """Byte offset of the primary squashfs partition in the SIF *image* (SIFError if none)."""
    from hpcsif.errors import SIFError
    from hpcsif.sif.format import FSType
    from hpcsif.sif.reader import SIFImage

    with SIFImage.open(image) as sif:
        part = sif.primary_partition()
    if part.fstype != FSType.SQUASHFS:
        raise SIFError(
            f"{image}: primary partition is not squashfs (fstype {part.fstype}); use --engine apptainer"
        )
    return part.offset


def check_user_namespaces(sysctl_dir: str = "/proc/sys", uid: int | None = None) -> None:
    """Raise :class:`EngineError` when this host forbids unprivileged user namespaces.

    Reads the kernel's switches under *sysctl_dir*: ``user/max_user_namespaces`` (0: none at
    all), Debian's ``kernel/unprivileged_userns_clone`` and Ubuntu's AppArmor restriction.
    """
    checks = [("user/max_user_namespaces", "0")]
    if (os.getuid() if uid is None else uid) != 0:
        checks += [
            ("kernel/unprivileged_userns_clone", "0"),
            ("kernel/apparmor_restrict_unprivileged_userns", "1"),
        ]
    for name, bad in checks:
        path = os.path.join(sysctl_dir, name)
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value == bad:
            raise EngineError(
                f"user namespaces are disabled on this host ({path} = {value}); "
                "the bwrap engine needs them: use --engine apptainer (setuid install) or ask the admin"
            )
