"""OpenPGP clear-signed SIF metadata (Apptainer's default ``apptainer sign``), through GnuPG.

Every operation runs ``gpg`` (Debian package ``gnupg``) in a throw-away home directory holding
only the keys it is given, so the user's own GnuPG state is never read or changed and nothing
lingers: an agent started for a secret-key operation is stopped before the directory goes.
Signatures use SHA-256, as Apptainer's signer does, and the signature descriptor records the
signer's primary-key fingerprint, which Apptainer checks against the verifying key.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hpcsif.errors import MissingToolError, SignatureError

BEGIN_SIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
_ARMOR = re.compile(rb"-----BEGIN PGP (PUBLIC|PRIVATE) KEY BLOCK-----")


def is_clearsigned(data: bytes) -> bool:
    """True if *data* is an OpenPGP clear-signed message."""
    return data.lstrip().startswith(BEGIN_SIGNED)


def cleartext(data: bytes) -> bytes:
    """The (unverified) signed text of a clear-signed message, dash-escaping removed."""
    body = data.split(b"\n\n", 1)[1] if b"\n\n" in data else b""
    body = body.split(b"\n-----BEGIN PGP SIGNATURE-----", 1)[0]
    return b"\n".join(line[2:] if line.startswith(b"- ") else line for line in body.split(b"\n"))


def is_legacy(data: bytes) -> bool:
    """True for pre-1.1 Apptainer/Singularity signatures (a bare ``SIFHASH`` digest, not metadata)."""
    return is_clearsigned(data) and cleartext(data).startswith(b"SIFHASH:\n")


def is_pgp_key(data: bytes) -> bool:
    """True if *data* is an OpenPGP key: an armored block, or binary (e.g. Apptainer's ``pgp-public``)."""
    if _ARMOR.search(data):
        return True
    if not data or not data[0] & 0x80:
        return False
    # binary packets: the first one of a key (ring) is a public-key (6) or secret-key (5) packet
    tag = data[0] & 0x3F if data[0] & 0x40 else (data[0] >> 2) & 0x0F
    return tag in (5, 6)


@dataclass(frozen=True)
class PGPKey:
    """An OpenPGP key as ``gpg --show-keys`` describes it."""

    fingerprint: str  # 40 upper-case hex digits of the primary key
    uid: str
    algorithm: str
    secret: bool


def _gpg_exe() -> str:
    exe = shutil.which("gpg")
    if exe is None:
        raise MissingToolError("gpg", "gnupg", "needed for OpenPGP signatures")
    return exe


@contextmanager
def _home() -> Iterator[Path]:
    """A private, empty GnuPG home (short path: the agent's socket lives there)."""
    # the agent's socket path must fit in 108 bytes: fall back to /tmp under a deep $TMPDIR
    base = tempfile.gettempdir()
    home = Path(tempfile.mkdtemp(prefix="hpcsif-gpg-", dir=base if len(base) <= 64 else "/tmp"))
    try:
        yield home
    finally:
        gpgconf = shutil.which("gpgconf")
        if gpgconf:  # stop the agent a secret-key operation started (its socket may live in /run)
            subprocess.run(
                [gpgconf, "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, check=False
            )
        shutil.rmtree(home, ignore_errors=True)


# As Apptainer does, trust a key and its signatures whatever the clocks said: a signing host's
# clock may run ahead (its key then looks "created in the future" and gpg drops its user IDs
# on import), and a key made a moment before it signs may look newer than the signature.
_CLOCKS = ("--ignore-time-conflict", "--ignore-valid-from")


def _run(home: Path, args: list[str], data: bytes | None = None, what: str = "gpg") -> bytes:
    """Run gpg in *home*; returns stdout, raises :class:`SignatureError` with gpg's message on failure."""
    cmd = [_gpg_exe(), "--homedir", str(home), "--batch", "--no-tty", "--pinentry-mode", "loopback"]
    proc = subprocess.run([*cmd, *_CLOCKS, *args], input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SignatureError(f"{what} failed: {msg[-1] if msg else f'gpg exited {proc.returncode}'}")
    return proc.stdout


_ALGOS = {"1": "rsa", "17": "dsa", "19": "ecdsa", "22": "eddsa"}


def describe_keys(data: bytes) -> list[PGPKey]:
    """The keys in the armored key block *data* (public or secret), without importing them."""
    with _home() as home:
        out = _run(home, ["--with-colons", "--show-keys"], data, "reading OpenPGP key").decode()
    keys: list[PGPKey] = []
    current: dict[str, str] = {}
    for line in out.splitlines():
        f = line.split(":")
        if f[0] in ("pub", "sec"):
            if current:
                keys.append(PGPKey(**current))  # type: ignore[arg-type]
            bits = f[2]
            current = {"fingerprint": "", "uid": "", "algorithm": f"{_ALGOS.get(f[3], 'pgp')}{bits}"}
            current["secret"] = f[0] == "sec"  # type: ignore[assignment]
        elif f[0] == "fpr" and current and not current["fingerprint"]:
            current["fingerprint"] = f[9].upper()
        elif f[0] == "uid" and current and not current["uid"]:
            current["uid"] = f[9].replace("\\x3a", ":")
    if current:
        keys.append(PGPKey(**current))  # type: ignore[arg-type]
    if not keys:
        raise SignatureError("no OpenPGP key found in the key block")
    return keys


def generate(uid: str, algorithm: str = "ed25519") -> tuple[bytes, bytes, PGPKey]:
    """A new signing key for *uid*: (armored secret key, armored public key, description).

    *algorithm* is a gpg algorithm name: ``ed25519`` (default) or ``rsaBITS`` (``rsa4096``).
    """
    with _home() as home:
        args = ["--passphrase", "", "--quick-gen-key", uid, algorithm, "sign", "never"]
        _run(home, args, what="gpg key")
        secret = _run(home, ["--passphrase", "", "--armor", "--export-secret-keys"], what="gpg export")
        public = _run(home, ["--armor", "--export"], what="gpg export")
    return secret, public, describe_keys(public)[0]


def public_from_secret(secret: bytes) -> bytes:
    """The armored public key of an armored (unprotected) secret key."""
    with _home() as home:
        _run(home, ["--passphrase", "", "--import"], secret, "importing OpenPGP key")
        return _run(home, ["--armor", "--export"], what="gpg export")


def is_protected(secret: bytes) -> bool:
    """True if a secret key in *secret* is encrypted with a passphrase (Apptainer's keys usually are)."""
    with _home() as home:
        packets = _run(home, ["--list-packets"], secret, "reading OpenPGP key")
    return re.search(rb"^\s+skey\[\d+\]: \[v\d protected\]", packets, re.M) is not None


def clearsign(secret: bytes, fingerprint: str, message: bytes, passphrase: str = "") -> bytes:
    """Clear-sign *message* (SHA-256) with the armored or binary secret key *secret*.

    *passphrase* unlocks a protected key; it reaches gpg through a file in the private home,
    never the command line (which other users may read).
    """
    with _home() as home:
        _run(home, ["--passphrase", "", "--import"], secret, "importing OpenPGP key")
        pass_file = home / "passphrase"
        pass_file.touch(mode=0o600)
        pass_file.write_text(passphrase)
        args = ["--passphrase-file", str(pass_file), "--local-user", fingerprint, "--digest-algo", "SHA256"]
        try:
            return _run(home, [*args, "--clearsign"], message, "OpenPGP signing")
        except SignatureError as exc:
            if "Bad passphrase" in str(exc) or "No passphrase given" in str(exc):
                raise SignatureError(
                    f"OpenPGP key {fingerprint}: {'wrong passphrase' if passphrase else 'passphrase needed'}"
                ) from None
            raise


def verify(signed: bytes, public_keys: list[bytes]) -> tuple[bytes, str] | None:
    """Check the clear-signed *signed* against *public_keys* (armored blocks).

    Returns (signed text, primary-key fingerprint), or None when none of the keys made the
    signature; raises :class:`SignatureError` when the signature itself is bad.
    """
    if not public_keys:
        return None
    with _home() as home:
        for key in public_keys:  # one by one: armored and binary blocks do not concatenate
            _run(home, ["--import"], key, "importing OpenPGP keys")
        cmd = [_gpg_exe(), "--homedir", str(home), "--batch", "--no-tty", *_CLOCKS]
        cmd += ["--status-fd", "2", "--decrypt"]
        proc = subprocess.run(cmd, input=signed, capture_output=True, check=False)
    status = proc.stderr.decode(errors="replace")
    valid = re.search(r"^\[GNUPG:\] VALIDSIG (?:\S+ ){9}([0-9A-F]{40})", status, re.M)
    if proc.returncode == 0 and valid:
        return proc.stdout, valid.group(1)
    if re.search(r"^\[GNUPG:\] (NO_PUBKEY|ERRSIG \S+ \S+ \S+ \S+ \S+ 9)\b", status, re.M):
        return None
    raise SignatureError(f"OpenPGP signature not valid ({_why_invalid(status)})")


_VERDICTS = {
    "BADSIG": "BAD signature",
    "EXPKEYSIG": "made by an expired key",
    "REVKEYSIG": "made by a revoked key",
}


def _why_invalid(status: str) -> str:
    """gpg's reason for rejecting a signature, from its status and messages."""
    verdict = re.search(r"^\[GNUPG:\] (BADSIG|EXPKEYSIG|REVKEYSIG)\b", status, re.M)
    if verdict:
        return _VERDICTS[verdict.group(1)]
    # otherwise gpg's own last word (e.g. a key newer than the signature, a clock problem)
    said = [line[5:].strip() for line in status.splitlines() if line.startswith("gpg: ")]
    return said[-1] if said else "gpg could not check it"
