"""``hpcsif sif list|header|info|dump|new|add|del|setprim``: read and edit a SIF, like ``apptainer sif``.

Edits are atomic (the image is rewritten to a temp file next to it and renamed into place) and
keep the image readable by Apptainer.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from hpcsif.sif.writer import ObjectSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sif`` command group."""
    parser = subparsers.add_parser("sif", help="inspect the data objects of a SIF image")
    sub = parser.add_subparsers(dest="sif_command", metavar="SUBCOMMAND")
    # `sif` alone prints its help and succeeds, as Apptainer's does
    parser.set_defaults(func=lambda args: parser.print_help() or 0)

    for name, text, func, with_id in (
        ("list", "list the data objects of a SIF image", cmd_list, False),
        ("header", "display the global header of a SIF image", cmd_header, False),
        ("info", "display the descriptor of one data object", cmd_info, True),
        ("dump", "write the raw content of one data object to stdout", cmd_dump, True),
        ("new", "create a new, empty SIF image", cmd_new, False),
    ):
        _object_command(sub, name, text, func, with_id)

    p = sub.add_parser("add", help="add a data object (a file's content) to a SIF image")
    p.add_argument("image", metavar="SIF")
    p.add_argument("object", metavar="OBJECT_FILE")
    p.add_argument(
        "--datatype",
        type=int,
        default=0,
        help="the type of data (needed): 1-Deffile, 2-EnvVar, 3-Labels, 4-Partition, 5-Signature, "
        "6-GenericJSON, 7-Generic, 8-CryptoMessage, 9-SBOM, 10-OCI.RootIndex, 11-OCI.Blob",
    )
    p.add_argument(
        "--parttype", type=int, default=0, help="with --datatype 4: 1-System, 2-PrimSys, 3-Data, 4-Overlay"
    )
    p.add_argument(
        "--partfs", type=int, default=0, help="with --datatype 4: 1-Squash, 2-Ext3, 3-ImmuObj, 4-Raw"
    )
    p.add_argument(
        "--partarch",
        type=int,
        default=0,
        help="with --datatype 4: 1-386, 2-amd64, 3-arm, 4-arm64, 5-ppc64, 6-ppc64le, 7-mips, 8-mipsle, "
        "9-mips64, 10-mips64le, 11-s390x, 12-riscv64",
    )
    p.add_argument("--signentity", default="", help="with --datatype 5: signer fingerprint (40 hex digits)")
    p.add_argument(
        "--signhash",
        type=int,
        default=0,
        help="with --datatype 5: 1-SHA256, 2-SHA384, 3-SHA512, 4-BLAKE2s_256, 5-BLAKE2b_256",
    )
    p.add_argument(
        "--sbomformat",
        default="",
        help="with --datatype 9: cyclonedx-json, cyclonedx-xml, github-json, spdx-json, spdx-rdf, "
        "spdx-tag-value, spdx-yaml, syft-json",
    )
    p.add_argument("--groupid", type=int, default=0, help="object group (default 0: none)")
    p.add_argument(
        "--link", type=int, default=0, help="id of the object this one is linked to (default 0: none)"
    )
    p.add_argument(
        "--alignment", type=int, default=0, help="alignment (default 4096 for partitions, else none)"
    )
    p.add_argument("--filename", default="", help="logical name of the object (default: none)")
    p.set_defaults(func=cmd_add)

    _object_command(sub, "del", "delete a data object from a SIF image", cmd_del, True)
    _object_command(sub, "setprim", "make a system partition the primary one", cmd_setprim, True)


def _object_command(
    sub: argparse._SubParsersAction,
    name: str,
    text: str,
    func: Callable[[argparse.Namespace], int],
    with_id: bool,
) -> None:
    """A ``sif`` subcommand taking ``[ID] SIF``, as Apptainer's ``sif`` commands order them."""
    p = sub.add_parser(name, help=text)
    if with_id:
        p.add_argument("id", type=int, metavar="ID")
    p.add_argument("image", metavar="SIF")
    p.set_defaults(func=func)


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


def cmd_new(args: argparse.Namespace) -> int:
    """Write an empty SIF (header and an empty descriptor table)."""
    from hpcsif.sif.writer import SIFWriter

    with SIFWriter(args.image) as writer:
        writer.header.launch = ""  # as `apptainer sif new`: an empty image is not runnable
        writer.commit()
    return 0


def object_spec(args: argparse.Namespace) -> ObjectSpec:
    """The :class:`~hpcsif.sif.writer.ObjectSpec` that ``sif add``'s flags describe (siftool's rules)."""
    import hashlib
    from pathlib import Path

    from hpcsif.errors import UsageError
    from hpcsif.sif import format as f
    from hpcsif.sif.writer import ObjectSpec

    types = list(f.DataType)
    if not 1 <= args.datatype <= len(types):
        raise UsageError("--datatype is needed, from 1 to 11 (see: hpcsif sif add --help)")
    datatype = types[args.datatype - 1]
    path = Path(args.object)
    spec = ObjectSpec(
        datatype,
        path=path,
        name=args.filename,
        group_id=args.groupid,
        link_id=args.link,
        alignment=args.alignment,
    )
    if datatype == f.DataType.PARTITION:
        arches = list(f.ARCH_CODES)
        if not (args.parttype and args.partfs and args.partarch):
            raise UsageError("with partition datatype, --partfs, --parttype and --partarch must be passed")
        spec.parttype, spec.fstype = f.PartType(args.parttype), f.FSType(args.partfs)
        spec.arch = arches[args.partarch - 1] if args.partarch <= len(arches) else "unknown"
    elif datatype == f.DataType.SIGNATURE:
        try:
            spec.entity = bytes.fromhex(args.signentity)
            spec.hashtype = f.HashType(args.signhash)
        except ValueError as exc:
            raise UsageError(f"invalid --signentity or --signhash: {exc}") from None
        if len(spec.entity) != 20:
            raise UsageError(f"invalid signing entity fingerprint length: got {len(spec.entity)}, want 20")
    elif datatype == f.DataType.SBOM:
        formats = {fmt.label: fmt for fmt in f.SBOMFormat} | {"github": f.SBOMFormat.GITHUB_JSON}
        if args.sbomformat not in formats:
            raise UsageError(
                f"invalid --sbomformat {args.sbomformat!r} (one of {', '.join(sorted(formats))})"
            )
        spec.extra = f.sbom_extra(formats[args.sbomformat])
    elif datatype in (f.DataType.OCI_BLOB, f.DataType.OCI_ROOT_INDEX):
        digest = hashlib.sha256()
        with path.open("rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
        spec.extra = f.oci_digest_extra(f"sha256:{digest.hexdigest()}")
    return spec


def cmd_add(args: argparse.Namespace) -> int:
    """Append one object to the image."""
    from hpcsif.sif.writer import add_objects

    add_objects(args.image, [object_spec(args)])
    return 0


def cmd_del(args: argparse.Namespace) -> int:
    """Remove one object from the image."""
    from hpcsif.sif.writer import remove_objects

    remove_objects(args.image, [args.id])
    return 0


def cmd_setprim(args: argparse.Namespace) -> int:
    """Make a system partition the primary one."""
    from hpcsif.sif.writer import set_primary

    set_primary(args.image, args.id)
    return 0
