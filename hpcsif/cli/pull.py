"""``hpcsif pull`` and ``hpcsif push``: images from registries, daemons and URLs to local files.

``pull docker://…`` (and docker-daemon://, oci-archive:// …) converts to a SIF through the
shared blob cache; ``pull oras://…`` fetches a SIF artifact; ``pull http(s)://…`` and other
fsspec URLs copy the file as it is. ``push SIF oras://…`` uploads a SIF as Apptainer does.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from hpcsif.cli.envflags import flags_from_env

if TYPE_CHECKING:
    from typing import NoReturn

log = logging.getLogger("hpcsif")

COPY_TRANSPORTS = ("http", "https", "fsspec")


def refuse(flag: str, why: str) -> NoReturn:
    """Fail with Apptainer's one-line ``FATAL:`` for a flag hpcsif accepts but cannot honour."""
    from hpcsif.errors import UsageError

    raise UsageError(f"{flag} is not supported by hpcsif: {why}")


LIBRARY_WHY = "there is no library:// (Sylabs Cloud Library) client; use docker:// or oras:// references"


#: APPTAINER_* names of the registry flags (Apptainer's EnvKeys; DOCKER_HOST is read by the source)
REGISTRY_ENV = {"nohttps": ("NOHTTPS", "NO_HTTPS")}


def add_registry_flags(p: argparse.ArgumentParser, *, library_help: str = "container Library URL") -> None:
    """Flags for talking to registries (shared by pull, push and build)."""
    p.add_argument("--docker-login", action="store_true", help="prompt for a registry user name and password")
    p.add_argument(
        "--nohttps", "--no-https", action="store_true", dest="nohttps", help="use plain HTTP for the registry"
    )
    p.add_argument(
        "--authfile",
        metavar="FILE",
        help="Docker-style auth file (config.json) to read registry credentials from, "
        "instead of ~/.docker/config.json ($APPTAINER_AUTH_FILE)",
    )
    p.add_argument(
        "--docker-host", metavar="HOST", help="Docker daemon for docker-daemon:// (default $DOCKER_HOST)"
    )
    p.add_argument("--library", metavar="URL", help=f"{library_help}: not supported (no library:// client)")
    # Apptainer's hidden flags (and $DOCKER_USERNAME/$DOCKER_PASSWORD) for non-interactive credentials
    p.add_argument("--docker-username", help=argparse.SUPPRESS)
    p.add_argument("--docker-password", help=argparse.SUPPRESS)


def registry_options(args: argparse.Namespace) -> dict[str, object]:
    """``source_options`` for registry sources from the flags (prompts for --docker-login)."""
    from hpcsif.sources.credentials import Credentials

    if getattr(args, "library", None):
        refuse("--library", LIBRARY_WHY)
    flags_from_env(args, REGISTRY_ENV)
    opts: dict[str, object] = {"insecure": bool(getattr(args, "nohttps", False))}
    if getattr(args, "docker_login", False):
        opts["credentials"] = prompt_credentials()
    elif getattr(args, "docker_username", None):
        opts["credentials"] = Credentials(
            args.docker_username, args.docker_password or "", "--docker-username"
        )
    if getattr(args, "authfile", None):
        opts["authfile"] = args.authfile
    if getattr(args, "docker_host", None):
        opts["docker_host"] = args.docker_host
    return opts


def oras_options(args: argparse.Namespace) -> dict[str, object]:
    """The :func:`registry_options` that oras:// pushes and pulls take (no daemon there)."""
    from hpcsif.sources import oras

    return oras.oras_options(registry_options(args))


def prompt_credentials():  # -> Credentials
    """Ask for a user name and (unechoed) password on the terminal, as Apptainer does."""
    import getpass

    from hpcsif.errors import UsageError
    from hpcsif.sources.credentials import Credentials

    try:
        sys.stderr.write("Enter Docker Username: ")
        sys.stderr.flush()
        user = sys.stdin.readline().strip()
        if sys.stdin.isatty():
            password = getpass.getpass("Enter Docker Password: ", stream=sys.stderr)
        else:  # piped in, as Apptainer reads it (getpass would warn that it cannot hide it)
            sys.stderr.write("Enter Docker Password: \n")
            password = sys.stdin.readline().removesuffix("\n")
    except (EOFError, OSError):
        raise UsageError("--docker-login needs a terminal or credentials on stdin") from None
    if not user:
        raise UsageError("--docker-login: no user name given")
    return Credentials(user, password, "--docker-login")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``pull`` and ``push`` commands."""
    from hpcsif.cli.build import add_convert_flags

    p = sub.add_parser("pull", help="pull an image from a registry or URL into a local SIF file")
    p.add_argument("--name", help="name of the file to write (default: <repo>_<tag>.sif)")
    p.add_argument("--dir", help="directory to write the file in (default: the current directory)")
    p.add_argument("--sandbox", action="store_true", help="write a writable directory tree instead of a SIF")
    add_convert_flags(p)
    add_registry_flags(p, library_help="download images from the provided library")
    p.add_argument(
        "--no-cleanup",
        action="store_true",
        help="accepted (Apptainer keeps a failed build's bundle; a pull here leaves no bundle)",
    )
    # deprecated in Apptainer 1.4 (only library:// pulls check signatures): accepted, no effect
    p.add_argument("-U", "--allow-unsigned", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--allow-unauthenticated", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "args", nargs="+", metavar="[OUTPUT] URI", help="docker://, oras://, https://, … reference"
    )
    p.set_defaults(func=run_pull)

    q = sub.add_parser("push", help="upload a SIF file to an oras:// registry reference")
    add_registry_flags(q, library_help="the library to push to")
    q.add_argument(
        "-U",
        "--allow-unsigned",
        action="store_true",
        help="accepted: as in Apptainer, only library:// pushes require a signature, oras:// never",
    )
    q.add_argument(
        "-D", "--description", help="description for the image (library:// only; ignored for oras://)"
    )
    q.add_argument("sif", help="SIF file to upload")
    q.add_argument("uri", help="oras://registry/repository:tag")
    q.set_defaults(func=run_push)


def _target(args: argparse.Namespace, ref) -> tuple[Path, str]:  # ref: Reference
    """The output path, and how Apptainer names it in messages: as typed, or joined to --dir."""
    from hpcsif.errors import UsageError

    if len(args.args) == 2 and args.name:
        raise UsageError("give the output name either as --name or as an argument, not both")
    name = args.name or (args.args[0] if len(args.args) == 2 else None)
    if not name:
        if ref.transport in COPY_TRANSPORTS:
            from urllib.parse import urlsplit

            # the URL's path, not its host: https://host/ has none to name the file after
            name = os.path.basename(urlsplit(ref.path).path.rstrip("/")) or "download"
        else:
            name = ref.short_name() + ".sif"
    target = Path(name)
    if args.dir and not target.is_absolute():
        target = Path(args.dir) / target
        name = os.path.normpath(os.path.join(args.dir, name))
    return target, name


def _check_target(target: Path, shown: str, force: bool, sandbox: bool = False) -> None:
    from hpcsif.cli.build import check_parent
    from hpcsif.errors import BuildError

    check_parent(target)
    if (target.exists() or target.is_symlink()) and not force:
        raise BuildError(f'Image file already exists: "{shown}" - will not overwrite')
    if target.is_dir() and not sandbox:
        raise BuildError(f"{target} is a directory")


def _sif_then_sandbox(ref, target: Path, args: argparse.Namespace, progress) -> None:  # ref: Reference
    """``pull --sandbox`` of a SIF source (oras://, https://): fetch it aside, then unpack it,
    with Apptainer's INFO lines for both."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=".hpcsif-pull-", dir=target.resolve().parent) as tmp:
        sif = Path(tmp) / "image.sif"
        if ref.transport == "oras":
            with oras_sif(ref, args, sif) as cached:
                _sandbox_from(cached, target, args)
            return
        from hpcsif.sources.remote import download

        info(args, "Downloading network image")
        download(ref.path or ref.raw, sif, progress=progress)
        _sandbox_from(sif, target, args)


def _convert_then_sandbox(ref, target: Path, args: argparse.Namespace, progress) -> None:  # ref: Reference
    """``pull --sandbox`` of an image to convert: to a SIF through the cache (or a temporary one
    with ``--disable-cache``), then unpacked, with the INFO lines of both builds, as Apptainer."""
    import tempfile

    from hpcsif.cli.build import blob_store, convert_options

    options = convert_options(args)
    notices = Notices(args, to_sandbox=False)
    source_options = {**registry_options(args), "progress": progress, "notify": notices}
    store = blob_store(args)
    with tempfile.TemporaryDirectory(prefix=".hpcsif-pull-", dir=target.resolve().parent) as tmp:
        with arch_warning_when_made(sif=True):  # the SIF the sandbox is made from
            if store is None:
                from hpcsif.convert import convert_ref

                sif = convert_ref(
                    ref, Path(tmp) / "image.sif", options=options, source_options=source_options
                )
            else:
                from hpcsif.cache.api import ensure_image

                sif = ensure_image(ref.raw, options=options, source_options=source_options, refresh=True)
            notices.done()
        _sandbox_from(sif, target, args)


def _sandbox_from(sif: Path, target: Path, args: argparse.Namespace) -> None:
    """Unpack ``sif`` into the sandbox ``target``, saying the steps of Apptainer's local build
    (but its "Verifying bootstrap image PATH", whose path names a file of Apptainer's cache)."""
    from hpcsif.cli.build import replacing
    from hpcsif.convert import sif_to_sandbox

    info(args, "Starting build...")
    info(args, "Extracting local image...")
    with replacing(target, sandbox=True) as where:  # --force over a file: swapped in once unpacked
        sif_to_sandbox(sif, where)
    info(args, "Creating sandbox directory...")


#: Apptainer's APPTAINER_* names of pull's flags
PULL_ENV = {
    "arch": ("PULL_ARCH",),
    "arch_variant": ("PULL_ARCH_VARIANT",),
    "dir": ("PULLDIR", "PULLFOLDER"),
    "name": ("PULL_NAME",),
    "sandbox": ("SANDBOX",),
    "no_cleanup": ("NO_CLEANUP",),
}


def run_pull(args: argparse.Namespace) -> int:
    """Pull ``URI`` to the output file (or, with ``--sandbox``, a directory)."""
    from hpcsif.cli.build import blob_store, convert_options
    from hpcsif.cli.progress import progress_bar
    from hpcsif.refs import parse

    flags_from_env(args, PULL_ENV)
    if len(args.args) > 2:  # before the URI is looked at: the last of three words need not be one
        from hpcsif.errors import UsageError

        raise UsageError("pull takes at most two arguments: [OUTPUT] URI")
    ref = parse(args.args[-1])
    if ref.transport in ("sif", "sandbox"):  # before the target: `pull x.sif` names no image to pull
        from hpcsif.errors import UsageError

        raise UsageError(f"{ref.raw} is a local image; pull needs a URI (docker://, oras://, https:// …)")
    target, shown = _target(args, ref)
    _check_target(target, shown, args.force, args.sandbox)
    progress = progress_bar(not (args.quiet or args.silent))
    if args.sandbox and ref.transport in (*COPY_TRANSPORTS, "oras"):
        _sif_then_sandbox(ref, target, args, progress)
    elif args.sandbox:
        _convert_then_sandbox(ref, target, args, progress)
    if args.sandbox:  # Apptainer builds the sandbox from its SIF, with its build's last line
        info(args, f"Build complete: {target}")
    elif ref.transport in COPY_TRANSPORTS:
        from hpcsif.sources.remote import download

        info(args, "Downloading network image")
        download(ref.path or ref.raw, target, progress=progress)
    elif ref.transport == "oras":
        _pull_oras(ref, target, args)
    else:
        options = convert_options(args)
        notices = Notices(args)
        source_options = {**registry_options(args), "progress": progress, "notify": notices}
        store = blob_store(args)
        if store is None:  # --disable-cache: convert straight to the target through temporary blobs
            from hpcsif.convert import convert_ref
            from hpcsif.sources.remote import umasked

            with arch_warning_when_made(sif=True):
                convert_ref(ref, target, options=options, source_options=source_options, progress=progress)
                notices.done()
            os.chmod(target, umasked(0o777))  # the SIF writer's 0755, narrowed as the umask asks
        else:
            # through the SIF cache, so that a later `exec docker://…` of the same image converts nothing
            from hpcsif.cache.api import ensure_image

            # refresh: as Apptainer's, a pull asks what the tag names now, even within cache.tag_ttl
            with arch_warning_when_made(sif=True):
                cached = ensure_image(ref.raw, options=options, source_options=source_options, refresh=True)
                notices.done()
            _copy_out(cached, target)
    log.info("Pulled %s to %s", ref.raw, target)
    return 0


def info(args: argparse.Namespace, message: str) -> None:
    """One of the ``INFO:`` lines Apptainer prints at its default verbosity (on stderr; not with -q/-s)."""
    if not (args.quiet or args.silent):
        print(f"INFO:    {message}", file=sys.stderr, flush=True)


#: Apptainer's build steps, announced with "Converting OCI blobs to SIF format" (the fetch
#: starts) and when the conversion is done
CONVERTING = "Converting OCI blobs to SIF format"
FETCH_STEPS = ("Starting build...", "Fetching OCI image...")
BUILD_STEPS = ("Extracting OCI image...", "Inserting Apptainer configuration...", "Creating SIF file...")


class Notices:
    """Apptainer's INFO lines for an image from a URI, as a ``notify`` source option: the
    conversion's ("Converting OCI blobs to SIF format" and its build steps) or, when nothing
    was said, a cache hit's. ``build`` gives ``build``'s lines: the steps without the
    "Converting" line, and the sandbox's last step where ``--sandbox`` asks for one.
    """

    def __init__(
        self, args: argparse.Namespace, *, build: bool = False, to_sandbox: bool | None = None
    ) -> None:
        self.args = args
        self.build = build
        #: whether the conversion's last step makes a sandbox (default: ``--sandbox``)
        self.to_sandbox = getattr(args, "sandbox", False) if to_sandbox is None else to_sandbox
        self.said: list[str] = []

    def __call__(self, message: str) -> None:
        self.said.append(message)
        if message != CONVERTING:
            info(self.args, message)
            return
        for line in FETCH_STEPS if self.build else (message, *FETCH_STEPS):
            info(self.args, line)

    def done(self) -> None:
        """The conversion's last steps, or "Using cached SIF image" where nothing was announced."""
        if CONVERTING in self.said:
            last = "Creating sandbox directory..." if self.to_sandbox else BUILD_STEPS[-1]
            for line in (*BUILD_STEPS[:-1], last):
                info(self.args, line)
        elif not self.said:
            info(self.args, "Using cached SIF image")


@contextlib.contextmanager
def arch_warning_when_made(sif: bool) -> Iterator[None]:
    """Apptainer warns that an image is not of the architecture ``--arch`` asked for as it
    writes the SIF, after its "Creating SIF file..." line, and never for a sandbox; the
    conversion here says so as soon as it sees the image. Its warning is held while the block
    runs, then said where *sif*, else dropped (and dropped if the block fails)."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.getMessage().startswith("Architecture "):
            held.append(record)
            return False
        return True

    handlers = list(log.handlers)
    for handler in handlers:
        handler.addFilter(hold)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(hold)
    if sif:
        for record in held:
            log.handle(record)


def _copy_out(cached: Path, target: Path) -> None:
    """Copy a cached SIF to ``target`` atomically (a copy, so editing it never touches the cache).

    ``copy_file_range`` lets the kernel copy (or reflink, on XFS/btrfs) without a trip through
    Python; where it is refused, a plain copy follows.
    """
    import shutil

    from hpcsif.sources.remote import atomic_output, umasked

    log.info("Copying %s to %s", cached, target)
    with atomic_output(target, umasked(0o777)) as out, open(cached, "rb") as src:
        size, done = os.fstat(src.fileno()).st_size, 0
        try:
            while done < size and (n := os.copy_file_range(src.fileno(), out.fileno(), size - done)):
                done += n
        except OSError:
            src.seek(done)
            out.seek(done)
            shutil.copyfileobj(src, out, 1 << 20)


@contextlib.contextmanager
def oras_sif(ref, args: argparse.Namespace, aside: Path) -> Iterator[Path]:  # ref: Reference
    """The SIF ``oras://…`` names, while it is read: in the SIF cache (an ``oras`` entry keyed on
    the SIF's digest, as Apptainer's oras cache, leased), or, with the cache disabled, downloaded
    to ``aside``."""
    from hpcsif.cache.api import downloaded_sif
    from hpcsif.cli.build import blob_store, convert_options

    notices = Notices(args)
    # --arch: the platform picked from a multi-arch artifact (any name: Apptainer checks none)
    options = convert_options(args, arch_checked=False)
    source_options = {**oras_options(args), "platform": options.platform, "notify": notices}
    cached = blob_store(args) is not None
    with downloaded_sif(ref.raw, source_options, aside=None if cached else aside, options=options) as sif:
        if cached:
            notices.done()  # "Using cached SIF image" where nothing was downloaded
        yield sif


def _pull_oras(ref, target: Path, args: argparse.Namespace) -> None:  # ref: Reference
    with oras_sif(ref, args, target) as sif:
        if sif != target:
            _copy_out(sif, target)


def run_push(args: argparse.Namespace) -> int:
    """Push a SIF to ``oras://…``."""
    from hpcsif.errors import UsageError
    from hpcsif.refs import parse
    from hpcsif.sources.oras import push_sif

    ref = parse(args.uri)
    if ref.transport != "oras":
        raise UsageError(f"{args.uri}: push supports oras:// references only")
    flags_from_env(args, {"allow_unsigned": ("ALLOW_UNSIGNED",)})
    if args.description:  # Apptainer's own warning for oras://
        log.warning("Description is not supported for push to oras. Ignoring it.")
    digest = push_sif(args.sif, ref, **oras_options(args))  # type: ignore[arg-type]
    info(args, f"Upload complete: {ref} ({digest})")  # on stderr, as Apptainer's
    return 0
