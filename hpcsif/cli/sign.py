"""``hpcsif key …``, ``hpcsif sign`` and ``hpcsif verify``: SIF signatures as Apptainer makes them.

Only the standard library is imported here; the signing modules load inside the handlers.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcsif.signing.keys import Keyring
    from hpcsif.signing.verify import VerifyReport


def _flag_bool(value: str) -> bool:
    """Go-style boolean flag values (``--push=false``)."""
    if value.lower() in ("1", "t", "true", "yes"):
        return True
    if value.lower() in ("0", "f", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {value!r}")


def _keyring_flags(p: argparse.ArgumentParser, global_flag: bool = True) -> None:
    """Apptainer's -d/--keysdir (and -g/--global) on a key subcommand."""
    p.add_argument(
        "-d", "--keysdir", help="keyring directory (default: $HPCSIF_KEYSDIR or ~/.config/hpcsif/keys)"
    )
    if global_flag:
        p.add_argument(
            "-g",
            "--global",
            dest="global_",
            action="store_true",
            help="not supported: there is no global keyring",
        )


def _keyserver_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-u", "--url", help="not supported: hpcsif contacts no key server")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``key``, ``sign`` and ``verify`` commands."""
    key = sub.add_parser("key", help="manage signing keys (PEM key pairs and OpenPGP keys)")
    keysub = key.add_subparsers(dest="key_command", metavar="SUBCOMMAND")
    keysub.required = True

    p = keysub.add_parser("newpair", help="create a new key pair in the keyring (no prompts)")
    p.add_argument(
        "-N", "--name", help="key owner name; also the keyring name, made safe (default: your user name)"
    )
    p.add_argument("-E", "--email", default="", help="key owner email (OpenPGP user id)")
    p.add_argument("-C", "--comment", default="", help="key comment (OpenPGP user id)")
    p.add_argument(
        "-P", "--password", help="accepted and not used: private keys are stored unencrypted, mode 0600"
    )
    p.add_argument(
        "-b", "--bit-length", type=int, help="make an OpenPGP RSA key of this length (implies -t pgp)"
    )
    p.add_argument(
        "-U",
        "--push",
        type=_flag_bool,
        nargs="?",
        const=True,
        default=False,
        metavar="BOOL",
        help="--push=false is the default; pushing to a key server is not supported",
    )
    p.add_argument(
        "-t",
        "--type",
        choices=("ed25519", "ecdsa-p256", "ecdsa-p384", "rsa-3072", "rsa-4096", "pgp"),
        help="key algorithm (default ed25519; pgp with -E/-C/-b): PEM keys sign DSSE envelopes "
        "(verify with 'apptainer verify --key'); 'pgp' makes an OpenPGP key (Apptainer's default scheme)",
    )
    p.add_argument("-u", "--uid", default="", help="OpenPGP user id, e.g. 'Jane Doe <jane@example.org>'")
    _keyring_flags(p, global_flag=False)
    p.set_defaults(func=_key_newpair)

    p = keysub.add_parser("list", help="list the keys in the keyring")
    p.add_argument(
        "-s", "--secret", action="store_true", help="list only private keys (their index is sign's --keyidx)"
    )
    _keyring_flags(p)
    p.set_defaults(func=_key_list)

    p = keysub.add_parser("import", help="add a key file (PEM or armored OpenPGP, public or private)")
    p.add_argument("file")
    p.add_argument("-N", "--name", default="", help="name in the keyring (default: from the file name)")
    p.add_argument(
        "--new-password",
        action="store_true",
        help="accepted and not used: a key is stored as given (a passphrase-protected OpenPGP key "
        "keeps its passphrase, which 'hpcsif sign' asks for)",
    )
    _keyring_flags(p)
    p.set_defaults(func=_key_import)

    p = keysub.add_parser("export", help="write a key to a file (public unless --secret)")
    p.add_argument(
        "args",
        nargs="+",
        metavar="[KEY] FILE",
        help="key name or fingerprint (default: the signing key with --secret, else the only or the "
        "default key), and the output file",
    )
    p.add_argument("-s", "--secret", action="store_true", help="export the private key (mode 0600)")
    p.add_argument("-a", "--armor", action="store_true", help="accepted: keys are always exported as text")
    _keyring_flags(p)
    p.set_defaults(func=_key_export)

    p = keysub.add_parser("remove", help="delete a key from the keyring")
    p.add_argument("key", help="key name or fingerprint")
    which = p.add_mutually_exclusive_group()
    which.add_argument("-b", "--both", action="store_true", help="remove the public and the private key")
    which.add_argument("-s", "--secret", action="store_true", help="remove only the private key")
    which.add_argument(
        "-p",
        "--public",
        action="store_true",
        help="remove only the public key (the default, as Apptainer's: a private key stays and signs)",
    )
    _keyring_flags(p)
    p.set_defaults(func=_key_remove)

    p = keysub.add_parser("default", help="choose the key 'hpcsif sign' uses when none is named")
    p.add_argument("key", help="key name or fingerprint")
    _keyring_flags(p, global_flag=False)
    p.set_defaults(func=_key_default)

    for name, what in (("pull", "<fingerprint>"), ("push", "<fingerprint>"), ("search", "<search_string>")):
        p = keysub.add_parser(name, help=f"not supported: {name} needs a key server")
        p.add_argument("what", metavar=what)
        _keyserver_flags(p)
        if name == "search":
            p.add_argument("-l", "--long-list", action="store_true")
        else:
            _keyring_flags(p)
        p.set_defaults(func=_key_server)

    p = sub.add_parser("sign", help="add a signature covering the partition and metadata of a SIF")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--key", metavar="FILE", help="sign with this PEM private key (DSSE)")
    who.add_argument(
        "-k",
        "--keyidx",
        type=int,
        metavar="INT",
        help="sign with this private key (index from 'key list --secret')",
    )
    who.add_argument("--keyname", metavar="NAME", help="sign with this keyring key (name or fingerprint)")
    p.add_argument("-g", "--group-id", type=int, metavar="ID", help="sign only the objects of this group")
    p.add_argument("-i", "--sif-id", type=int, metavar="ID", help="sign only the object with this id")
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
    p.add_argument("-a", "--all", action="store_true", help="verify all objects (the default)")
    p.add_argument("-g", "--group-id", type=int, metavar="ID", help="verify only the objects of this group")
    p.add_argument("-i", "--sif-id", type=int, metavar="ID", help="verify only the object with this id")
    p.add_argument("-j", "--json", action="store_true", help="print Apptainer's JSON report")
    p.add_argument("-l", "--local", action="store_true", help="only local keys (always so: no key server)")
    p.add_argument("--legacy-insecure", action="store_true", help="not supported: legacy signatures")
    _keyserver_flags(p)
    p.add_argument("--certificate", metavar="FILE", help="verify with this X.509 certificate's key (PEM)")
    p.add_argument("--certificate-intermediates", metavar="FILE", help="intermediate certificates (PEM)")
    p.add_argument(
        "--certificate-roots", metavar="FILE", help="root certificates (PEM; default: the system's CA bundle)"
    )
    p.add_argument("--ocsp-verify", action="store_true", help="not supported: online revocation checks")
    p.add_argument("image", help="SIF image to verify")
    p.set_defaults(func=_verify)


def _unsupported(flag: str, why: str) -> None:
    from hpcsif.errors import UsageError

    raise UsageError(f"{flag} is not supported by hpcsif: {why}")


def _keyring(args: argparse.Namespace) -> Keyring:
    """The keyring -d names (or the default); refuses -g."""
    from pathlib import Path

    from hpcsif.signing.keys import Keyring

    if getattr(args, "global_", False):
        _unsupported("--global", "there is no global keyring; admins list trusted keys in cache.trusted_keys")
    return Keyring(Path(args.keysdir) if args.keysdir else None)


def _key_server(args: argparse.Namespace) -> int:
    _unsupported(
        f"key {args.key_command}",
        "hpcsif contacts no key server; exchange key files with 'hpcsif key export' and 'hpcsif key import'",
    )
    return 2


def _key_newpair(args: argparse.Namespace) -> int:
    import re

    if args.push:
        _unsupported("--push", "hpcsif contacts no key server; share the file 'hpcsif key export' writes")
    if args.password:
        print(
            "WARNING: --password is not used: hpcsif stores private keys unencrypted (mode 0600)",
            file=sys.stderr,
        )
    owner = args.name or getpass.getuser()
    uid = args.uid or owner + (f" ({args.comment})" if args.comment else "") + (
        f" <{args.email}>" if args.email else ""
    )
    kind = args.type or ("pgp" if (args.email or args.comment or args.bit_length) else "ed25519")
    name = re.sub(r"[^A-Za-z0-9._@+-]+", "-", owner).strip("-") or getpass.getuser()
    keyring = _keyring(args)
    key = keyring.newpair(name, kind, uid, bits=args.bit_length if kind == "pgp" else None)
    print(f"Created key {key.name}: {key.algorithm}, fingerprint {key.fingerprint}")
    print(f"Public key:  {key.public_path}")
    print(f"Private key: {key.private_path}")
    if keyring.default_name() == key.name:
        print("It is the default signing key.")
    return 0


def _key_list(args: argparse.Namespace) -> int:
    keyring = _keyring(args)
    keys = keyring.secret_keys() if args.secret else keyring.list()
    # Apptainer's layout; the index under --secret is what `sign --keyidx` takes
    print(f"{'Private' if args.secret else 'Public'} key listing ({keyring.root}):")
    print()
    if not keys:
        print("No keys (create one with: hpcsif key newpair)")
    default = keyring.default_name()
    for i, key in enumerate(keys):
        scheme = "OpenPGP" if key.scheme == "pgp" else "PEM/DSSE"
        pair = (
            "key pair"
            if key.private_path and key.has_public
            else "private key"
            if key.private_path
            else "public key"
        )
        mark = "  [default]" if key.name == default else ""
        print(f"{f'{i})':<4}User:              {key.uid or key.name}")
        print(f"    Name:              {key.name}{mark}")
        print(f"    Type:              {scheme} {key.algorithm} {pair}")
        print(f"    Fingerprint:       {key.fingerprint}")
        print()
    return 0


def _key_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcsif.signing import pgp

    if args.new_password:
        print("WARNING: --new-password is not used: hpcsif stores the key as given", file=sys.stderr)
    key = _keyring(args).import_file(Path(args.file), args.name)
    kind = "key pair" if key.private_path else "public key"
    print(f"Imported {kind} {key.name} ({key.algorithm}, fingerprint {key.fingerprint})")
    if key.private_path and key.scheme == "pgp" and pgp.is_protected(key.private_path.read_bytes()):
        print("Its private key is protected by a passphrase: 'hpcsif sign' asks for it.")
    return 0


def _key_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcsif.errors import UsageError

    if len(args.args) > 2:
        raise UsageError("key export takes [KEY] FILE")
    *ref, dest = args.args
    keyring = _keyring(args)
    if ref:
        name = ref[0]
    elif args.secret:
        name = keyring.signing_key().name
    else:
        keys = keyring.list()
        default = [k for k in keys if k.name == keyring.default_name()]
        chosen = keys if len(keys) == 1 else default
        if not chosen:
            raise UsageError("several keys in the keyring: name one (hpcsif key export KEY FILE)")
        name = chosen[0].name
    written = keyring.export(name, Path(dest), private=args.secret)
    print(f"{'Private' if args.secret else 'Public'} key {name} written to {written}")
    return 0


def _key_remove(args: argparse.Namespace) -> int:
    which = "secret" if args.secret else "both" if args.both else "public"
    key = _keyring(args).remove(args.key, which)
    what = {"secret": "private key", "public": "public key", "both": "public and private key"}[which]
    print(f"Removed the {what} of {key.label}")
    return 0


def _key_default(args: argparse.Namespace) -> int:
    _keyring(args).set_default(args.key)
    print(f"Default signing key: {args.key}")
    return 0


def _info(args: argparse.Namespace, message: str) -> None:
    """An ``INFO:`` line on stderr, as Apptainer reports sign and verify (not with -q/-s)."""
    if not (args.quiet or args.silent):
        print(f"INFO:    {message}", file=sys.stderr)


def _ask_passphrase() -> str:
    """The key's passphrase, as Apptainer asks it: unechoed from a terminal, else a line of stdin."""
    prompt = "Enter key passphrase : "
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    print(prompt, end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    print(file=sys.stderr)
    return line.removesuffix("\n").removesuffix("\r")


def _sign(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcsif.errors import UsageError
    from hpcsif.signing.keys import Keyring, describe_file
    from hpcsif.signing.sign import sign_image

    if args.key:
        key = describe_file(Path(args.key))
        _info(args, f"Signing image with key material from '{args.key}'")
    else:
        keyring = Keyring()
        if args.keyidx is not None:
            secret = keyring.secret_keys()
            if not 0 <= args.keyidx < len(secret):
                raise UsageError(
                    f"--keyidx {args.keyidx}: index out of range (see: hpcsif key list --secret)"
                )
            key = secret[args.keyidx]
        else:
            key = keyring.signing_key(args.keyname)
        material = (
            "PGP key material" if key.scheme == "pgp" else f"key material from keyring key {key.name!r}"
        )
        _info(args, f"Signing image with {material}")
    sign_image(args.image, key, args.group_id, args.sif_id, _ask_passphrase)
    _info(args, f"Signature created and applied to image '{args.image}'")
    return 0


def _json_report(signatures: int, objects: list[dict[str, object]]) -> str:
    """Apptainer's ``verify --json`` document (Go's indent and escaping)."""
    from hpcsif.cli.inspect import go_json

    return go_json({"Signatures": signatures, "SignerKeys": objects or None}).replace("\t", "  ")


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hpcsif.errors import UsageError
    from hpcsif.signing.keys import Keyring
    from hpcsif.signing.verify import VerificationFailed, VerifyReport, keys_from_paths, verify_image

    if args.legacy_insecure:
        _unsupported(
            "--legacy-insecure", "signatures of Singularity < 3.6 cannot be checked; re-sign the image"
        )
    if args.url:
        _unsupported("--url", "hpcsif contacts no key server; pass the signer's key with --key or import it")
    if args.ocsp_verify:
        _unsupported(
            "--ocsp-verify", "online revocation checks need the network; check --certificate offline"
        )
    if (args.certificate_roots or args.certificate_intermediates) and not args.certificate:
        raise UsageError("--certificate-roots and --certificate-intermediates need --certificate")
    keys = keys_from_paths([Path(k) for k in args.key]) if args.key else []
    if args.certificate:
        from hpcsif.signing.x509 import certificate_key

        intermediates = args.certificate_intermediates
        roots = args.certificate_roots
        keys.append(
            certificate_key(
                Path(args.certificate),
                Path(intermediates) if intermediates else None,
                Path(roots) if roots else None,
            )
        )
        _info(args, f"Verifying image with key material from certificate '{args.certificate}'")
    for k in args.key:
        _info(args, f"Verifying image with key material from '{k}'")
    local = not keys
    if local:
        keys = Keyring().list()
        _info(args, "Verifying image with PGP key material")
    try:
        report = verify_image(args.image, keys, args.group_id, args.sif_id)
    except VerificationFailed as exc:
        # as Apptainer: what was verified before the failure, then the error on stdout too
        done = exc.report or VerifyReport(Path(args.image))
        if args.json:
            # Apptainer counts the signature that failed too, and lists only the verified ones
            checked = len(done.verified) + (exc.signature is not None)
            print(_json_report(checked, _json_entries(done, local)))
        else:
            _print_verified(done)
            if exc.signature is not None:  # Apptainer says it only where a signature failed
                print(f"\nError encountered during signature verification: {exc.reason}")
        # Apptainer's words (its integrity package names every failure)
        raise VerificationFailed(f"Failed to verify container: integrity: {exc.reason}") from None
    for sig, why in report.skipped:
        print(f"WARNING: signature object {sig.id} skipped: {why}", file=sys.stderr)
    if args.json:
        print(_json_report(len(report.verified), _json_entries(report, local)))
    else:  # the report says it all with --json, as Apptainer's
        _print_verified(report)
        signers = ", ".join(sorted({r.key.label for r in report.verified}))
        _info(args, f"Verified signature(s) from image '{args.image}' (signed by {signers})")
    return 0


def _json_entries(report: VerifyReport, local: bool) -> list[dict[str, object]]:
    """One ``Signer`` entry per verified object, as Apptainer's ``verify --json`` lists them."""
    entries: list[dict[str, object]] = []
    for result in report.verified:
        pgp = result.key.scheme == "pgp"
        for od in result.objects:
            kind = od.datatype.label if hasattr(od.datatype, "label") else hex(od.datatype)
            signer = {
                "Partition": kind,
                "Name": (result.key.uid or result.key.name) if pgp else "unknown",
                "Fingerprint": result.key.fingerprint.lower() if pgp else "",
                "KeyLocal": local,
                "KeyCheck": local,
                "DataCheck": True,
            }
            entries.append({"Signer": signer})
    return entries


def _print_verified(report: VerifyReport) -> None:
    """Apptainer's table of the objects each verified signature covers."""
    for result in report.verified:
        key = result.key
        if key.scheme == "pgp":  # Apptainer names the signer of OpenPGP signatures only
            print(f"{'[LOCAL]':<18} Signing entity: {key.uid or key.name}")
            print(f"{'[LOCAL]':<18} Fingerprint: {key.fingerprint}")
        print("Objects verified:")
        print(f"{'ID':<4}|{'GROUP':<8}|{'LINK':<8}|TYPE")
        print("-" * 48)
        for od in result.objects:
            group = str(od.group_id) if od.group_id else "NONE"
            link = f"{od.link_id} (G)" if od.link_is_group else (str(od.link_id) if od.link_id else "NONE")
            kind = od.datatype.label if hasattr(od.datatype, "label") else hex(od.datatype)
            print(f"{od.id:<4}|{group:<8}|{link:<8}|{kind}")
