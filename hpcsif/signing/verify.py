"""Verify the signatures of a SIF image, and the admin policy "only signed images".

Verification follows Apptainer: every non-signature object must belong to an object group;
every group needs at least one (non-legacy) signature linked to it; each signature must be
valid and its metadata must match the header, every descriptor and every object of the group
exactly. As in ``apptainer verify``, a signature by a key not given fails verification (an
image signed by two keys verifies only with both); the ``cache.require_signed`` policy instead
skips such a signature, as long as each group has one by a trusted key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hpcsif.config import Config
from hpcsif.errors import ConfigError, SIFError, SignatureError
from hpcsif.sif.format import DataType, Descriptor
from hpcsif.sif.reader import SIFImage
from hpcsif.signing import dsse, pgp
from hpcsif.signing.keys import KeyInfo, Keyring, describe_file
from hpcsif.signing.metadata import (
    Digester,
    check_metadata,
    describe,
    group_ids,
    group_label,
    holds_system_partition,
)
from hpcsif.signing.policy import require_trusted

log = logging.getLogger(__name__)

__all__ = [
    "VerifyReport",
    "keys_from_paths",
    "require_trusted",
    "trusted_keys",
    "verify_image",
    "verify_trusted",
]

#: key files looked for in a directory named in cache.trusted_keys
_KEY_SUFFIXES = (".pub", ".pem", ".asc", ".gpg")
#: a DSSE key id (OpenSSH SHA256 fingerprint) or an OpenPGP fingerprint / long key id
_FINGERPRINT = re.compile(r"^(SHA256:[A-Za-z0-9+/]{43}|[0-9A-Fa-f ]{16,50})$")


@dataclass
class SignatureResult:
    """One verified signature."""

    signature: Descriptor
    group_id: int
    key: KeyInfo
    objects: list[Descriptor]


@dataclass
class VerifyReport:
    """What :func:`verify_image` found."""

    path: Path
    verified: list[SignatureResult] = field(default_factory=list)
    #: signatures skipped: (descriptor, why) — unknown signer or legacy format
    skipped: list[tuple[Descriptor, str]] = field(default_factory=list)


class VerificationFailed(SignatureError):
    """Verification failed; :attr:`report` holds the signatures verified before the failure
    (Apptainer's ``verify`` prints them before its error)."""

    report: VerifyReport | None = None
    #: the signature being checked when it failed (None: the failure is not a signature's)
    signature: Descriptor | None = None

    @property
    def reason(self) -> str:
        """The message without its ``verification failed:`` and ``integrity:`` prefixes."""
        return str(self).removeprefix("verification failed: ").removeprefix("integrity: ")


def _fail(message: str) -> VerificationFailed:
    return VerificationFailed(f"verification failed: {message}")


def _unknown_pgp_signer(fpr: str) -> str:
    # Apptainer's words (Go's openpgp package), then which key it was
    return f"openpgp: signature made by unknown entity (key {fpr}, which is not among the keys given)"


def _check_signature(
    img: SIFImage,
    sig: Descriptor,
    group: int,
    keys: list[KeyInfo],
    digester: Digester,
    required: list[Descriptor] | None,
) -> SignatureResult | str:
    """Verify *sig*; returns its result, or why it was skipped; raises when it is invalid."""
    data = img.read_object(sig)
    where = f"signature {describe(sig)}"
    if dsse.is_envelope(data):
        pems = [k for k in keys if k.scheme == "dsse"]
        try:
            opened = dsse.open_envelope(data, [k.public_pem() for k in pems], sig.hashtype or 0)
        except SignatureError as exc:
            raise _fail(f"{where}: {exc}") from None
        if opened is None:
            return "DSSE signature by a key not given (import the signer's public key or pass --key)"
        signer = next(k for k in pems if k.matches(opened.key_id))  # open_envelope used only these keys
        payload = opened.payload
    elif pgp.is_clearsigned(data):
        pgps = [k for k in keys if k.scheme == "pgp"]
        try:
            checked = pgp.verify(data, [k.public_bytes() for k in pgps])
        except SignatureError as exc:
            raise _fail(f"{where}: {exc}") from None
        if checked is None:
            return _unknown_pgp_signer(sig.entity.hex().upper() if sig.entity else "unknown")
        payload, fpr = checked
        if sig.entity and sig.entity.hex().upper() != fpr:
            raise _fail(f"{where}: fingerprint in descriptor does not correspond to signing entity")
        signer = next((k for k in pgps if k.matches(fpr)), None)
        if signer is None:  # a key that shares a keyring file with a given one, but was not given
            return _unknown_pgp_signer(fpr)
    else:
        raise _fail(f"{where}: signature format not recognized")
    try:
        objects = check_metadata(img, group, payload, digester, required)
    except SignatureError as exc:
        raise _fail(f"{exc} (signed by {signer.label})") from None
    return SignatureResult(sig, group, signer, objects)


def _targets(
    img: SIFImage, group_id: int | None, object_id: int | None
) -> list[tuple[int, list[Descriptor] | None]]:
    """(group, objects that must be covered or None for all) to verify, as Apptainer selects them:
    with both a group and an object, the group, then the object (each checked on its own)."""
    targets: list[tuple[int, list[Descriptor] | None]] = []
    groups = group_ids(img)
    if group_id is not None:
        if group_id not in groups:
            raise _fail(f"integrity: group {group_id} not found")
        targets.append((group_id, None))
    if object_id is not None:
        desc = next((d for d in img.descriptors if d.id == object_id), None)
        if desc is None or not desc.group_id:
            raise _fail(f"integrity: object {object_id} not found in an object group")
        targets.append((desc.group_id, [desc]))
    if targets:
        return targets
    for desc in img.descriptors:
        if desc.group_id == 0 and desc.datatype != DataType.SIGNATURE:
            raise _fail(f"{describe(desc)} is not in an object group, so no signature can cover it")
    if not groups:
        raise _fail(f"{img.path}: the image has no object groups")
    return [(group, None) for group in groups]


def verify_image(
    path: str | os.PathLike,
    keys: list[KeyInfo],
    group_id: int | None = None,
    object_id: int | None = None,
    skip_unknown_signers: bool = False,
) -> VerifyReport:
    """Verify every object group of the SIF at *path* against the public *keys*.

    *group_id* limits the check to one group, *object_id* to one object (some signature of its
    group must cover it), as Apptainer's ``verify --group-id/--sif-id``. Raises
    :class:`SignatureError` ("verification failed: …") naming the group without a signature,
    the invalid signature, the signature by a key not in *keys*, or the header/descriptor/object
    that changed. With *skip_unknown_signers*, a signature by a key not in *keys* is listed in
    :attr:`VerifyReport.skipped` instead, and only a group none of whose signatures can be
    checked fails.
    """
    report = VerifyReport(Path(path))
    try:
        _verify_groups(report, keys, group_id, object_id, skip_unknown_signers)
    except VerificationFailed as exc:
        exc.report = report
        raise
    return report


def _verify_groups(
    report: VerifyReport,
    keys: list[KeyInfo],
    group_id: int | None,
    object_id: int | None,
    skip_unknown_signers: bool,
) -> None:
    """:func:`verify_image`'s work, adding to *report* as it goes."""
    with SIFImage.open(report.path) as img:
        digester = Digester(img)
        for group, required in _targets(img, group_id, object_id):
            linked = [d for d in img.find(DataType.SIGNATURE) if d.link_is_group and d.link_id == group]
            legacy = {d.id for d in linked if pgp.is_legacy(img.read_object(d))}
            report.skipped += [
                (d, "legacy (pre-1.1) signature, not checked") for d in linked if d.id in legacy
            ]
            sigs = [d for d in linked if d.id not in legacy]
            if not sigs:
                what = "system partition" if holds_system_partition(img, group) else f"object group {group}"
                raise _fail(
                    f"integrity: signature not found for object group {group}: no signatures found for {what}"
                )
            checked = 0
            for sig in sigs:
                try:
                    result = _check_signature(img, sig, group, keys, digester, required)
                    if isinstance(result, str) and not skip_unknown_signers:
                        raise _fail(f"signature object {sig.id} not valid: {result}")
                except VerificationFailed as exc:
                    exc.signature = sig
                    raise
                if isinstance(result, str):
                    report.skipped.append((sig, result))
                else:
                    report.verified.append(result)
                    checked += 1
            if not checked:
                reasons = "; ".join(why for d, why in report.skipped if d in sigs)
                raise _fail(f"{group_label(img, group)}: no signature could be checked: {reasons}")


def keys_from_paths(paths: list[str | os.PathLike]) -> list[KeyInfo]:
    """Describe the key files in *paths* (files, or directories holding ``*.pub``/``*.pem``/``*.asc``)."""
    keys = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.suffix in _KEY_SUFFIXES and p.is_file())
            keys += [describe_file(p) for p in files]
        else:
            keys.append(describe_file(entry))
    return keys


def trusted_keys(config: Config) -> list[KeyInfo]:
    """The keys named by ``cache.trusted_keys``: key files, directories of them, or fingerprints.

    A fingerprint (``SHA256:…`` for PEM keys, 40 hex digits for OpenPGP keys) must match a
    key in one of the listed files or in the keyring; an entry that resolves to nothing is a
    :class:`ConfigError`, so a typo never silently trusts nothing or everything.
    """
    entries = config.get("cache.trusted_keys") or []
    if isinstance(entries, str):
        entries = [entries]
    fingerprints = [e for e in entries if _FINGERPRINT.fullmatch(e)]
    paths = [e for e in entries if e not in fingerprints]
    try:
        keys = keys_from_paths(paths)
    except SignatureError as exc:
        raise ConfigError(f"cache.trusted_keys: {exc}") from None
    for fpr in fingerprints:
        if any(k.matches(fpr) for k in keys):
            continue
        try:
            key = Keyring().get(fpr)
            # vouch for this key only, even if its file (an OpenPGP keyring) holds others
            want = fpr.upper().replace(" ", "")
            full = next(f for f in (key.fingerprint, *key.fingerprints) if f.upper().endswith(want))
            keys.append(dataclasses.replace(key, fingerprint=full, fingerprints=()))
        except SignatureError:
            raise ConfigError(
                f"cache.trusted_keys: key {fpr!r} is neither a key file nor in keyring {Keyring().root}"
            ) from None
    return keys


def verify_trusted(sif_path: str | os.PathLike, config: Config) -> VerifyReport:
    """Verify *sif_path* against ``cache.trusted_keys`` only; :class:`SignatureError` if it fails.

    The policy check itself is :func:`hpcsif.signing.policy.require_trusted`.
    """
    keys = trusted_keys(config)
    if not keys:
        raise SignatureError(
            f"{sif_path}: cache.require_signed is set but cache.trusted_keys names no key: refusing the image"
        )
    if os.path.isdir(sif_path):
        raise SignatureError(
            f"{sif_path}: a sandbox directory cannot be signed, and cache.require_signed allows only "
            "signed SIF images"
        )
    try:
        report = verify_image(sif_path, keys, skip_unknown_signers=True)
    except (SignatureError, SIFError) as exc:
        raise SignatureError(
            f"{sif_path}: not signed by a trusted key (cache.require_signed): {exc}"
        ) from None
    signers = ", ".join(sorted({r.key.label for r in report.verified}))
    log.info("%s: signed by trusted key(s) %s", sif_path, signers)
    return report


def warn_unverified_base(sif_path: str | os.PathLike) -> None:
    """As Apptainer's build from a local SIF: a signed base that does not verify against the
    local keyring is still built from, with its two warnings; an unsigned one, silently."""
    from hpcsif.signing.keys import Keyring

    with SIFImage.open(sif_path) as img:
        if not img.find(DataType.SIGNATURE):
            return
    try:
        verify_image(sif_path, Keyring().list())
    except (SignatureError, SIFError) as exc:
        reason = str(exc).removeprefix("verification failed: ")
        log.warning("%s", reason if reason.startswith("integrity: ") else f"integrity: {reason}")
        log.warning("Bootstrap image could not be verified, but build will continue.")
