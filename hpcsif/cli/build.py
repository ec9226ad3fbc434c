"""``hpcsif build``: convert any source (or a definition file) to a SIF or a sandbox."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hpcsif.cli.pull import add_registry_flags, registry_options

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
    p.add_argument("--tmpdir", help="directory for temporary files (default: next to the output)")
    p.add_argument("-F", "--force", action="store_true", help="overwrite an existing target")
    p.add_argument("--disable-cache", action="store_true", help="use no blob cache (a temporary one)")


def convert_options(args: argparse.Namespace):  # -> ConvertOptions (imported lazily)
    """ConvertOptions from flags layered over the configuration."""
    from hpcsif.convert import ConvertOptions

    return ConvertOptions.from_config(
        compression=args.compression,
        level=args.level,
        tmpdir=Path(args.tmpdir) if args.tmpdir else None,
        arch=args.arch,
    )


def check_target(target: Path, force: bool) -> None:
    """Refuse to replace an existing target unless forced; the old one goes only once the new is ready."""
    from hpcsif.errors import BuildError

    if not target.exists() and not target.is_symlink():
        if not target.parent.is_dir():
            raise BuildError(f"cannot write {target}: directory {target.parent} does not exist")
        return
    if not force:
        raise BuildError(
            f"While checking build target: build target '{target}' already exists. "
            "Use --force if you want to overwrite it"
        )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``build`` command."""
    p = sub.add_parser("build", help="build a SIF image or sandbox from a source or definition file")
    p.add_argument("--sandbox", action="store_true", help="build a writable directory tree instead of a SIF")
    p.add_argument("-T", "--notest", action="store_true", help="skip the %%test section")
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
    add_convert_flags(p)
    add_registry_flags(p)
    p.add_argument("target", help="SIF file or sandbox directory to create")
    p.add_argument("source", help="docker://, oci://, oci-archive://, docker-archive://, SIF, sandbox, .def")
    p.set_defaults(func=run)


def blob_store(args: argparse.Namespace):  # -> OCIStore | None
    """The shared blob cache, or None for a temporary one (--disable-cache / *_DISABLE_CACHE)."""
    from hpcsif.config import get_config
    from hpcsif.image.store import OCIStore

    cfg = get_config()
    if getattr(args, "disable_cache", False) or cfg.cache_disabled():
        return None
    root = cfg.cache_dir() / "oci"
    root.parent.mkdir(parents=True, exist_ok=True)
    return OCIStore(root)


def run(args: argparse.Namespace) -> int:
    """Build ``target`` from ``source``."""
    from hpcsif.cli.progress import progress_bar
    from hpcsif.convert import convert_ref
    from hpcsif.refs import parse

    target = Path(args.target)
    definition = False
    if Path(args.source).is_file():  # only a local file can be one: skip loading the parser
        from hpcsif.build.deffile import is_definition_file

        definition = is_definition_file(args.source)
    if definition:
        from hpcsif.build.builder import BuildOptions, build_definition

        check_target(target, args.force)
        log.info("Starting build of %s from definition file %s", target, args.source)
        from hpcsif.errors import UsageError

        build_args = {}
        for item in args.build_arg:
            key, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"--build-arg {item!r}: expected KEY=VALUE")
            build_args[key] = value
        opts = BuildOptions(
            convert=convert_options(args),
            sandbox=args.sandbox,
            notest=args.notest,
            store=blob_store(args),
            source_options=registry_options(args),
            build_args=build_args,
        )
        build_definition(args.source, target, opts)
    else:
        ref = parse(args.source)
        check_target(target, args.force)
        log.info("Starting build of %s from %s", target, args.source)
        convert_ref(
            ref,
            target,
            options=convert_options(args),
            store=blob_store(args),
            sandbox=args.sandbox,
            source_options=registry_options(args),
            progress=progress_bar(not (args.quiet or args.silent)),
        )
    if not (args.quiet or args.silent):
        # on stderr, as Apptainer's INFO lines: `out=$(hpcsif build …)` captures nothing
        print(f"INFO:    Build complete: {target}", file=sys.stderr, flush=True)
    return 0
