"""The ``bwrap`` command line of one container start: Apptainer's default container on an image.

:class:`BwrapCommand` turns a mounted image and the launch options into bwrap's arguments,
the container's environment and the ``--ro-bind-data`` contents (``/etc/passwd``, ``group``,
``hostname``, ``resolv.conf``): Apptainer's default binds, an *underlay* for destinations the
read-only image lacks (the parent directory becomes a tmpfs holding binds of the image's
entries), the namespaces and the in-container launcher. :mod:`hpcsif.engine.bwrap` runs it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from hpcsif.engine.base import (
    HostContribution,
    LaunchOptions,
)
from hpcsif.engine.binds import (
    Bind,
    check_sources,
    cwd_shown,
    default_binds,
    logical_cwd,
    mount_failure,
    parse_bind,
    parse_home,
    parse_mount,
    system_directory,
)
from hpcsif.engine.image_paths import in_image, is_executable, is_file, missing_parent, underlay_entries, walk
from hpcsif.engine.no_shell import oci_start_config, refuse_without_shell, resolve_command
from hpcsif.engine.supervise import on_terminal
from hpcsif.errors import AppNotFoundError, EngineError

if TYPE_CHECKING:
    from hpcsif.engine.mounts import SharedMount

log = logging.getLogger(__name__)

_NOT_UNDERLAID = ("/proc", "/dev", "/sys")
#: the host's files bound by default that an overlay gets as copies of its own (_layer_files)
_LAYERED = ("/etc/hosts", "/etc/localtime", "/etc/resolv.conf")


def _runs_as_is(root: Path, command: str, bound: list[str]) -> str | None:
    """The image path exec's *command* names (along the default ``PATH`` for a bare name) when it
    is a program :func:`~hpcsif.engine.image_paths.runs_as_is` (the launcher's check then skips
    it); None otherwise: a relative path, one below a bind destination (*bound*: a host file
    there), or where the launcher, with the image's own ``PATH``, may find another."""
    from hpcsif.engine.environment import DEFAULT_PATH
    from hpcsif.engine.image_paths import in_image, runs_as_is

    if "/" in command:
        candidates = [command] if command.startswith("/") else []
    else:
        candidates = [f"{d}/{command}" for d in DEFAULT_PATH.split(":")]
    for candidate in candidates:
        found = in_image(str(root), candidate)
        if found and os.path.isfile(found):
            if any(candidate == d or candidate.startswith(d.rstrip("/") + "/") for d in bound):
                return None
            return candidate if runs_as_is(str(root), found) else None
    return None


class BwrapCommand:
    """The bwrap command line, environment and data file descriptors of one launch."""

    def __init__(
        self,
        root: Path,
        image: Path,
        opts: LaunchOptions,
        contrib: HostContribution,
        mounts: list[SharedMount],
        *,
        rw_root: bool = False,
        probe: bool = False,
        layered: frozenset[str] = frozenset(),
    ) -> None:
        import pwd

        self.root = str(root)
        self.opts = opts
        self.rw_root = rw_root  # the root file system is writable (-w sandbox, overlay)
        # a trial plan (see _overlay_mount_points): what the image lacks is collected in points
        self.probe = probe
        self.points: dict[str, bool] = {}
        self.files: dict[str, bytes] = {}
        # where an overlay's mount point layer holds the default files (see _layer_files)
        self.layered = layered
        self.fds: list[int] = []
        self.data: dict[str, str] = {}  # --ro-bind-data descriptor (as in argv) -> its content
        self.interactive = on_terminal()
        user = pwd.getpwuid(os.getuid())
        # --fakeroot: the image's root inside; as in Apptainer the caller's home is bound at /root
        self.user = pwd.getpwuid(0) if opts.fakeroot else user
        # as Apptainer, the home directory is the user database's, whatever $HOME says
        home_src, self.home = parse_home(opts.home, user.pw_dir or os.environ.get("HOME") or "/")
        if opts.fakeroot and not opts.home:
            self.home = self.user.pw_dir
        # $HOME as --home wrote it: a trailing / stays, as in Apptainer
        fields = (opts.home or "").split(":")
        written = fields[1] if len(fields) > 1 and fields[1] else fields[0]
        home_env = written if opts.home and os.path.normpath(written) == self.home else self.home
        # what --contain makes private (a tmpfs, or the work directory's), less what --no-mount
        # names: as in Apptainer, that is the image's own directory
        self.private = [d for d in ("/tmp", "/var/tmp") if "tmp" not in opts.no_mount] if opts.contain else []
        if opts.contain and not opts.no_home and not opts.home and "home" not in opts.no_mount:
            self.private.append(self.home)
        given = [b for spec in opts.binds for b in parse_bind(spec)]
        given += [parse_mount(spec) for spec in opts.mounts]
        # (APPTAINER_BIND inside: as written, repeats too, as there)
        self.bind_dests = [b.given or b.dst for b in given]
        self.env: dict[str, str] = {}  # (a probe does not read an --env-file twice)
        if not probe:
            from hpcsif.engine.environment import build_env, host_environ

            # the environment's warnings and errors come before the mounts', as in Apptainer
            self.env = build_env(
                host_environ(),
                action=opts.action,
                cleanenv=opts.cleanenv,
                env=opts.env,
                env_files=opts.env_files,
                image=str(image),
                home=home_env,
                app=opts.app,
                pass_prefixes=contrib.pass_prefixes,
                extra={**contrib.env, **_shell_env(opts.shell)},
                ld_paths=contrib.ld_paths,
                bind_dests=self.bind_dests,
                no_eval=opts.no_eval,
            )
        # (the binds' warnings: after the environment's, before what the other options say)
        user_binds = _first_per_destination(given)
        try:
            cwd: str | None = os.getcwd()
        except OSError:
            cwd = None
        # as Apptainer, a system directory (/usr, /etc, /dev/…) is not bound: the payload starts
        # in the image's own directory of that name
        system = system_directory(cwd) if cwd else None
        logical = logical_cwd(cwd) if cwd else None
        self.cwd = system or logical
        self.bound_cwd = None if system or opts.contain else logical  # (the host's, at its name)
        binds = default_binds(
            home_src,
            self.home,
            contain=opts.contain,
            no_home=opts.no_home,
            home_given=bool(opts.home),
            cwd=None if system else cwd,
            no_mount=opts.no_mount,
            cwd_dst=logical,
        )
        # (default_binds puts the current directory's last)
        cwd_bind = (
            binds[-1] if binds and not system and (binds[-1].src, binds[-1].dst) == (cwd, logical) else None
        )
        if os.path.exists("/etc/resolv.conf") and not opts.dns:
            binds.append(Bind("/etc/resolv.conf", "/etc/resolv.conf", readonly=True, optional=True))
        binds += self._workdir_binds()
        home_bind = next((b for b in binds if b.dst == self.home and b.src == home_src), None)
        missing_home = home_bind is not None and not os.path.exists(home_src)
        if missing_home:
            # as Apptainer (its issue #4208): a home the host lacks is an empty private directory
            binds.remove(home_bind)
            self.scratch_tmpfs.append(self.home)
        elif home_bind is not None and opts.home and not os.path.isdir(home_src):
            raise mount_failure(home_src, self.home, f"could not mount {home_src}: not a directory")
        if any(b.image_src is not None for b in user_binds):
            from hpcsif.engine.data_images import resolve_image_binds

            user_binds = resolve_image_binds(user_binds, mounts)  # (mounted, held in *mounts*)
        binds += user_binds
        self.user_binds = user_binds
        if cwd_bind is not None:
            # as Apptainer: not where another mount already shows it or something else
            others = [b for b in binds if b is not cwd_bind]
            shown = cwd_shown(cwd, cwd_bind.dst, [*others, *contrib.binds])
            if shown:
                binds = others
            if shown == "mounted":
                self.bound_cwd = None  # (what the container shows there is not the host's)
        # parents before children, so that a bind inside another bind's destination stays visible
        # (dict.fromkeys drops repeats such as a current directory that is the home directory)
        # host paths the launch depends on: bind sources, working directories inside binds
        self.host_paths = [b.src for b in binds + contrib.binds] + ([home_src] if missing_home else [])
        unique = list(dict.fromkeys(check_sources(binds + contrib.binds)))
        if (opts.writable and opts.sandbox) or (rw_root and opts.overlay and not probe):
            unique = self._existing_destinations(unique, user_binds, strict=opts.writable and opts.sandbox)
        self.binds = sorted(unique, key=lambda b: b.dst.count("/"))
        self.contrib = contrib
        # devices from elsewhere (gpu.dev_dir) must not become new nodes in the host's /dev:
        # then the container gets bwrap's minimal /dev plus exactly the devices asked for
        self.minimal_dev = opts.contain or any(b.dev and b.src != b.dst for b in self.binds)
        # an image without a usable shell (distroless, a dangling /bin/sh) starts its command
        # directly, configured from the SIF's oci-config.json instead of the /.singularity.d scripts
        self.direct = None
        if not is_executable(in_image(self.root, "/bin/sh")):
            self.direct = oci_start_config(None if opts.sandbox else image, opts.action)
            if self.direct is None:
                refuse_without_shell(image, opts.action, self.root if opts.sandbox else None)
        if probe:
            return
        self.image = str(image)
        if self.direct is not None:
            from hpcsif.engine.environment import direct_env

            self.env = direct_env(self.env, self.direct["Env"])

    # -- command line --------------------------------------------------------------------------
    def argv(self) -> list[str]:
        opts = self.opts
        args = ["bwrap", *self._user_namespace(), *self._namespaces(), *self._caps()]
        if not self.interactive:
            # the payload cannot push characters into our terminal (TIOCSTI); and it dies with us
            args += ["--new-session", "--die-with-parent"]
        dirs = [*(b.dst for b in self.binds), *self.scratch_tmpfs, *_NOT_UNDERLAID, *self.private]
        # as Apptainer, no /etc/passwd or /etc/group is made where the image has none (an entry
        # of any kind counts: a link out of the image still gets the made file)
        self.etc_files = [f for f in ("/etc/passwd", "/etc/group") if _has_entry(self.root, f)]
        files = [*self.etc_files, *(["/etc/resolv.conf"] if opts.dns else [])]
        files += ["/etc/hostname"] if opts.hostname else []
        self.places: dict[str, str | None] = {}
        # the directories other mounts may lie in (not a file bound at /etc/hosts …)
        covers = set(dirs) - {b.dst for b in self.binds if not os.path.isdir(b.src)}
        self._place([*dirs, *files], covers)
        self._drop_unreachable()
        self._check_user_binds(covers)
        self._host_underlays(covers)
        # (--pwd /tmp/ is /tmp, as Apptainer's filepath.Clean makes it)
        workdir = (opts.pwd and os.path.normpath(opts.pwd)) or (
            self.cwd if self.cwd and not opts.contain else self.home
        )
        if opts.pwd and (reason := self._cannot_enter(opts.pwd)):
            raise EngineError(f"failed to set working directory: chdir {opts.pwd}: {reason}")
        reason = None if opts.pwd else self._cannot_enter(workdir)
        if reason:
            # not bound (--no-mount cwd, or the user may not enter it): Apptainer's fallback; a
            # home the container lacks too (a --writable sandbox with --no-home): the root
            fallback = self.home
            home_reason = reason if workdir == self.home else self._cannot_enter(self.home)
            if home_reason:  # (as Apptainer, the warning then names the home and why)
                fallback, workdir, reason = "/", self.home, home_reason
            log.warning(
                "Error changing the container working directory. Using '%s' instead: chdir %s: %s",
                fallback,
                workdir,
                reason,
            )
            workdir = fallback
        # the image's links followed, as Apptainer's working directory (--pwd /bin: /usr/bin); a
        # link left as the destination would be left out of the root's underlay
        if not any(workdir == c or workdir.startswith(c.rstrip("/") + "/") for c in covers):
            walked = walk(self.root, workdir, follow_last=True)
            workdir = walked[0] if walked and not walked[1] else workdir
        self._place([workdir], covers)
        at = self.places.get
        args += self._root(set(files))
        if self.probe:
            self.files = self._layer_files()
            return args  # the mount points and files are known
        if at("/proc"):
            args += ["--proc", at("/proc")]
        # --no-mount sys, dev: the image's own directory, as in Apptainer
        if at("/sys") and "sys" not in opts.no_mount:
            args += ["--ro-bind", "/sys", at("/sys")]
        # bwrap's own /dev has a 0755 /dev/shm: a sticky world-writable one as on a host
        if at("/dev") and "dev" in opts.no_mount:
            pass
        elif at("/dev") and self.minimal_dev:
            args += ["--dev", at("/dev"), "--perms", "01777", "--tmpfs", at("/dev") + "/shm"]
        elif at("/dev"):
            args += ["--dev-bind", "/dev", at("/dev")]
        mounts: list[tuple[str, list[str]]] = []  # (where, bwrap's arguments)
        if not opts.workdir:
            # private temp directories with the host's sticky 1777 mode, as Apptainer's
            for d in self.private:
                if at(d):
                    perms = [] if d == self.home else ["--perms", "01777"]
                    mounts.append((at(d), [*perms, "--tmpfs", at(d)]))
        mounts += [(at(d), ["--tmpfs", at(d)]) for d in self.scratch_tmpfs if at(d)]
        for b in self.binds:
            if b.dev and not self.minimal_dev and b.src == b.dst and "dev" not in opts.no_mount:
                continue  # already there: the host's /dev is bound whole
            if at(b.dst) in self.layered and b not in self.user_binds:
                continue  # a file of the overlay's own (see _layer_files)
            kind = "--dev-bind" if b.dev else "--ro-bind" if b.readonly else "--bind"
            mounts.append((at(b.dst), [kind, b.src, at(b.dst), *self.host_underlays.get(b, [])]))
        # parents first, so that a mount inside another one's place (-S /tmp/x) stays visible
        made: set[str] = set()
        for where, more in sorted(mounts, key=lambda m: m[0].count("/")):
            args += self._parents(where, [m[0] for m in mounts], made)
            args += more
        for dest, text in self._etc_data():
            if dest not in self.layered:
                # readable by all, as Apptainer's (bwrap's own mode is 0600: no other user the
                # payload switches to could read /etc/passwd)
                args += ["--perms", "0644", "--ro-bind-data", self._data(text), dest]
        if self.underlaid and not self.rw_root:
            mounted = [at(b.dst) for b in self.binds]
            for d in sorted(self.underlaid, key=len):
                if not any(m == d or d.startswith(m.rstrip("/") + "/") for m in mounted):
                    args += ["--remount-ro", d]
        for d in self.host_underlaid:
            args += ["--remount-ro", d]
        args += ["--chdir", at(workdir) or workdir]  # (a host link in a bound directory followed)
        from hpcsif.engine.environment import LAUNCHER

        if self.direct is not None:
            from hpcsif.engine.environment import direct_argv

            if opts.app and not os.path.isdir(in_image(self.root, f"/scif/apps/{opts.app}") or ""):
                # (what the image's env script says where a shell runs it; after the set-up's
                # warnings, as there)
                raise AppNotFoundError(f"Could not locate the container application: {opts.app}")
            if "PWD" not in self.env:  # (bwrap sets it after --chdir, last: in name order instead)
                self.env = dict(sorted({**self.env, "PWD": workdir}.items()))

            argv = direct_argv(opts.action, opts.command, self.direct, self.image)
            # exec's command or the image's ENTRYPOINT/CMD: both fail with Apptainer's one-liners
            path = self.env.get("PATH", "")
            argv = [resolve_command(self.root, argv[0], path, workdir, self.bound_cwd), *argv[1:]]
            return [*args, "--", *argv]
        if opts.action == "exec" and opts.command:
            runs = _runs_as_is(self.root, opts.command[0], [b.dst for b in self.binds])
            if runs:  # (the host's __HPCSIF_* variables never come in: build_env drops them)
                self.env["__HPCSIF_RUNS"] = runs
        return [*args, "/bin/sh", "-c", LAUNCHER, "hpcsif", *opts.command]

    def _parents(self, place: str, places: list[str], made: set[str]) -> list[str]:
        """``--dir`` for each parent of the mount point *place* that the image lacks, outside
        every other mount (*places*), top down: bwrap 0.8 would make them mode 0700, Apptainer
        makes them 0755 (``-B file:/data/x``: a ``/data`` that everyone may enter)."""
        missing = []
        d = os.path.dirname(place)
        while d != "/" and d not in made and not os.path.lexists(self.root + d):
            if any(d == p or d.startswith(p.rstrip("/") + "/") for p in places if p != place):
                break  # inside another mount: its own tmpfs or host directory
            missing.append(d)
            d = os.path.dirname(d)
        made.update(missing)
        return [arg for d in reversed(missing) for arg in ("--dir", d)]

    def _place(self, dests: list[str], covers: set[str]) -> None:
        """Record in ``self.places`` where each destination is in the image, for bwrap.

        bwrap resolves a destination's symbolic links while the host is still at ``/oldroot``
        and the image at ``/newroot``: an image link to ``/oldroot/…`` or up a ``..`` chain
        would put a mount point, or a new file, on the host. So every destination is handed
        to bwrap with the image's links already followed inside the image (``..`` stops at its
        root), as the container will see them; one below another mount (*covers*) keeps the
        path within that mount, or where a host link in a bound directory leads. None:
        unreachable (a link loop, a file where a directory is needed, an image link into
        another mount), the mount is skipped.
        """
        new = sorted(set(dests) - self.places.keys(), key=lambda p: p.count("/"))
        in_image: set[str] = set()  # placed by the image's own links, not inside another mount
        for d in new:
            self.places[d], by_image = self._locate(d, covers)
            if by_image:
                in_image.add(d)
        # a link into another mount (the host's /tmp …) must not put a mount point there
        mounts = {c: p for c, p in self.places.items() if c in covers and p is not None}
        for d in in_image:
            place = self.places[d]
            if place is not None and any(
                place.startswith(p.rstrip("/") + "/") and not d.startswith(c.rstrip("/") + "/")
                for c, p in mounts.items()
            ):
                self.places[d] = None

    def _locate(self, d: str, covers: set[str], hops: int = 0) -> tuple[str | None, bool]:
        """Where *d* is for bwrap (see :meth:`_place`), and whether the image's links placed it.

        Below a bind of a host directory the host's links are followed as the container sees
        them (an absolute one from the container's root), since bwrap cannot follow them.
        """
        # (a bind onto the root itself is skipped: see _drop_unreachable)
        over = [c for c in covers if c != "/" and d.startswith(c + "/")]
        if not over:
            walked = walk(self.root, d, follow_last=False)
            return (None if walked is None else os.path.join(walked[0], *walked[1])), True
        c = max(over, key=len)
        if c not in self.places:
            self.places[c] = self._locate(c, covers, hops)[0]
        base = self.places[c]
        if base is None:
            return None, False
        bound = next((b for b in reversed(self.binds) if b.dst == c and os.path.isdir(b.src)), None)
        parts = d[len(c) + 1 :].split("/")
        host = bound.src if bound else None
        for i, part in enumerate(parts if host else []):
            host = os.path.join(host, part)
            if os.path.islink(host):
                if hops >= 40:
                    return None, False
                here = os.path.join(c, *parts[:i])
                target = os.path.normpath(os.path.join(here, os.readlink(host), *parts[i + 1 :]))
                return self._locate(target, covers, hops + 1)
            if not os.path.isdir(host):
                break
        return base.rstrip("/") + d[len(c) :], False

    def _drop_unreachable(self) -> None:
        """Skip, with Apptainer's warning, the binds whose destination the image makes impossible.

        A bind onto the container's root itself is skipped too (Apptainer's has no effect).
        """
        kept = []
        for b in self.binds:
            if b.dst == "/":
                log.warning("Skipping mount %s [binds]: the container's root cannot be replaced", b.src)
            elif self.places.get(b.dst) is None:
                log.warning("Skipping mount %s [binds]: %s doesn't exist in container", b.dst, b.dst)
            else:
                kept.append(b)
        # parents before children where they are mounted (a link may take a bind deeper or higher)
        self.binds = sorted(kept, key=lambda b: self.places[b.dst].count("/"))

    def _check_user_binds(self, covers: set[str]) -> None:
        """Apptainer's refusals of a user's bind the image cannot take (bwrap's would be less clear).

        A destination inside ``/proc`` or ``/sys`` cannot be created; a directory cannot be
        mounted on the image's file, nor a file on its directory.
        """
        for b in self.binds:
            place = self.places[b.dst]
            if b not in self.user_binds or b.dev:
                continue
            if place.startswith(("/proc/", "/sys/")):
                raise mount_failure(b.src, b.dst, f"destination {b.dst} doesn't exist in container")
            if any(b.dst.startswith(c.rstrip("/") + "/") for c in covers):
                continue  # inside another mount: the image's entry there is hidden
            found = in_image(self.root, place)
            if found is not None and os.path.isdir(found) != os.path.isdir(b.src):
                raise mount_failure(b.src, b.dst, f"could not mount {b.src}: not a directory")

    def _host_underlays(self, covers: set[str]) -> None:
        """Mount points inside bound host directories that must not be made on the host.

        A mount inside a bound host directory that lacks its destination needs a mount point
        there; bwrap (and Apptainer) create it on the host. A read-only bind, or a directory
        the caller may not write, must stay untouched: its deepest existing directory becomes
        a tmpfs holding binds of its entries (``host_underlays``, emitted right after the bind
        that covers it), read-only once the mounts are in (``host_underlaid``). A host file of
        the defaults (``/etc/hosts`` …) is skipped there instead, as Apptainer skips it. A
        destination inside a bound file is refused in one line.
        """
        self.host_underlays: dict[Bind, list[str]] = {}
        self.host_underlaid: list[str] = []
        self.listed: list[str] = []  # host directories whose entries the plan depends on
        at = self.places
        # (where the binds go, links followed; the last bind of a destination is the one seen)
        self._by_place = {at[b.dst]: b for b in self.binds}
        bound = {b.dst for b in self.binds}
        self._tmpfs = [at[t] for t in covers - bound if at.get(t)]
        needed: dict[Bind, set[str]] = {}
        targets = [(at[b.dst], b, f"mount {b.src}->{b.dst} error: destination {b.dst}") for b in self.binds]
        targets += [(at[d], None, f"scratch directory {d}") for d in self.scratch_tmpfs if at.get(d)]
        # --contain's private tmpfs directories too (its home inside a -B of /home)
        targets += [(at[d], None, f"directory {d}") for d in self.private if at.get(d) and d not in bound]
        for place, b, name in targets:
            found = self._lacking_bind(place, name)
            if found is None:
                continue
            c, cur = found
            if b is not None and b not in self.user_binds and b.optional and not os.path.isdir(b.src):
                # a host file of the defaults (/etc/hosts …): skipped, as Apptainer skips it (and
                # says so, except for resolv.conf)
                if b.dst != "/etc/resolv.conf":
                    log.warning("Skipping mount %s [binds]: %s doesn't exist in container", b.dst, b.dst)
                self.binds.remove(b)
                continue
            self.listed.append(cur)  # its entries matter: the missing one may appear
            if c.readonly or not os.access(cur, os.W_OK):
                needed.setdefault(c, set()).add(cur)
        for c, dirs in needed.items():
            args = []
            for d in sorted(dirs, key=lambda p: p.count("/")):
                dest = os.path.normpath(os.path.join(at[c.dst], os.path.relpath(d, c.src)))
                try:
                    entries = underlay_entries(d, dest, "--ro-bind" if c.readonly else "--bind", skip=set())
                    mode = os.stat(d).st_mode & 0o7777
                except OSError as exc:
                    raise EngineError(
                        f"mount {c.src}->{c.dst} error: cannot make mount points inside it without writing "
                        f"to {d} ({exc.strerror})"
                    ) from None
                args += ["--perms", f"{mode:o}", "--tmpfs", dest, *entries]
                self.host_underlaid.append(dest)
            self.host_underlays[c] = args

    def _lacking_bind(self, place: str, what: str) -> tuple[Bind, str] | None:
        """The bind of a host directory that lacks *place* (inside it), and its deepest existing
        directory there; None when *place* is not inside such a bind or is there already.

        *what* names the mount for the error when *place* is inside a bound file.
        """
        inside = [c for c in self._by_place if place.startswith(c.rstrip("/") + "/")]
        if not inside:
            return None
        c = self._by_place[max(inside, key=len)]
        if not os.path.isdir(c.src):
            raise EngineError(f"{what} is inside {c.dst}, where the file {c.src} is bound")
        top = self.places[c.dst]
        if any(place.startswith(t.rstrip("/") + "/") and len(t) > len(top) for t in self._tmpfs):
            return None  # a tmpfs (--scratch, --contain) deeper than the bind holds it
        cur = c.src
        for part in os.path.relpath(place, top).split("/"):
            nxt = os.path.join(cur, part)
            if not os.path.lexists(nxt) or os.path.islink(nxt) or not os.path.isdir(nxt):
                break
            cur = nxt
        # there already (or a link or a file, which bwrap follows or refuses)
        return None if os.path.lexists(nxt) else (c, cur)

    def _existing_destinations(self, binds: list[Bind], user_binds: list[Bind], strict: bool) -> list[Bind]:
        """Binds for a persistent writable root, which an underlay would partly hide.

        A default bind of a host file (``/etc/localtime`` …) whose destination the image lacks
        is skipped with Apptainer's warning, so that the image's directory is not underlaid.
        *strict* (``-w`` on a sandbox, where Apptainer creates nothing either): every default
        bind is, and a user's bind or the home directory without its destination is an error.
        """
        kept = []
        home_bound = not self.opts.no_home and "home" not in self.opts.no_mount

        def in_bound_directory(b: Bind) -> bool:
            # below another bind of a host directory (the working directory in the host's
            # /tmp): as in Apptainer, the image need not have it
            return any(
                c is not b
                and b.dst.startswith(c.dst.rstrip("/") + "/")
                and os.path.isdir(c.src)
                and missing_parent(self.root, c.dst) is None
                for c in binds
            )

        for b in binds:
            if missing_parent(self.root, b.dst) is None or b.dev or in_bound_directory(b):
                kept.append(b)
            elif strict and (b in user_binds or (home_bound and b.dst == self.home)):
                raise EngineError(
                    f"destination {b.dst} doesn't exist in container (--writable cannot create it)"
                )
            elif strict or (b.optional and b not in user_binds and b.dst not in (self.home, self.cwd)):
                log.warning("Skipping mount %s [binds]: %s doesn't exist in container", b.dst, b.dst)
            else:
                kept.append(b)
        return kept

    def _user_namespace(self) -> list[str]:
        """A user namespace, except for root without ``--fakeroot`` or ``-u/--userns``.

        As in Apptainer, root runs as the host's root: a namespace that maps uid 0 alone shows
        every other user's files as nobody's, and root could not read or write them.
        """
        opts = self.opts
        if os.getuid() == 0 and not opts.fakeroot and ("--userns", None) not in opts.passthrough:
            return []
        return ["--unshare-user"]

    def _namespaces(self) -> list[str]:
        """bwrap's options for the identity and the namespaces besides the user namespace."""
        opts = self.opts
        args = ["--uid", "0", "--gid", "0"] if opts.fakeroot else []
        if opts.pid_namespace:
            args += ["--unshare-pid", *(["--as-pid-1"] if opts.no_init else [])]
        if opts.ipc or opts.containall:
            args.append("--unshare-ipc")
        if opts.uts:
            args += ["--unshare-uts", *(["--hostname", opts.hostname] if opts.hostname else [])]
        if opts.net:
            args.append("--unshare-net")  # loopback only, the 'none' network
        return args

    def _caps(self) -> list[str]:
        """Capabilities, all of them within the container's user namespace only.

        ``--fakeroot`` gets the full set, as Apptainer's fakeroot root has; ``--no-privs``
        drops everything, ``--add-caps``/``--drop-caps`` adjust (Apptainer's names, any case,
        ``CAP_`` optional, ``all``).
        """
        opts = self.opts
        args = ["--cap-add", "ALL"] if opts.fakeroot else []
        for flag, names in (("--cap-add", opts.add_caps), ("--cap-drop", opts.drop_caps)):
            for name in (n.strip().upper() for n in (names or "").split(",")):
                if name:
                    args += [flag, name if name == "ALL" or name.startswith("CAP_") else f"CAP_{name}"]
        if opts.no_privs:
            args += ["--cap-drop", "ALL"]
        return args

    def _workdir_binds(self) -> list[Bind]:
        """-S/--scratch and -W/--workdir: host directories under the work directory, as binds.

        Without ``--workdir`` a scratch directory is a private tmpfs (listed in
        ``scratch_tmpfs``); with it, ``WORKDIR/scratch/<dir>`` backs it, and under
        ``--contain`` ``WORKDIR/tmp``, ``WORKDIR/var_tmp`` and ``WORKDIR/home`` back ``/tmp``,
        ``/var/tmp`` and the home directory, as in Apptainer.
        """
        opts = self.opts
        scratch = [d.strip() for spec in opts.scratch for d in spec.split(",") if d.strip()]
        for d in scratch:
            why = None
            if not d.startswith("/"):
                why = "destination must be an absolute path"
            elif os.path.normpath(d).startswith(("/proc/", "/sys/")):
                why = f"destination {d} doesn't exist in container"  # (bwrap's "Can't mkdir" else)
            if why:
                raise EngineError(
                    f"container creation failed: could not bind scratch directory {d} into container: {why}"
                )
        self.scratch_tmpfs = [] if opts.workdir else [os.path.normpath(d) for d in scratch]
        if not opts.workdir:
            return []
        work = os.path.abspath(opts.workdir)
        binds = []
        if opts.contain:
            # as Apptainer: the home, then /tmp and /var/tmp, each made in an existing work
            # directory, then the scratch directories, made with their parents
            wanted = [("home", self.home, 0o700), ("tmp", "/tmp", 0o1777), ("var_tmp", "/var/tmp", 0o1777)]
            for name, dst, mode in [w for w in wanted if w[1] in self.private]:
                src = os.path.join(work, name)
                if not os.path.isdir(src):
                    try:
                        os.mkdir(src)
                        os.chmod(src, mode)
                    except OSError as e:
                        why = f"failed to create {src}: mkdir {src}: {_go_error(e)}"
                        raise EngineError(f"container creation failed: {why}") from None
                binds.append(Bind(src, dst))
        sources = [os.path.join(work, "scratch", d.strip("/")) for d in scratch]
        for d in [os.path.join(work, "scratch"), *sources] if scratch else []:
            if (failed := _mkdir_all(d, 0o750)) is not None:
                why = f"could not create scratch working directory {d}: mkdir {failed[0]}: {failed[1]}"
                raise EngineError(f"container creation failed: {why}")
        return binds + [Bind(src, os.path.normpath(d)) for src, d in zip(sources, scratch, strict=True)]

    def _cannot_enter(self, path: str) -> str | None:
        """Why *path* cannot be the working directory inside (None if it can): bound or the image's."""
        if path in self.private or path in self.scratch_tmpfs:
            return None  # the private tmpfs directories of --contain, --scratch, a missing home
        for b in reversed(self.binds):  # the deepest bind holding *path* decides
            if path == b.dst or path.startswith(b.dst.rstrip("/") + "/"):
                host = b.src + path[len(b.dst) :]
                self.host_paths.append(host)  # what the launch depends on
                try:
                    if not stat.S_ISDIR(os.stat(host).st_mode):
                        return "not a directory"
                except PermissionError:
                    return "permission denied"
                except OSError:
                    return "no such file or directory"
                return None if os.access(host, os.X_OK) else "permission denied"
        walked = walk(self.root, path, follow_last=True)
        if walked is None:
            return "a symbolic link loop or not a directory"
        if walked[1]:
            # made as the parent of a mount point (-B /x:/work/data: /work), as in Apptainer
            below = path.rstrip("/") + "/"
            made = any(d.startswith(below) for d, place in self.places.items() if place is not None)
            return None if made else "no such file or directory"
        return None if os.path.isdir(self.root + walked[0]) else "not a directory"

    def _root(self, files: set[str]) -> list[str]:
        """Mount the image at / with tmpfs underlays where a destination is missing in it.

        A destination the image has as a symbolic link, or as a file where a directory is
        mounted (or the reverse), is left out of its parent's underlay: bwrap makes a mount point
        of the right kind in its place. *files* are the destinations that take a file.
        """
        # even a writable overlay needs underlays: its root-owned directories refuse new mount
        # points to an unprivileged user
        bind = "--bind" if self.rw_root else "--ro-bind"
        places = {d: p for d, p in self.places.items() if p is not None}
        file_binds = {b.dst for b in self.binds if not os.path.isdir(b.src)}
        need: set[str] = set()
        skip: dict[str, bool] = {}  # destination -> a directory is mounted there
        # below these the path comes from the host or a tmpfs, where bwrap can create mount points
        covered = [places[b.dst] for b in self.binds] + list(_NOT_UNDERLAID)
        covered += [places[d] for d in self.scratch_tmpfs if d in places]
        covered += [places[d] for d in self.private if d in places]
        for d, dest in places.items():
            if any(dest.startswith(c.rstrip("/") + "/") for c in covered):
                continue
            is_dir = d not in files and d not in file_binds
            parent = missing_parent(self.root, dest)
            if parent is not None:
                need.add(parent)
                skip[dest] = is_dir
            elif dest != "/" and os.path.isdir(self.root + dest) != is_dir:
                need.add(os.path.dirname(dest))
                skip[dest] = is_dir
        if self.probe:
            self.points = skip
        self.underlaid = need
        args = [] if "/" in need else [bind, self.root, "/"]
        for d in sorted(need, key=lambda p: (p.count("/"), p)):
            if d != "/":
                args += ["--tmpfs", d]
            args += underlay_entries(self.root + d if d != "/" else self.root, d, bind, skip=skip)
        return args

    def _etc_data(self) -> list[tuple[str, str]]:
        """The files made for the container (where they go, their text): /etc/passwd and
        /etc/group with the user's entries, /etc/resolv.conf for --dns."""
        at = self.places.get
        made = []
        # as in Apptainer, whose user binds come after these files, a user's bind of the file or
        # of a directory holding it (-B mine:/etc/passwd, -B dir:/etc) wins
        users = [p.rstrip("/") + "/" for b in self.user_binds if (p := self.places.get(b.dst))]

        def user_bound(dest: str) -> bool:
            return any((dest + "/").startswith(u) for u in users)

        # as Apptainer, root gets the image's own /etc/passwd (its entry is already there), with
        # the container's home in root's entry
        for name, make in (("passwd", self._passwd), ("group", self._group)):
            dest = at(f"/etc/{name}")
            if dest is None or f"/etc/{name}" not in self.etc_files:
                # not in the image (FROM scratch, an unreachable /etc …); as Apptainer, said
                # where there is no overlay, whose layer Apptainer checks instead of the image
                if not self.probe and not self.rw_root:
                    log.warning("%s file doesn't exist in container, not updating", name)
                continue
            if user_bound(dest) or self._lacking_bind(dest, f"/etc/{name}"):
                continue  # a bound host directory without it (-B dir:/etc): as Apptainer, left so
            root_entry = name == "passwd" and self.user.pw_uid == 0 and self._has_root_entry(dest)
            text = self._root_passwd() if root_entry else make()
            if text is not None:
                made.append((dest, text))
        resolv = at("/etc/resolv.conf")
        if self.opts.dns and resolv and not user_bound(resolv) and not self._lacking_bind(resolv, "--dns"):
            made.append((resolv, _resolv_conf(self.opts.dns)))
        hostname = at("/etc/hostname")
        if (
            self.opts.hostname
            and hostname
            and not user_bound(hostname)
            and not self._lacking_bind(hostname, "--hostname")
        ):
            made.append((hostname, _hostname_file(self.opts.hostname)))
        return made

    def _layer_files(self) -> dict[str, bytes]:
        """For an overlay: the default files (the made ones, the host's /etc/hosts …) as files
        of the mount point layer instead of mounts, so that they can be changed as any other
        (as in Apptainer's session layer); by where they go. Not where a bind covers them."""
        covered = [self.places[b.dst].rstrip("/") + "/" for b in self.binds]
        files = {dest: text.encode() for dest, text in self._etc_data()}
        for b in self.binds:
            dest = self.places[b.dst]
            if b.dst in _LAYERED and b.optional and b not in self.user_binds and not os.path.isdir(b.src):
                with contextlib.suppress(OSError):  # (unreadable: it stays a bind)
                    files[dest] = Path(b.src).read_bytes()
        return {d: data for d, data in files.items() if not any(d.startswith(c) for c in covered)}

    def _data(self, text: str) -> str:
        """A memfd holding *text* for ``--ro-bind-data``; returns its number as a string."""
        fd = os.memfd_create("hpcsif-data", 0)
        os.write(fd, text.encode())
        os.lseek(fd, 0, os.SEEK_SET)
        self.fds.append(fd)
        self.data[str(fd)] = text
        return str(fd)

    def _image_lines(self, rel: str, skip) -> list[str]:
        # the image's file, its links followed inside the image (never a host file such as a
        # link to /etc/shadow would name)
        path = in_image(self.root, "/" + rel)
        if path is None or not is_file(path):
            return []
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return [ln for ln in f.read().splitlines() if ln and not skip(ln.split(":"))]
        except OSError:
            return []

    def _has_root_entry(self, dest: str) -> bool:
        """True when the image's own /etc/passwd (at *dest*, a plain file) has root in it."""
        return is_file(self.root + dest) and bool(self._image_lines("etc/passwd", lambda f: f[0] != "root"))

    def _root_passwd(self) -> str | None:
        """The image's /etc/passwd with root's home made the container's and its password field
        ``x``, as Apptainer writes root's entry (None: it is so already)."""
        lines = self._image_lines("etc/passwd", lambda f: False)
        fixed = [
            ":".join([f[0], "x", *f[2:5], self.home, *f[6:]]) if f[0] == "root" and len(f) > 5 else ln
            for ln, f in ((ln, ln.split(":")) for ln in lines)
        ]
        return None if fixed == lines else "\n".join(fixed) + "\n"

    def _passwd(self) -> str:
        """The image's /etc/passwd with the calling user's entry (home and shell adjusted)."""
        u = self.user
        lines = self._image_lines(
            "etc/passwd", lambda f: f[0] == u.pw_name or (len(f) > 2 and f[2] == str(u.pw_uid))
        )
        lines.append(f"{u.pw_name}:x:{u.pw_uid}:{u.pw_gid}:{u.pw_gecos}:{self.home}:/bin/sh")
        return "\n".join(lines) + "\n"

    def _group(self) -> str:
        """The image's /etc/group, then a line naming the user for each of the caller's groups
        (supplementary and primary; root's alone with --fakeroot), as Apptainer writes it."""
        import grp

        gids = [0] if self.opts.fakeroot else os.getgroups()
        if self.user.pw_gid not in gids:
            gids.append(self.user.pw_gid)
        lines = self._image_lines("etc/group", lambda f: False)
        added: list[str] = []
        for gid in gids:
            try:
                line = f"{grp.getgrgid(gid).gr_name}:x:{gid}:{self.user.pw_name}"
            except KeyError:
                continue  # a group without a name gets no line (Apptainer's too)
            if line not in added:
                added.append(line)
        return "\n".join(lines + added) + "\n"


def _go_error(e: OSError) -> str:
    """An OS error as Go prints it ("no such file or directory": strerror, lower case)."""
    text = os.strerror(e.errno) if e.errno else str(e)
    return text[:1].lower() + text[1:]


def _mkdir_all(path: str, mode: int) -> tuple[str, str] | None:
    """Go's os.MkdirAll: *path* and its missing parents made with *mode* (less the umask);
    on failure, the path it failed at and Go's text for why."""
    try:
        st = os.stat(path)
    except OSError:
        parent = os.path.dirname(path.rstrip("/"))
        if parent not in ("", "/", path) and (failed := _mkdir_all(parent, mode)) is not None:
            return failed
        try:
            os.mkdir(path, mode)
        except OSError as e:
            return None if os.path.isdir(path) and not os.path.islink(path) else (path, _go_error(e))
        return None
    return None if stat.S_ISDIR(st.st_mode) else (path, _go_error(OSError(errno.ENOTDIR, "")))


def _has_entry(root: str, path: str) -> bool:
    """True when the image at *root* has an entry (of any kind) at *path*, its directories'
    links followed inside the image."""
    walked = walk(root, path, follow_last=False)
    return walked is not None and not walked[1]


def _first_per_destination(binds: list[Bind]) -> list[Bind]:
    """The user's binds less those to a destination already taken, with Apptainer's warning."""
    kept: dict[str, Bind] = {}
    for b in binds:
        if b.dst in kept:
            log.warning(
                "While bind mounting '%s:%s': destination is already in the mount point list", b.src, b.dst
            )
        else:
            kept[b.dst] = b
    return list(kept.values())


def _resolv_conf(dns: str) -> str:
    """``--dns IP[,IP]`` as a resolv.conf (only those name servers, as Apptainer writes it)."""
    import ipaddress

    lines = []
    for server in (s.strip() for s in dns.split(",")):
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise EngineError(
                f"container creation failed: dns ip {server} is not a valid IP address"
            ) from None
        lines.append(f"nameserver {server}\n")
    return "".join(lines)


#: what Apptainer takes as a host name (dot-separated labels of letters, digits and inner '-')
_LABEL = "([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOSTNAME = re.compile(rf"({_LABEL}\.)*{_LABEL}")


def _hostname_file(hostname: str) -> str:
    """``--hostname NAME`` as the container's /etc/hostname, as Apptainer writes it."""
    if not _HOSTNAME.fullmatch(hostname):
        raise EngineError(
            f"container creation failed: unable to add {hostname} to hostname file: "
            f"{hostname} is not a valid hostname"
        )
    return hostname + "\n"


def _shell_env(shell: str | None) -> dict[str, str]:
    """``shell -s PATH``: Apptainer tells the container's shell action through these variables."""
    return {"APPTAINER_SHELL": shell, "SINGULARITY_SHELL": shell} if shell else {}
