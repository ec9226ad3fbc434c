"""``hpcsif key …``, ``hpcsif sign`` and ``hpcsif verify``: SIF signatures as Apptainer makes them.

Only the standard library is imported here; the signing modules load inside the handlers.
"""

from __future__ import annotations

import argparse
import getpass
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``key``, ``sign`` and ``verify`` commands."""
    key = sub.add_parser("key", help="manage signing keys (PEM key pairs and OpenPGP keys)")
    keysub = key.add_subparsers(dest="key_command", metavar="SUBCOMMAND")
    keysub.required = True

    p = keysub.add_parser("newpair", help="create a new key pair in the keyring")
    p.add_argument("-N", "--name", help="key name in the keyring (default: your user name)")
    p.add_argument(
        "-t",
        "--type",
        default="ed25519",
        choices=("ed25519", "ecdsa-p256", "ecdsa-p384", "rsa-3072", "rsa-4096", "pgp"),
        help="key algorithm: PEM keys sign DSSE envelopes (verify with 'apptainer verify --key'); "
        "'pgp' makes an OpenPGP key (Apptainer's default scheme)",
    )
    p.add_argument("-u", "--uid", default="", help="OpenPGP user id, e.g. 'Jane Doe <jane@example.org>'")
    p.set_defaults(func=_key_newpair)

    p = keysub.add_parser("list", help="list the keys in the keyring")
    p.set_defaults(func=_key_list)

    p = keysub.add_parser("import", help="add a key file (PEM or armored OpenPGP, public or private)")
    p.add_argument("file")
    p.add_argument("-N", "--name", default="", help="name in the keyring (default: from the file name)")
    p.set_defaults(func=_key_import)

    p = keysub.add_parser("export", help="write a key to a file (public unless --secret)")
    p.add_argument("key", help="key name or fingerprint")
    p.add_argument("file")
    p.add_argument("-s", "--secret", action="store_true", help="export the private key (mode 0600)")
    p.set_defaults(func=_key_export)

    p = keysub.add_parser("remove", help="delete a key from the keyring")
    p.add_argument("key", help="key name or fingerprint")
    p.set_defaults(func=_key_remove)

    p = keysub.add_parser("default", help="choose the key 'hpcsif sign' uses when none is named")
    p.add_argument("key", help="key name or fingerprint")
    p.set_defaults(func=_key_default)

    p = sub.add_parser("sign", help="add a signature covering the partition and metadata of a SIF")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--key", metavar="FILE", help="sign with this PEM private key (DSSE)")
    who.add_argument("-k", "--keyname", metavar="NAME", help="sign with this keyring key")
    p.add_argument("image", help="SIF image to sign (rewritten in place)")
    p.set_defaults(func=_sign)

    p = sub.add_parser("verify", help="check the signatures of a SIF")
    p.add_argument(
        "--key",
        metavar="FILE",
        action="append",
        default=[],
        help="public key file (PEM or armored OpenPGP); repeatable. Default: every key in the keyring",
    )
    p.add_argument("image", help="SIF image to verify")
    p.set_defaults(func=_verify)


def _key_newpair(args: argparse.Namespace) -> int:
    from hpcsif.signing.keys import Keyring

    keyring = Keyring()
    name = args.name or getpass.getuser()
    key = keyring.newpair(name, args.type, args.uid)
    print(f"Created key {key.name}: {key.algorithm}, fingerprint {key.fingerprint}")
    print(f"Public key:  {key.public_path}")
    print(f"Private key: {key.private_path}")
    if keyring.default_name() == key.name:
        print("It is the default signing key.")
    return 0


def _key_list(args: argparse.Namespace) -> int:
    from hpcsif.signing.keys import Keyring

    keyring = Keyring()
    keys = keyring.list()
    print(f"Keyring: {keyring.root}")
    if not keys:
        print("No keys (create one with: hpcsif key newpair)")
    default = keyring.default_name()
    for i, key in enumerate(keys):
        scheme = "OpenPGP" if key.scheme == "pgp" else "PEM/DSSE"
        pair = "key pair" if key.private_path else "public key"
        mark = "  [default]" if key.name == default else ""
        print(f"{i}) {key.name}{mark}")
        if key.uid:
            print(f"   U: {key.uid}")
        print(f"   T: {scheme} {key.algorithm} {pair}")
        print(f"   F: {key.fingerprint}")
    return 0


def _key_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcsif.signing.keys import Keyring

    key = Keyring().import_file(Path(args.file), args.name)
    kind = "key pair" if key.private_path else "public key"
    print(f"Imported {kind} {key.name} ({key.algorithm}, fingerprint {key.fingerprint})")
    return 0


def _key_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcsif.signing.keys import Keyring

    dest = Keyring().export(args.key, Path(args.file), private=args.secret)
    print(f"{'Private' if args.secret else 'Public'} key {args.key} written to {dest}")
    return 0


def _key_remove(args: argparse.Namespace) -> int:
    from hpcsif.signing.keys import Keyring

    key = Keyring().remove(args.key)
    print(f"Removed key {key.label}")
    return 0


def _key_default(args: argparse.Namespace) -> int:
    from hpcsif.signing.keys import Keyring

    Keyring().set_default(args.key)
    print(f"Default signing key: {args.key}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcsif.signing.keys import Keyring, describe_file
    from hpcsif.signing.sign import sign_image

    key = describe_file(Path(args.key)) if args.key else Keyring().signing_key(args.keyname)
    print(f"Signing image {args.image} with {key.label}", file=sys.stderr)
    added = sign_image(args.image, key)
    print(f"Signature created and applied to image '{args.image}' ({len(added)} signature object(s))")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcsif.signing.keys import Keyring
    from hpcsif.signing.verify import keys_from_paths, verify_image

    print(f"Verifying image: {args.image}")
    keys = keys_from_paths([Path(k) for k in args.key]) if args.key else Keyring().list()
    report = verify_image(args.image, keys)
    for sig, why in report.skipped:
        print(f"WARNING: signature object {sig.id} skipped: {why}", file=sys.stderr)
    for result in report.verified:
        key = result.key
        print(f"[{key.scheme.upper():<4}]  Signing entity: {key.uid or key.name}")
        print(f"[{key.scheme.upper():<4}]  Fingerprint: {key.fingerprint}")
        print("Objects verified:")
        print(f"{'ID':<4}|{'GROUP':<8}|{'LINK':<8}|TYPE")
        print("-" * 48)
        for od in result.objects:
            group = str(od.group_id) if od.group_id else "NONE"
            link = f"{od.link_id} (G)" if od.link_is_group else (str(od.link_id) if od.link_id else "NONE")
            kind = od.datatype.label if hasattr(od.datatype, "label") else hex(od.datatype)
            print(f"{od.id:<4}|{group:<8}|{link:<8}|{kind}")
    print(f"Container verified: {args.image}")
    return 0
