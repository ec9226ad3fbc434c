"""The user's signing keyring: PEM key pairs (DSSE signatures) and OpenPGP keys.

Layout of the keyring directory (``$HPCSIF_KEYSDIR``, else ``$XDG_CONFIG_HOME/hpcsif/keys``
or ``~/.config/hpcsif/keys``; mode 0700)::

    NAME.pub      public key: PEM ``PUBLIC KEY`` or an armored OpenPGP public key block
    NAME.key      private key (mode 0600): PKCS#8 PEM, or an armored OpenPGP secret key;
                  alone (NAME.pub removed by ``key remove``) it still signs, and verifies nothing
    default       the NAME used by ``hpcsif sign`` when no key is named

Every file is written atomically (temp file, fsync, rename), private keys with mode 0600 from
the moment they exist. Key material is never logged.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hpcsif.errors import SignatureError, UsageError
from hpcsif.signing import dsse, pgp

log = logging.getLogger(__name__)

#: algorithms ``key newpair`` can create
ALGORITHMS = ("ed25519", "ecdsa-p256", "ecdsa-p384", "rsa-3072", "rsa-4096", "pgp")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")


def keys_dir() -> Path:
    """The keyring directory (not created)."""
    if os.environ.get("HPCSIF_KEYSDIR"):
        return Path(os.path.expanduser(os.environ["HPCSIF_KEYSDIR"]))
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hpcsif" / "keys"


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write *data* to *path* atomically, the file having *mode* from creation on."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def algorithm_of(key: dsse.PublicKey | dsse.PrivateKey) -> str:
    """``ed25519``, ``ecdsa-p256``, ``rsa-3072`` … for a PEM key."""
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"ecdsa-p{key.curve.key_size}"
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def load_pem_private(data: bytes, source: str) -> dsse.PrivateKey:
    """Parse an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC 1)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError(
            f"{source}: encrypted private keys are not supported (decrypt it: openssl pkey -in KEY -out NEW)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{source}: not a PEM private key ({exc})") from None
    if not isinstance(key, dsse.PrivateKey):
        raise _unsupported(key, source)
    return key


def _unsupported(key: object, source: str) -> SignatureError:
    """The error for a key of an algorithm DSSE signing does not support."""
    return SignatureError(f"{source}: unsupported key type {type(key).__name__} (use ECDSA, RSA or Ed25519)")


def load_pem_public(data: bytes, source: str) -> dsse.PublicKey:
    """Parse a PEM public key (``PUBLIC KEY``/``RSA PUBLIC KEY``), the public half of a private key,
    or the key of a PEM certificate (checked by :mod:`hpcsif.signing.x509` before use)."""
    if b"PRIVATE KEY-----" in data:
        return load_pem_private(data, source).public_key()
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{source}: not a PEM public key ({exc})") from None
    if not isinstance(key, dsse.PublicKey):
        raise _unsupported(key, source)
    return key


def _pem_public_bytes(key: dsse.PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class KeyInfo:
    """One key of the keyring (or a key file given on the command line)."""

    name: str
    scheme: str  # "dsse" (PEM key) or "pgp"
    fingerprint: str  # DSSE: "SHA256:…" (OpenSSH style, the DSSE key id); PGP: 40 hex digits
    algorithm: str
    public_path: Path
    private_path: Path | None = None
    uid: str = ""  # OpenPGP user id
    #: every primary-key fingerprint in the file (an OpenPGP keyring file can hold several)
    fingerprints: tuple[str, ...] = ()

    def matches(self, fingerprint: str) -> bool:
        """True if *fingerprint* is this key's or one in its file (PGP: also a 16-digit long key id)."""
        want = fingerprint.upper().replace(" ", "")
        mine = [f.upper() for f in (self.fingerprint, *self.fingerprints)]
        long_id = self.scheme == "pgp" and len(want) >= 16
        return any(f == want or (long_id and f.endswith(want)) for f in mine)

    @property
    def has_public(self) -> bool:
        """False for a private key whose public key was removed from the keyring (its one file
        is the private key)."""
        return self.public_path != self.private_path

    @property
    def label(self) -> str:
        """``NAME (FINGERPRINT)`` for messages."""
        return f"{self.name} ({self.fingerprint})"

    def public_pem(self) -> dsse.PublicKey:
        """The public key of a DSSE key."""
        return load_pem_public(self.public_path.read_bytes(), str(self.public_path))

    def public_bytes(self) -> bytes:
        """The public key file's content."""
        return self.public_path.read_bytes()


def describe_file(path: Path, name: str = "") -> KeyInfo:
    """Describe the key in *path* (PEM public/private key or armored OpenPGP key)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read key {path}: {exc.strerror}") from None
    name = name or re.sub(r"(\.(pub|key|pem|asc|gpg|bin))+$", "", path.name)
    if pgp.is_pgp_key(data):
        first, *more = pgp.describe_keys(data)
        private = path if first.secret else None
        others = tuple(k.fingerprint for k in more)
        return KeyInfo(name, "pgp", first.fingerprint, first.algorithm, path, private, first.uid, others)
    private = b"PRIVATE KEY-----" in data
    pub = load_pem_public(data, str(path))
    return KeyInfo(name, "dsse", dsse.key_id(pub), algorithm_of(pub), path, path if private else None)


class Keyring:
    """The key files under :func:`keys_dir` (or *root*)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else keys_dir()

    def _ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def list(self) -> list[KeyInfo]:
        """Every key pair or public key, by name."""
        if not self.root.is_dir():
            return []
        keys = []
        for pub in sorted(self.root.glob("*.pub")):
            name = pub.name.removesuffix(".pub")
            info = describe_file(pub, name)
            private = self.root / f"{name}.key"
            keys.append(
                KeyInfo(
                    info.name,
                    info.scheme,
                    info.fingerprint,
                    info.algorithm,
                    pub,
                    private if private.exists() else None,
                    info.uid,
                    info.fingerprints,
                )
            )
        return keys

    def secret_keys(self) -> list[KeyInfo]:
        """Every private key, by name: those of key pairs, and those whose public key was
        removed (``key remove`` removes only the public key, as Apptainer's): such a key
        still signs, and verifies nothing, as it is not in :meth:`list`."""
        if not self.root.is_dir():
            return []
        public = {k.name: k for k in self.list()}
        keys = []
        for path in sorted(self.root.glob("*.key")):
            name = path.name.removesuffix(".key")
            keys.append(public.get(name) or describe_file(path, name))
        return keys

    def get(self, ref: str) -> KeyInfo:
        """The key named *ref*, or whose fingerprint is *ref* (PGP: also its last 16 digits)."""
        for key in self.list() + [k for k in self.secret_keys() if not k.has_public]:
            if ref == key.name or key.matches(ref):
                return key
        raise SignatureError(f"no key {ref!r} in keyring {self.root} (see: hpcsif key list)")

    def default_name(self) -> str | None:
        """The name recorded as default signing key, if any."""
        try:
            return (self.root / "default").read_text().strip() or None
        except OSError:
            return None

    def set_default(self, name: str) -> None:
        """Make *name* the default signing key."""
        key = self.get(name)
        if key.private_path is None:
            raise SignatureError(f"key {key.label} has no private key: it cannot sign")
        atomic_write(self.root / "default", f"{key.name}\n".encode(), 0o600)

    def signing_key(self, ref: str | None = None) -> KeyInfo:
        """The private key to sign with: *ref*, else the default, else the only private key."""
        if ref:
            key = self.get(ref)
        else:
            private = self.secret_keys()
            default = self.default_name()
            chosen = [k for k in private if k.name == default] or (private if len(private) == 1 else [])
            if not chosen:
                if not private:
                    raise SignatureError(
                        f"no private key in keyring {self.root} (create one: hpcsif key newpair, "
                        "or sign with --key FILE)"
                    )
                names = ", ".join(k.name for k in private)
                raise UsageError(
                    f"several private keys ({names}): choose one with -k/--keyidx, --keyname or 'key default'"
                )
            key = chosen[0]
        if key.private_path is None:
            raise SignatureError(f"key {key.label} has no private key: it cannot sign")
        return key

    def _free_name(self, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise UsageError(f"invalid key name {name!r} (letters, digits and ._@+- only)")
        if (self.root / f"{name}.pub").exists() or (self.root / f"{name}.key").exists():
            raise SignatureError(f"a key named {name!r} already exists in {self.root}")
        return name

    def _store(self, name: str, public: bytes, private: bytes | None) -> KeyInfo:
        self._ensure()
        if private is not None:
            atomic_write(self.root / f"{name}.key", private, 0o600)
        atomic_write(self.root / f"{name}.pub", public, 0o644)
        key = self.get(name)
        if private is not None and self.default_name() is None:
            self.set_default(name)
        log.info("stored key %s in %s", key.label, self.root)
        return key

    def newpair(
        self, name: str, algorithm: str = "ed25519", uid: str = "", bits: int | None = None
    ) -> KeyInfo:
        """Create a key pair called *name* (see :data:`ALGORITHMS`); PGP keys get user id *uid*.

        *bits* makes a PGP key an RSA key of that length (Apptainer's ``--bit-length``).
        """
        name = self._free_name(name)
        if algorithm == "pgp":
            secret, public, _ = pgp.generate(uid or name, f"rsa{bits}" if bits else "ed25519")
            return self._store(name, public, secret)
        if algorithm == "ed25519":
            key: dsse.PrivateKey = ed25519.Ed25519PrivateKey.generate()
        elif algorithm in ("ecdsa-p256", "ecdsa-p384"):
            key = ec.generate_private_key(ec.SECP256R1() if algorithm.endswith("256") else ec.SECP384R1())
        elif algorithm in ("rsa-3072", "rsa-4096"):
            key = rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[4:]))
        else:
            raise UsageError(f"unknown key algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self._store(name, _pem_public_bytes(key.public_key()), private)

    def import_file(self, path: Path, name: str = "") -> KeyInfo:
        """Add the key in *path* (PEM private/public key or armored OpenPGP key) as *name*."""
        info = describe_file(Path(path))
        # a key already here is not added twice under another name (as Apptainer's keyring);
        # the half it lacks (a private key, a removed public key) joins it
        known = self.list() + [k for k in self.secret_keys() if not k.has_public]
        same = next((k for k in known if k.fingerprint == info.fingerprint), None)
        if same is not None and (same.private_path if info.private_path else same.has_public):
            raise SignatureError(
                f"the key with fingerprint {info.fingerprint} already belongs to the keyring (as {same.name})"
            )
        name = same.name if same is not None else self._free_name(name or info.name)
        data = Path(path).read_bytes()
        if info.scheme == "pgp":
            public = pgp.public_from_secret(data) if info.private_path else data
            return self._store(name, public, data if info.private_path else None)
        if info.private_path:
            key = load_pem_private(data, str(path))
            private = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            return self._store(name, _pem_public_bytes(key.public_key()), private)
        return self._store(name, _pem_public_bytes(load_pem_public(data, str(path))), None)

    def export(self, ref: str, dest: Path, private: bool = False) -> Path:
        """Write key *ref* (its public half, or with *private* the private key, mode 0600) to *dest*."""
        key = self.get(ref)
        if private:
            if key.private_path is None:
                raise SignatureError(f"key {key.label} has no private key")
            atomic_write(Path(dest), key.private_path.read_bytes(), 0o600)
        elif not key.has_public:
            raise SignatureError(f"key {key.label} has no public key (it was removed); export --secret")
        else:
            atomic_write(Path(dest), key.public_bytes(), 0o644)
        return Path(dest)

    def remove(self, ref: str, which: str = "public") -> KeyInfo:
        """Delete key *ref*'s ``public`` key (as Apptainer's default: a key pair's private key
        stays, and signs), its ``secret`` key, or ``both``; removing the default signing key's
        private key clears the default."""
        key = self.get(ref)
        if which == "public" and not key.has_public:
            raise SignatureError(f"key {key.label} has no public key (it was removed)")
        if which == "secret" and key.private_path is None:
            raise SignatureError(f"key {key.label} has no private key")
        if which != "public" and key.private_path:
            key.private_path.unlink(missing_ok=True)
            if self.default_name() == key.name:
                (self.root / "default").unlink(missing_ok=True)
        if which != "secret" and key.has_public:
            key.public_path.unlink(missing_ok=True)
        return key
