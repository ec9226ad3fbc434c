"""Bind mounts: parse ``-B src[:dst[:ro|rw]]`` and compute the default binds of a launch.

Apptainer's defaults are kept: ``$HOME``, the current directory, ``/tmp`` and ``/var/tmp`` from
the host, plus ``/etc/hosts`` and ``/etc/localtime``; ``--contain`` replaces home and the temp
directories with private empty ones and drops the current directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass

from hpcsif.errors import EngineError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bind:
    """One bind mount: host *src* at container *dst*."""

    src: str
    dst: str
    readonly: bool = False
    dev: bool = False  # a device node (bwrap --dev-bind)
    optional: bool = False  # skip silently when *src* is missing (defaults, GPU files)
    #: an image bind: the path inside the file system image *src* to bind (``image-src=``)
    image_src: str | None = None
    #: an image bind: the SIF object id of the data partition (``id=``)
    image_id: int | None = None
    #: the destination as the user wrote it (``/data/``), which APPTAINER_BIND shows inside
    given: str = dataclasses.field(default="", compare=False)


def parse_bind(spec: str) -> list[Bind]:
    """Parse one ``-B`` value (comma-separated ``src[:dst[:opts]]`` entries) into binds.

    As in Apptainer: ``\\,`` and ``\\:`` escape a comma and a colon in a path; the options
    (``ro``, ``rw``; ``ro`` wins; ``image-src=``, ``id=`` of an image bind) may be a
    comma-separated list; ``dst`` defaults to ``src`` as
    given (a relative one is refused, as there). Relative sources are made absolute.
    """
    entries: list[tuple[str, list[str]]] = []  # (the entry as given, its fields)
    for piece in re.split(r"(?<!\\),", spec):
        piece = piece.strip()
        option = piece in _BIND_OPTIONS or piece.startswith(_IMAGE_OPTIONS)
        if entries and len(entries[-1][1]) == 3 and option:
            entries[-1][1][2] += "," + piece  # one more option of the entry before
            entries[-1] = (f"{entries[-1][0]},{piece}", entries[-1][1])
        elif piece:
            fields = [f.replace("\\:", ":").replace("\\,", ",") for f in re.split(r"(?<!\\):", piece)]
            entries.append((piece, fields))
    return [_bind(fields, entry) for entry, fields in entries]


def _bare_quote(spec: str) -> int | None:
    """Where a ``"`` stands inside a field that does not start with one (Go's CSV reader, and so
    Apptainer's ``--mount``, refuses it); None if nowhere."""
    in_quotes, field_start = False, True
    for i, c in enumerate(spec):
        if in_quotes:
            in_quotes = c != '"'
        elif c == ",":
            field_start = True
        elif c == '"' and (field_start or spec[i - 1] == '"'):
            in_quotes, field_start = True, False  # a quoted field, or a doubled "" in one
        elif c == '"':
            return i
        else:
            field_start = False
    return None


#: Apptainer's bind options, and those of image binds (:mod:`hpcsif.engine.data_images`)
_BIND_OPTIONS = ("ro", "rw")
_IMAGE_OPTIONS = ("image-src=", "id=")


def _bind(fields: list[str], entry: str) -> Bind:
    """One ``src[:dst[:opts]]`` entry, already split into its fields, as a bind (Apptainer's
    lines, status 255, for what it refuses)."""

    def refuse(why: str) -> EngineError:
        return EngineError(
            f"While setting bind mount configuration: while parsing bind path: while getting bind path: {why}"
        )

    if len(fields) > 3:
        # (Apptainer's reader has taken the entry up to the third colon when it says so)
        raise refuse(f'bad bind syntax "{":".join(fields[:3])}:": should be {":".join(fields[:3])}')
    src = os.path.abspath(fields[0]) if fields[0] else ""
    dst = fields[1] if len(fields) > 1 else fields[0]
    opts = fields[2].split(",") if len(fields) > 2 else ["rw"]
    image: dict[str, str] = {}
    for opt in opts:
        if opt.startswith(_IMAGE_OPTIONS):
            key, _, image[key] = opt.partition("=")
        elif opt not in _BIND_OPTIONS:
            raise refuse(f"{opt} is not a valid bind option")
    if not src:
        raise refuse(f'empty bind source for bind path "{entry}"')
    if not dst and len(fields) == 2:
        raise unable_to_add(src, "mount point must contain a destination")
    if not dst.startswith("/"):
        raise unable_to_add(src, "destination must be an absolute path")
    return _image_bind(Bind(src, os.path.normpath(dst), readonly="ro" in opts, given=dst), image)


def _image_bind(bind: Bind, image: dict[str, str]) -> Bind:
    """*bind* made an image bind by its ``image-src``/``id`` options, if any (as in Apptainer,
    either makes one; ``image-src`` defaults to the image's root, a relative one starts there)."""
    if not image:
        return bind
    image_id = None
    if "id" in image:
        if not image["id"].isdigit():
            why = f'strconv.ParseUint: parsing "{image["id"]}": invalid syntax'
            raise EngineError(f"container creation failed: while parsing id bind option: {why}")
        image_id = int(image["id"])
    src_in_image = os.path.normpath("/" + image.get("image-src", "/").lstrip("/"))
    return dataclasses.replace(bind, image_src=src_in_image, image_id=image_id)


def unable_to_add(src: str, why: str) -> EngineError:
    """Apptainer's error for a bind it cannot list (a relative destination …)."""
    return EngineError(f"container creation failed: unable to add {src} to mount list: {why}")


def mount_failure(src: str, dst: str, why: str) -> EngineError:
    """Apptainer's error for a bind it cannot mount (*why*: the reason, as it words it)."""
    return EngineError(
        f"container creation failed: mount hook function failure: mount {src}->{dst} error: "
        f"while mounting {src}: {why}"
    )


#: --mount field names and their aliases
_MOUNT_KEYS = {
    "src": "source",
    "source": "source",
    "dst": "destination",
    "destination": "destination",
    "target": "destination",
}


def parse_mount(spec: str) -> Bind:
    """Parse one ``--mount`` value (Apptainer's Docker-style syntax) into a bind.

    ``[type=bind,]source=SRC,destination=DST[,ro|readonly]``; ``src``, ``dst`` and ``target``
    are aliases. Fields are comma-separated CSV, so a path holding a comma can be quoted
    (``"source=/a,b"``), as in Apptainer; what it refuses is its one line (status 255).
    ``image-src=`` and ``id=`` make an image bind, as in ``-B``.
    """
    import csv

    def refuse(why: str) -> EngineError:
        quoted = '"' + spec.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return EngineError(f"While setting bind mount configuration: while parsing mount {quoted}: {why}")

    if (bare := _bare_quote(spec)) is not None:
        raise refuse(
            f'error parsing mount: parse error on line 1, column {bare + 1}: bare " in non-quoted-field'
        )
    try:
        fields = next(csv.reader([spec], strict=True))
    except (csv.Error, StopIteration) as exc:
        raise refuse(f"error parsing mount: {exc}") from None
    found: dict[str, str] = {}
    image: dict[str, str] = {}
    readonly = False
    for item in fields:
        key, _, value = item.partition("=")
        if key in ("ro", "readonly"):
            readonly = True  # (whatever its value, as in Apptainer)
        elif key == "type":
            if value != "bind":
                raise refuse(f"unsupported mount type \"{value}\", only 'bind' is supported")
        elif key in _MOUNT_KEYS:
            if not value:
                raise refuse(f"mount {_MOUNT_KEYS[key]} cannot be empty")
            found[_MOUNT_KEYS[key]] = value
        elif f"{key}=" in _IMAGE_OPTIONS:
            image[key] = value
        elif key == "bind-propagation":
            why = "not supported for individual mounts, check apptainer.conf for global setting"
            raise refuse(f"bind-propagation {why}")
        else:
            raise refuse(f'invalid key "{key}" in mount specification')
    if not found.get("source") or not found.get("destination"):
        raise refuse("mounts must specify a source and a destination")
    src = os.path.abspath(found["source"])
    if not found["destination"].startswith("/"):
        raise unable_to_add(src, "destination must be an absolute path")
    dst = found["destination"]
    return _image_bind(Bind(src, os.path.normpath(dst), readonly=readonly, given=dst), image)


def check_sources(binds: list[Bind]) -> list[Bind]:
    """Binds whose source exists; a missing required source raises :class:`EngineError`."""
    kept = []
    for b in binds:
        try:
            os.stat(b.src)
        except OSError as exc:
            if not b.optional:
                # (Apptainer's warning, in Go's words for the error, then its FATAL line)
                why = (exc.strerror or str(exc)).lower()
                log.warning("skipping mount of %s: stat %s: %s", b.src, b.src, why)
                raise mount_failure(b.src, b.dst, f"mount source {b.src} doesn't exist") from None
            continue
        kept.append(b)
    return kept


def parse_home(spec: str | None, default_home: str) -> tuple[str, str]:
    """``--home SRC[:DST]`` → (host source, container home); default: the user's home twice.

    A third field, or a relative *DST*, is refused in one line, as Apptainer refuses them; so is
    a relative *SRC* without *DST*, which Apptainer takes as the container's home as given.
    """
    if not spec:
        return default_home, default_home
    fields = spec.split(":")
    if len(fields) > 2:
        raise UsageError(f"--home {spec}: home argument has incorrect number of elements: {len(fields)}")
    src = os.path.abspath(os.path.expanduser(fields[0]))
    dst = fields[1] if len(fields) > 1 and fields[1] else fields[0]
    if not dst.startswith("/"):
        raise UsageError(f"--home {spec}: the container's home {dst} is not an absolute path")
    return src, os.path.normpath(dst)


#: what ``--no-mount`` names, besides a destination path (Apptainer's ``hostfs``/``devpts``
#: are off here anyway; ``sys`` and ``dev`` leave the image's own directory); ``proc`` is always
#: mounted by this engine
NO_MOUNT = ("home", "tmp", "cwd", "bind-paths", "hostfs", "devpts", "sys", "dev")


def default_binds(
    home_src: str,
    home_dst: str,
    *,
    contain: bool,
    no_home: bool,
    home_given: bool,
    cwd: str | None,
    no_mount: list[str] | tuple[str, ...] = (),
    cwd_dst: str | None = None,
) -> list[Bind]:
    """Apptainer's default host binds (see module docstring); *cwd* None: do not bind it, else
    it is bound at *cwd_dst* (default: *cwd*; the name ``$PWD`` gives it, see :func:`logical_cwd`).

    Under ``--contain`` the home directory is bound only when ``--home`` named one (*home_given*).
    *no_mount* (``--no-mount``) leaves out ``home`` (named by ``--home`` too, as there), ``tmp``,
    ``cwd``, ``bind-paths`` (``/etc/hosts``, ``/etc/localtime``) or a destination path.
    """
    binds = []
    if "bind-paths" not in no_mount:
        binds += [
            Bind("/etc/hosts", "/etc/hosts", readonly=True, optional=True),
            Bind("/etc/localtime", "/etc/localtime", readonly=True, optional=True),
        ]
    if not contain and "tmp" not in no_mount:
        binds += [Bind("/tmp", "/tmp", optional=True), Bind("/var/tmp", "/var/tmp", optional=True)]
    if not no_home and "home" not in no_mount and (home_given or not contain):
        binds.append(Bind(home_src, home_dst, optional=not home_given))
    if cwd and not contain and "cwd" not in no_mount:
        binds.append(Bind(cwd, cwd_dst or cwd, optional=True))
    return [b for b in binds if b.dst not in no_mount]


#: directories of the operating system that Apptainer never binds as the current directory
_SYSTEM_DIRS = ("/", "/etc", "/bin", "/mnt", "/usr", "/var", "/opt", "/sbin", "/lib", "/lib64")
_VIRTUAL_DIRS = ("/sys", "/proc", "/dev")


def cwd_shown(cwd: str, dst: str, binds: list[Bind]) -> str | None:
    """Why the current directory *cwd* (the host's, resolved) needs no bind at *dst*, as
    Apptainer decides after its other mounts: ``"mounted"`` where one of *binds* (the home
    directory, a ``-B``) has *dst* as its destination (that bind is what the container shows
    there), ``"visible"`` where the deepest bind above *dst* already shows *cwd* itself (the
    host's /tmp; a read-only ``-B`` stays read-only there); None: bind it."""
    above = [b for b in binds if b.image_src is None and (dst + "/").startswith(b.dst.rstrip("/") + "/")]
    if not above:
        return None
    deepest = max(reversed(above), key=lambda b: len(b.dst.rstrip("/")))  # (the later of equals)
    try:
        inside = os.path.normpath(os.path.join(deepest.src, os.path.relpath(dst, deepest.dst)))
        if os.path.samestat(os.stat(inside), os.stat(cwd)):
            return "visible"
    except (OSError, ValueError):
        pass
    return "mounted" if deepest.dst.rstrip("/") == dst.rstrip("/") else None


def logical_cwd(cwd: str) -> str:
    """``$PWD`` where it names the current directory *cwd* (resolved) through links, else *cwd*:
    as Apptainer takes the working directory (Go's ``os.Getwd``), a ``/scratch/me`` that is a
    link on the host to ``/lustre/scratch/me`` is bound and entered as ``/scratch/me``."""
    given = os.environ.get("PWD", "")
    if given.startswith("/") and os.path.normpath(given) != cwd and os.path.realpath(given) == cwd:
        return os.path.normpath(given)
    return cwd


def system_directory(cwd: str) -> str | None:
    """The name of the current directory *cwd* (resolved) when Apptainer does not bind it: one
    of the operating system's top directories (the host's would replace the image's), or inside
    ``/sys``, ``/proc`` or ``/dev`` (the container has its own). That is ``$PWD`` where it names
    *cwd* through a link (``/bin`` for ``/usr/bin``): the container starts in its own directory
    of that name. None: *cwd* is bound as usual.
    """
    names = list(dict.fromkeys([logical_cwd(cwd), cwd]))
    for name in names:
        if name in _SYSTEM_DIRS or any(name == v or name.startswith(v + "/") for v in _VIRTUAL_DIRS):
            return names[0]
    return None
