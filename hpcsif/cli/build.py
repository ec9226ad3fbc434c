"""``hpcsif build``: convert any source (or a definition file) to a SIF or a sandbox."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from hpcsif.cli.envflags import flags_from_env
from hpcsif.cli.pull import add_registry_flags, arch_warning_when_made, refuse, registry_options

log = logging.getLogger("hpcsif")


def add_convert_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``build`` and ``pull`` that shape the produced SIF."""
    p.add_argument(
        "--compression",
        choices=("zstd", "gzip", "lz4", "xz"),
        help="squashfs compression (default zstd level 3; gzip for old kernels)",
    )
    p.add_argument("--compression-level", type=int, dest="level", help="compressor level")
    p.add_argument("--arch", help="architecture to pick from a multi-arch image (e.g. arm64)")
    p.add_argument(
        "--arch-variant", metavar="VARIANT", help="architecture variant to pick (e.g. 7 for arm/v7)"
    )
    p.add_argument("--tmpdir", help="directory for temporary files (default: next to the output)")
    p.add_argument("-F", "--force", action="store_true", help="overwrite an existing target")
    p.add_argument("--disable-cache", action="store_true", help="use no blob cache (a temporary one)")


#: the ``--arch`` values Apptainer's pull and build take, and the variants of those that have them
ARCHS = ("arm", "arm64", "amd64", "386", "ppc64le", "s390x", "riscv64")
_VARIANTS = {"arm": ("5", "6", "7"), "arm64": ("8",)}
_SET_VARIANT = "please set --arch-variant option"


def check_arch(arch: str, variant: str) -> str:
    """Apptainer's check of ``--arch``/``--arch-variant`` (before anything is fetched): a
    mistyped architecture is refused, not built for as a label; arm needs its variant
    (or ``$GOARM``), arm64's can only be 8. Returns the variant (``$GOARM``'s for arm)."""
    from hpcsif.errors import BuildError

    def bad(why: str) -> NoReturn:
        raise BuildError(f"While processing the arch and arch variant: arch: {why}")

    known = f"supported archs are: [{' '.join(ARCHS)}]"
    if arch not in _VARIANTS:
        if arch not in ARCHS:
            bad(f"{arch} is not valid, {known}")
        return variant  # a variant of another architecture is ignored, as there
    if arch == "arm" and not variant:
        variant = os.environ.get("GOARM", "")
        if not variant:
            bad("arm needs variant specification, supported variants are [5, 6, 7], " + _SET_VARIANT)
    if variant and variant.removeprefix("v") not in _VARIANTS[arch]:
        name = f"{'arm32' if arch == 'arm' else arch}v{variant.removeprefix('v')}"
        wanted = ", ".join(_VARIANTS[arch])
        tail = ", please remove --arch-variant option" if arch == "arm64" else ""
        bad(f"{name} is not valid, {known}, supported variants are [{wanted}]{tail}")
    return variant


def convert_options(args: argparse.Namespace, *, arch_checked: bool = True):  # -> ConvertOptions
    """ConvertOptions from flags layered over the configuration; a temporary directory
    (``--tmpdir``, ``APPTAINER_TMPDIR`` …) that is none is Apptainer's one line (it named a
    temporary file of ours). ``arch_checked``: ``--arch`` is checked as Apptainer checks it
    for images it converts (not for the SIFs of ``oras://``)."""
    from hpcsif.convert import ConvertOptions
    from hpcsif.errors import BuildError

    variant = args.arch_variant
    if args.arch and arch_checked:
        variant = check_arch(args.arch, variant or "") or None
    options = ConvertOptions.from_config(
        compression=args.compression,
        level=args.level,
        tmpdir=Path(args.tmpdir) if args.tmpdir else None,
        arch=args.arch,
        variant=variant,
        jobs=getattr(args, "jobs", None),  # --mksquashfs-args -processors N
    )
    if options.tmpdir and not options.tmpdir.is_dir():
        why = "not a directory" if options.tmpdir.exists() else "no such file or directory"
        where = f"stat {options.tmpdir}: {why}"
        raise BuildError(f"Unable to create build: failed to create build parent dir: {where}")
    return options


def check_target(target: Path, *, force: bool, sandbox: bool, update: bool = False) -> None:
    """Apptainer's checks of a build target (its words, in its order), then that we can write there.

    An existing target is refused unless forced (``--update`` runs over an existing sandbox); a
    non-empty directory that does not look like a sandbox gets Apptainer's own warning. The old
    target goes only once the new one is ready.
    """
    from hpcsif.errors import BuildError

    def refuse(why: str) -> NoReturn:
        raise BuildError(f"While checking build target: {why}")

    abspath = os.path.abspath(target)
    if update and not sandbox:
        refuse("only sandbox update is supported: --sandbox flag is missing")
    try:
        is_dir: bool | None = stat.S_ISDIR(os.stat(target).st_mode)
    except OSError:
        is_dir = None
    if is_dir is None and update:
        refuse(f"could not update sandbox {abspath}: doesn't exist")
    if update and not is_dir:
        refuse(f"only sandbox update is supported: {abspath} is not a directory")
    if is_dir and not force:
        try:
            names = set(os.listdir(target))
        except OSError as exc:
            refuse(f"could not read sandbox directory {abspath}: {exc.strerror.lower()}")
        if names and len(names & {".singularity.d", "dev", "proc", "sys"}) != 4:
            refuse(
                f"{abspath} is not empty and is not an Apptainer sandbox, check its content first "
                "and use --force if you want to overwrite it"
            )
    if update:
        return
    # a dangling link counts too: it is not ours to replace unasked
    if (is_dir is not None or target.is_symlink()) and not force:
        name = os.path.basename(abspath)  # Apptainer names the file, not the path
        if not sys.stdin.isatty():
            refuse(f"build target '{name}' already exists. Use --force if you want to overwrite it")
        # on a terminal Apptainer asks, in words that depend on what would be overwritten
        question = (
            f"Build target '{name}' already exists and will be deleted during the build process. "
            "Do you want to continue? [y/N] "
            if is_dir or _is_image_file(target)
            else f"Build target '{name}' may be a definition file or a text/binary file that will be "
            "overwritten. Do you still want to overwrite it? [y/N] "
        )
        print(question, end="", flush=True)
        answer = sys.stdin.readline().rstrip("\n").lower()
        if answer not in ("y", "yes", "n", "no", ""):
            refuse(f"while reading the input: invalid answer: {json.dumps(answer, ensure_ascii=False)}")
        if answer not in ("y", "yes"):
            refuse("stopping build")
    check_parent(target)


def check_parent(target: Path) -> None:
    """That ``target`` can be written: its directory exists (as one) and lets us in, checked
    before any download or conversion, which would otherwise fail only at the end."""
    from hpcsif.errors import BuildError

    parent = target.parent
    if not parent.is_dir():
        why = f"{parent} is not a directory" if parent.exists() else f"directory {parent} does not exist"
        raise BuildError(f"cannot write {target}: {why}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildError(f"cannot write {target}: permission denied in directory {parent}")


def _is_image_file(path: Path) -> bool:
    """Whether ``path`` starts as a SIF (after its launch line) or a bare squashfs image does."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head[32:41] == b"SIF_MAGIC" or head[:4] == b"hsqs"


@contextlib.contextmanager
def replacing(target: Path, sandbox: bool) -> Iterator[Path]:
    """Where to build ``target``: itself, or beside it when ``--force`` replaces another kind of
    file (a directory where a SIF goes, a file or link where a sandbox goes), swapped in once the
    build is complete, as Apptainer replaces it. A failed build leaves the old one in place.
    """
    try:
        was_dir = stat.S_ISDIR(os.lstat(target).st_mode)
    except FileNotFoundError:
        was_dir = sandbox
    if was_dir == sandbox:  # the writers replace a target of their own kind themselves
        yield target
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield aside / "new"
        os.rename(target, aside / "old")
        try:
            os.rename(aside / "new", target)
        except OSError:
            os.rename(aside / "old", target)
            raise
    finally:
        from hpcsif.convert import remove_tree

        remove_tree(aside)  # the old sandbox may hold chmod 000 directories


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``build`` command."""
    p = sub.add_parser("build", help="build a SIF image or sandbox from a source or definition file")
    p.add_argument(
        "-s", "--sandbox", action="store_true", help="build a writable directory tree instead of a SIF"
    )
    p.add_argument("-T", "--notest", action="store_true", help="skip the %%test section")
    p.add_argument(
        "-u",
        "--update",
        action="store_true",
        help="with -s: run the definition over an existing sandbox target (skips the bootstrap)",
    )
    p.add_argument(
        "--section",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="only run these sections (setup, post, files, environment, test, labels, none; default all)",
    )
    # accepted for Apptainer users' scripts: converting OCI/Docker layers always does what it asks
    # (hpcsif/image/layers.py makes every file readable and every directory traversable)
    p.add_argument("--fix-perms", action="store_true", help="always on for OCI/Docker sources")
    p.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="value for {{ KEY }} in a definition file (overrides %%arguments)",
    )
    p.add_argument("--build-arg-file", metavar="FILE", help="file of KEY=VALUE lines, as --build-arg")
    p.add_argument(
        "--warn-unused-build-args",
        action="store_true",
        help="warn instead of failing when a --build-arg names no {{ KEY }} of the definition",
    )
    p.add_argument(
        "-f",
        "--fakeroot",
        action="store_true",
        help="run %%post and %%test as fake root in a user namespace, also when root builds",
    )
    p.add_argument("--userns", action="store_true", help="accepted: builds always use a user namespace")
    for hidden in ("--ignore-subuid", "--ignore-fakeroot-command", "--ignore-userns", "--remote"):
        p.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "-B",
        "--bind",
        action="append",
        default=[],
        metavar="SRC[:DEST[:ro|rw]]",
        help="bind a host path during %%post and %%test",
    )
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SPEC",
        help="a mount during %%post and %%test: type=bind,source=SRC,destination=DEST[,ro]",
    )
    p.add_argument(
        "--writable-tmpfs",
        action="store_true",
        help="%%test may write to the image; the changes are thrown away",
    )
    p.add_argument(
        "--nv", action="store_true", help="bind host NVIDIA devices and libraries for %%post and %%test"
    )
    p.add_argument(
        "--rocm", action="store_true", help="bind host ROCm devices and libraries for %%post and %%test"
    )
    p.add_argument(
        "--nvccli", action="store_true", help="as --nv (libraries are listed by nvidia-container-cli)"
    )
    p.add_argument(
        "--no-cleanup",
        action="store_true",
        help="keep the build directory after a failed build and say where it is",
    )
    p.add_argument(
        "--mksquashfs-args",
        metavar="ARGS",
        help="mksquashfs options: -comp CODEC, -Xcompression-level N and -processors N are understood",
    )
    p.add_argument("--json", action="store_true", help="not supported (JSON build definitions)")
    p.add_argument("-e", "--encrypt", action="store_true", help="not supported (encrypted images)")
    p.add_argument("--passphrase", action="store_true", help="not supported (encrypted images)")
    p.add_argument("--pem-path", metavar="PATH", help="not supported (encrypted images)")
    add_convert_flags(p)
    add_registry_flags(p)
    p.add_argument("target", help="SIF file or sandbox directory to create")
    p.add_argument("source", help="docker://, oci://, oci-archive://, docker-archive://, SIF, sandbox, .def")
    p.set_defaults(func=run)


#: Apptainer's APPTAINER_* names of build's flags
BUILD_ENV = {
    "sandbox": ("SANDBOX",),
    "notest": ("NOTEST",),
    "update": ("UPDATE",),
    "section": ("SECTION",),
    "fakeroot": ("FAKEROOT",),
    "userns": ("USERNS",),
    "no_cleanup": ("NO_CLEANUP",),
    "writable_tmpfs": ("WRITABLE_TMPFS",),
    "nvccli": ("NVCCLI",),
    # Apptainer hands these on to the exec that runs %post and %test
    "nv": ("NV",),
    "rocm": ("ROCM",),
    "bind": ("BINDPATH",),
    "arch": ("BUILD_ARCH",),
    "arch_variant": ("BUILD_ARCH_VARIANT",),
    "mksquashfs_args": ("MKSQUASHFS_ARGS",),
    "mount": ("MOUNT",),
    "json": ("JSON",),
}
ENCRYPT_WHY = (
    "hpcsif cannot build or run encrypted (LUKS) images; keep the SIF on a private file system instead"
)
#: ``--mksquashfs-args`` options that map onto the squashfs writer's settings
_SQUASH_OPTS = {"-comp": "compression", "-Xcompression-level": "level", "-processors": "jobs"}


def _refuse_unsupported(args: argparse.Namespace) -> None:
    if args.json:
        refuse("--json", "JSON build definitions are not implemented; write a definition file")
    for flag, given in (
        ("--encrypt", args.encrypt),
        ("--passphrase", args.passphrase),
        ("--pem-path", args.pem_path),
    ):
        if given:
            refuse(flag, ENCRYPT_WHY)


def _mksquashfs_options(text: str) -> dict[str, object]:
    """``--mksquashfs-args`` as ConvertOptions fields; anything else is refused in one line."""
    import shlex

    words, found = shlex.split(text), {}
    while words:
        word = words.pop(0)
        if word not in _SQUASH_OPTS or not words:
            refuse(
                f"--mksquashfs-args {word!r}",
                f"only {', '.join(_SQUASH_OPTS)} (with a value) map onto hpcsif's squashfs writer "
                "(see also --compression, --compression-level)",
            )
        value = words.pop(0)
        found[_SQUASH_OPTS[word]] = value if word == "-comp" else _int(word, value)
    return found


def _int(flag: str, value: str) -> int:
    from hpcsif.errors import UsageError

    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--mksquashfs-args {flag} {value!r}: expected a number") from None


def _go_quoted(text: str) -> str:
    """``text`` as Go's ``%q`` shows it (Apptainer's messages): escapes for quotes, controls
    and bytes that are not UTF-8 (kept as surrogates by ``surrogateescape``)."""
    named = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
    out = []
    for ch in text:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in named:
            out.append(named[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x80 and not ch.isprintable():
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable():
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _not_a_pair(item: str) -> str | None:
    """Apptainer's complaint about ``item`` as a ``KEY=VALUE`` pair (None: it is one)."""
    key, sep, _ = item.partition("=")
    if not sep:
        return f"{_go_quoted(item)} is not a key=value pair"
    return None if key.strip() else f"missing key portion in {_go_quoted(item)}"


def _build_args(args: argparse.Namespace) -> dict[str, str]:
    """``--build-arg-file`` lines, then ``--build-arg`` values over them (Apptainer's order).

    A file line that is not KEY=VALUE (blank and comment lines too) is skipped with
    Apptainer's warning; a bad ``--build-arg`` fails in Apptainer's words. Keys and values
    are trimmed, as Apptainer trims them.
    """
    from hpcsif.build.deffile import MAX_SIZE
    from hpcsif.errors import DefinitionError, UsageError

    build_args = {}
    if args.build_arg_file:
        try:
            with open(args.build_arg_file, "rb") as f:
                data = f.read(MAX_SIZE + 1)  # bounded: /dev/zero must not fill the memory
        except OSError as exc:
            raise UsageError(f"--build-arg-file {args.build_arg_file}: {exc.strerror}") from None
        if len(data) > MAX_SIZE:
            raise UsageError(f"--build-arg-file {args.build_arg_file}: larger than {MAX_SIZE >> 20} MiB")
        # bytes that are not UTF-8 reach the scripts unchanged, as the definition file's own do
        text = data.decode(errors="surrogateescape")
        for line in text.removesuffix("\n").split("\n") if text else []:
            if problem := _not_a_pair(line):
                log.warning("Skipping %s in build arg file: %s", _go_quoted(line), problem)
                continue
            key, _, value = line.partition("=")
            build_args[key.strip()] = value.strip()
    for item in args.build_arg:
        if problem := _not_a_pair(item):
            raise DefinitionError(f"While processing the definition file: {problem}")
        key, _, value = item.partition("=")
        build_args[key.strip()] = value.strip()
    return build_args


def _sections(args: argparse.Namespace) -> frozenset[str] | None:
    """``--section`` names (None: all); Apptainer's list, comma-separated or repeated."""
    from hpcsif.build.builder import SECTION_NAMES
    from hpcsif.errors import UsageError

    names = {n.strip() for value in args.section for n in value.split(",") if n.strip()}
    for only in ("all", "none"):  # Apptainer's own check
        if only in names and len(names) > 1:
            raise UsageError(
                "Could not check build sections: section specification error: "
                f"cannot have {only} and any other option"
            )
    if not names or "all" in names:
        return None
    unknown = sorted(names - SECTION_NAMES - {"none"})
    if unknown:
        choices = ", ".join(sorted(SECTION_NAMES | {"none", "all"}))
        raise UsageError(f"--section {','.join(unknown)}: unknown section (choose from {choices})")
    return frozenset(names - {"none"})


def user_cache():  # -> CacheRoot | None
    """The user's cache root, ready for use; None, after Apptainer's warning, when it cannot be
    created or written: the command goes on with a throw-away cache, as Apptainer's does."""
    from hpcsif.cache.layout import CacheRoot
    from hpcsif.config import get_config
    from hpcsif.errors import CacheError

    try:
        root = CacheRoot(get_config().cache_dir()).ensure()
    except CacheError as exc:
        log.warning("Cache disabled - %s", exc)
        return None
    if not os.access(root.path, os.W_OK | os.X_OK):
        log.warning("Cache disabled - cache location %s is not writable.", root.path)
        return None
    return root


def blob_store(args: argparse.Namespace):  # -> OCIStore | None
    """The shared blob cache, or None for a temporary one (--disable-cache / *_DISABLE_CACHE, or
    a cache that cannot be used)."""
    from hpcsif.cache.blobs import pin_blobs
    from hpcsif.config import get_config
    from hpcsif.image.store import OCIStore

    if getattr(args, "disable_cache", False) or get_config().cache_disabled():
        return None
    root = user_cache()
    if root is None:
        return None
    pin_blobs(root)  # a cache gc elsewhere must not remove a layer this command is about to read
    return OCIStore(root.oci)


def run(args: argparse.Namespace) -> int:
    """Build ``target`` from ``source``."""
    from hpcsif.refs import parse

    flags_from_env(args, BUILD_ENV)
    _refuse_unsupported(args)
    if args.mksquashfs_args:
        for dest, value in _mksquashfs_options(args.mksquashfs_args).items():
            setattr(args, dest, value)
    target = Path(args.target)
    ref = parse(args.source)  # first: an unreachable local path (loop, EACCES …) fails in one line
    definition = False
    if ref.transport == "sif":  # only a local file can be one: skip loading the parser
        from hpcsif.build.deffile import is_definition_file

        definition = is_definition_file(args.source)
    check_target(target, force=args.force, sandbox=args.sandbox, update=args.update)
    with replacing(target, args.sandbox) as out:
        _build(args, ref, definition, out)
    if not args.sandbox:
        from hpcsif.sources.remote import umasked

        os.chmod(target, umasked(0o777))  # Apptainer's (and our pull's) 0777 & ~umask
    if not (args.quiet or args.silent):
        # on stderr, as Apptainer's INFO lines: `out=$(hpcsif build …)` captures nothing
        print(f"INFO:    Build complete: {target}", file=sys.stderr, flush=True)
    return 0


def _build(args: argparse.Namespace, ref, definition: bool, target: Path) -> None:  # ref: Reference
    """Build ``target`` from the definition file or image ``ref`` names."""
    from hpcsif.cli.progress import progress_bar
    from hpcsif.convert import convert_ref

    if definition:
        from hpcsif.build.builder import BuildOptions, build_definition

        update = args.update and not args.force  # Apptainer: -u -F rebuilds the sandbox from scratch
        from hpcsif.cli.pull import info

        log.info("Starting build of %s from definition file %s", target, args.source)
        opts = BuildOptions(
            notify=lambda step: info(args, step),
            convert=convert_options(args),
            sandbox=args.sandbox,
            notest=args.notest,
            store=blob_store(args),
            source_options=registry_options(args),
            build_args=_build_args(args),
            warn_unused_build_args=args.warn_unused_build_args,
            sections=_sections(args),
            update=update,
            binds=args.bind,
            mounts=args.mount,
            writable_tmpfs=args.writable_tmpfs,
            nv=args.nv or args.nvccli,
            rocm=args.rocm,
            no_cleanup=args.no_cleanup,
            fakeroot=args.fakeroot,
            force=args.force,
        )
        with arch_warning_when_made(sif=not args.sandbox):
            build_definition(args.source, target, opts)
    elif args.update and not args.force:  # Apptainer keeps the sandbox and fetches nothing
        from hpcsif.cli.pull import info
        from hpcsif.convert import update_sandbox

        info(args, "Starting build...")
        info(args, f"Building into existing container: {os.path.abspath(target)}")
        update_sandbox(target, ref)
        info(args, "Creating sandbox directory...")
    elif ref.transport == "oras":
        with arch_warning_when_made(sif=not args.sandbox):
            _build_from_oras(args, ref, target)
    else:
        from hpcsif.cli.pull import Notices, info

        log.info("Starting build of %s from %s", target, args.source)
        # Apptainer's INFO lines: an image from a URI's once it is found, a local image's when
        # it is done (input refused at once fails with its error line alone)
        local = ref.transport in ("sif", "sandbox")
        notices = Notices(args, build=True)
        with arch_warning_when_made(sif=not args.sandbox):
            convert_ref(
                ref,
                target,
                options=convert_options(args),
                store=blob_store(args),
                sandbox=args.sandbox,
                source_options={**registry_options(args), **({} if local else {"notify": notices})},
                progress=progress_bar(not (args.quiet or args.silent)),
            )
            if local:
                info(args, "Starting build...")
                from hpcsif.sif.reader import bare_filesystem

                if ref.transport == "sif" and not bare_filesystem(args.source):  # a SIF, not a .sqfs
                    from hpcsif.signing.verify import warn_unverified_base

                    info(args, f"Verifying bootstrap image {args.source}")
                    warn_unverified_base(ref.path or args.source)
                info(args, "Extracting local image...")
                info(args, "Creating sandbox directory..." if args.sandbox else "Creating SIF file...")
            else:
                notices.done()


def _build_from_oras(args: argparse.Namespace, ref, target: Path) -> None:  # ref: Reference
    """``build OUT oras://…``, as Apptainer's: the SIF pulled through the SIF cache (an oras
    entry; with the cache disabled, into a temporary file), then built from as a local image."""
    import tempfile

    from hpcsif.cli.pull import info, oras_sif
    from hpcsif.convert import convert_ref
    from hpcsif.refs import parse
    from hpcsif.signing.verify import warn_unverified_base

    info(args, "Starting build...")
    with tempfile.TemporaryDirectory(prefix=".hpcsif-build-", dir=target.resolve().parent) as tmp:
        aside = Path(tmp) / "image.sif"
        if blob_store(args) is None:
            info(args, f"Downloading oras image to tmp cache: {aside}")
        with oras_sif(ref, args, aside) as sif:
            info(args, f"Verifying bootstrap image {sif}")
            warn_unverified_base(sif)
            convert_ref(parse(str(sif)), target, options=convert_options(args), sandbox=args.sandbox)
    info(args, "Creating sandbox directory..." if args.sandbox else "Creating SIF file...")
