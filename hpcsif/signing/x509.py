"""X.509 certificates as DSSE verification keys (Apptainer's ``verify --certificate …``).

The certificate's public key checks the DSSE signatures; the certificate itself must chain,
through the given intermediates, to one of the given roots (default: the system's CA bundle),
be valid now at every link, and, where it lists extended key usages, allow code signing, as
Apptainer requires. Online revocation checks (OCSP) need the network and are not done.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from hpcsif.errors import SignatureError
from hpcsif.signing import dsse
from hpcsif.signing.keys import KeyInfo, algorithm_of

#: where Debian and most distributions keep the system's trusted root certificates
SYSTEM_ROOTS = Path("/etc/ssl/certs/ca-certificates.crt")


def _load(path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise SignatureError(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SignatureError(f"{what} {path} holds no PEM certificate: {exc}") from None
    return certs


def certificate_key(
    certificate: Path, intermediates: Path | None = None, roots: Path | None = None
) -> KeyInfo:
    """The verification key of the leaf certificate in *certificate*, once its chain checks out.

    Raises :class:`SignatureError` naming why the chain is not trusted.
    """
    leaf = _load(certificate, "certificate")[0]
    pool = _load(intermediates, "intermediate certificates") if intermediates else []
    trusted = _load(roots or SYSTEM_ROOTS, "root certificates")
    policy = verification.ExtensionPolicy.permit_all()
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(trusted))
        .time(datetime.datetime.now(datetime.UTC))
        .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, pool)
    except verification.VerificationError as exc:
        raise SignatureError(f"certificate {certificate} is not trusted: {exc}") from None
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.CODE_SIGNING not in usages:
        raise SignatureError(f"certificate {certificate} is not trusted: it does not allow code signing")
    public = leaf.public_key()
    if not isinstance(public, dsse.PublicKey):
        raise SignatureError(f"certificate {certificate}: unsupported key type {type(public).__name__}")
    subject = leaf.subject.rfc4514_string()
    return KeyInfo(
        subject or certificate.name, "dsse", dsse.key_id(public), algorithm_of(public), certificate
    )
