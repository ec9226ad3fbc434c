"""DSSE envelopes over SIF metadata, as ``apptainer sign --key KEY.pem`` writes them.

The envelope is the JSON of the DSSE spec (secure-systems-lab/dsse)::

    {"payloadType":"application/vnd.sylabs.sif-metadata+json",
     "payload":"<base64 metadata JSON>",
     "signatures":[{"keyid":"SHA256:<OpenSSH fingerprint>","sig":"<base64 signature>"}]}

and each signature is made over the pre-authentication encoding
``DSSEv1 <len type> <type> <len body> <body>``: ECDSA (DER) and RSA PKCS#1 v1.5 with the hash
recorded in the signature descriptor (SHA-256 by default), Ed25519 over the message itself, as
sigstore's signers do. All cryptography is done by the ``cryptography`` package.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from hpcsif.errors import SignatureError
from hpcsif.sif.format import HashType

PAYLOAD_TYPE = "application/vnd.sylabs.sif-metadata+json"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_HASHES: dict[HashType, type[hashes.HashAlgorithm]] = {
    HashType.SHA256: hashes.SHA256,
    HashType.SHA384: hashes.SHA384,
    HashType.SHA512: hashes.SHA512,
}


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE pre-authentication encoding of *body*."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def key_id(public_key: PublicKey) -> str:
    """``SHA256:…``: the OpenSSH fingerprint sigstore uses as DSSE key id."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _check_key_type(key: object) -> None:
    if not isinstance(key, PrivateKey | PublicKey):
        raise SignatureError(f"unsupported key type {type(key).__name__} (use an ECDSA, RSA or Ed25519 key)")


def sign_envelope(private_key: PrivateKey, payload: bytes, hashtype: HashType = HashType.SHA256) -> bytes:
    """The DSSE envelope (JSON bytes) signing *payload* with *private_key*."""
    _check_key_type(private_key)
    message = pae(PAYLOAD_TYPE, payload)
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        sig = private_key.sign(message)
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        sig = private_key.sign(message, ec.ECDSA(_HASHES[hashtype]()))
    else:
        sig = private_key.sign(message, padding.PKCS1v15(), _HASHES[hashtype]())
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(sig).decode()}],
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def is_envelope(data: bytes) -> bool:
    """True if *data* is a DSSE envelope carrying SIF metadata."""
    try:
        return json.loads(data).get("payloadType") == PAYLOAD_TYPE
    except (ValueError, AttributeError):
        return False


def _verify_one(public_key: PublicKey, sig: bytes, message: bytes, hashtype: HashType) -> bool:
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(sig, message)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(sig, message, ec.ECDSA(_HASHES[hashtype]()))
        else:
            public_key.verify(sig, message, padding.PKCS1v15(), _HASHES[hashtype]())
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False
    return True


def _b64(text: str) -> bytes:
    """Standard or URL-safe base64, as the DSSE spec allows."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        try:
            return base64.urlsafe_b64decode(text)
        except (binascii.Error, ValueError):
            raise SignatureError("DSSE envelope holds malformed base64") from None


@dataclass
class Opened:
    """A verified envelope: its payload and the key that signed it."""

    payload: bytes
    key: PublicKey
    key_id: str


def open_envelope(data: bytes, public_keys: list[PublicKey], hashtype: HashType | int) -> Opened | None:
    """Verify the envelope *data* with any of *public_keys*; returns None if none of them signed it.

    Raises :class:`SignatureError` for a malformed envelope or an unsupported hash type.
    """
    if hashtype not in _HASHES:
        raise SignatureError(f"unsupported signature hash type {hashtype!r}")
    try:
        env = json.loads(data)
        payload_type, payload = env["payloadType"], env["payload"]
        sigs = [(s.get("keyid", ""), s["sig"]) for s in env["signatures"]]
    except (ValueError, KeyError, TypeError):
        raise SignatureError("malformed DSSE envelope") from None
    if payload_type != PAYLOAD_TYPE:
        raise SignatureError(f"DSSE envelope has unexpected payload type {payload_type!r}")
    body = _b64(payload)
    message = pae(payload_type, body)
    for kid, sig in sigs:
        raw = _b64(sig)
        for key in public_keys:
            this_id = key_id(key)
            if kid and kid != this_id:
                continue
            if _verify_one(key, raw, message, HashType(hashtype)):
                return Opened(body, key, this_id)
    return None
