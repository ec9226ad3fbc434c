"""``hpcsif overlay create``: make an ext3 writable overlay image, as ``apptainer overlay create``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``overlay`` command group."""
    parser = subparsers.add_parser("overlay", help="manage ext3 writable overlay images")
    sub = parser.add_subparsers(dest="overlay_command", metavar="SUBCOMMAND")
    sub.required = True
    p = sub.add_parser(
        "create",
        help="create an ext3 writable overlay image (a file, or the overlay partition of a SIF)",
        description="Create an ext3 writable overlay image: a file for --overlay IMG, or, given an "
        "existing SIF, its overlay partition (written by exec --writable). What containers write "
        "there stays for later ones, and for Apptainer.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-s", "--size", type=int, default=64, help="size of the overlay in MiB (default 64)")
    p.add_argument("-S", "--sparse", action="store_true", help="create a sparse overlay")
    p.add_argument(
        "--create-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory to create as part of the overlay layout (repeatable, or comma-separated)",
    )
    p.add_argument(
        "-f",
        "--fakeroot",
        action="store_true",
        help="make the overlay layout usable by actions run with --fakeroot",
    )
    p.set_defaults(func=cmd_create)


def cmd_create(args: argparse.Namespace) -> int:
    """Create the overlay image."""
    from pathlib import Path

    from hpcsif.engine.overlay_images import create_overlay

    dirs = [d for value in args.create_dir for d in value.split(",") if d]
    create_overlay(Path(args.image), args.size, sparse=args.sparse, create_dirs=dirs, fakeroot=args.fakeroot)
    return 0
