"""``hpcsif sif list|header|info|dump``: look inside a SIF, like ``apptainer sif``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sif`` command group."""
    parser = subparsers.add_parser("sif", help="inspect the data objects of a SIF image")
    sub = parser.add_subparsers(dest="sif_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("list", help="list the data objects of a SIF image")
    p.add_argument("image", metavar="SIF")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("header", help="display the global header of a SIF image")
    p.add_argument("image", metavar="SIF")
    p.set_defaults(func=cmd_header)

    p = sub.add_parser("info", help="display the descriptor of one data object")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("image", metavar="SIF")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("dump", help="write the raw content of one data object to stdout")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("image", metavar="SIF")
    p.set_defaults(func=cmd_dump)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the descriptor table."""
    from hpcsif.sif.listing import format_list
    from hpcsif.sif.reader import SIFImage

    with SIFImage.open(args.image) as img:
        sys.stdout.write(format_list(img))
    return 0


def cmd_header(args: argparse.Namespace) -> int:
    """Print the global header."""
    from hpcsif.sif.listing import format_header
    from hpcsif.sif.reader import SIFImage

    with SIFImage.open(args.image) as img:
        sys.stdout.write(format_header(img))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print one descriptor in detail."""
    from hpcsif.sif.listing import format_info
    from hpcsif.sif.reader import SIFImage

    with SIFImage.open(args.image) as img:
        sys.stdout.write(format_info(img.get(args.id)))
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    """Stream one object's raw bytes to stdout."""
    from hpcsif.sif.reader import SIFImage

    with SIFImage.open(args.image) as img:
        sys.stdout.flush()
        img.copy_object(img.get(args.id), sys.stdout.buffer)
        sys.stdout.buffer.flush()
    return 0
