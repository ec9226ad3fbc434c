"""Signatures interoperate with Apptainer 1.4 (``apptainer`` or ``peer-apptainer``), both ways.

DSSE (``sign --key`` / ``verify --key``) and OpenPGP (``apptainer sign`` with its keyring /
``verify --local``). Skipped where Apptainer is absent. Everything lives under pytest's
tmp_path in /tmp, which the peer sees at the same path; Apptainer's keyring is a temp dir
(``APPTAINER_KEYSDIR``), never the user's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcsif.errors import SignatureError
from hpcsif.sif.format import DataType
from hpcsif.sif.reader import SIFImage
from hpcsif.signing.keys import Keyring, describe_file
from hpcsif.signing.sign import sign_image
from hpcsif.signing.verify import verify_image
from tests.signing.conftest import needs_gpg

APPTAINER = shutil.which("apptainer") or shutil.which("peer-apptainer")
OCI_ARCHIVE = Path("/work/bench-images/busybox.oci-archive.tar")

pytestmark = [
    pytest.mark.peer,
    pytest.mark.slow,
    pytest.mark.skipif(APPTAINER is None, reason="neither apptainer nor peer-apptainer on PATH"),
]


@pytest.fixture
def apptainer(tmp_path: Path):
    """Run Apptainer with a private keyring; returns the completed process."""
    env = {**os.environ, "APPTAINER_KEYSDIR": str(tmp_path / "apptainer-keys")}

    def run(*args: str | Path, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(APPTAINER), *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            input=stdin,
            timeout=300,
            check=False,
        )
        if check and proc.returncode != 0:
            command = " ".join(map(str, args))
            raise AssertionError(f"apptainer {command} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def _flip_partition(sif: Path) -> None:
    with SIFImage.open(sif) as img:
        part = img.primary_partition()
    with open(sif, "r+b") as f:
        f.seek(part.offset + 100)
        byte = f.read(1)
        f.seek(part.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256", "rsa-3072"])
def test_apptainer_verifies_our_dsse_signature(
    sif: Path, tmp_path: Path, keysdir: Path, apptainer, algorithm: str
) -> None:
    keyring = Keyring()
    key = keyring.newpair("me", algorithm)
    pub = keyring.export("me", tmp_path / "me.pub.pem")
    sign_image(sif, key)
    proc = apptainer("verify", "--key", pub, sif)
    assert "Verified signature(s)" in proc.stderr
    assert "4   |1       |NONE    |FS" in proc.stdout
    _flip_partition(sif)
    proc = apptainer("verify", "--key", pub, sif, check=False)
    assert proc.returncode != 0 and "data object integrity compromised: 4" in proc.stderr


def test_we_verify_apptainer_dsse_signature(sif: Path, tmp_path: Path, keysdir: Path, apptainer) -> None:
    keyring = Keyring()
    keyring.newpair("me", "ecdsa-p256")
    priv = keyring.export("me", tmp_path / "me.pem", private=True)
    apptainer("sign", "--key", priv, sif)
    (result,) = verify_image(sif, keyring.list()).verified
    assert result.key.name == "me" and [o.id for o in result.objects] == [1, 2, 3, 4]
    other = Keyring(tmp_path / "other").newpair("other", "ecdsa-p256")
    with pytest.raises(SignatureError, match=r"signature object 5 not valid: .* key not given"):
        verify_image(sif, [other])


def test_apptainer_built_image_signed_by_us(tmp_path: Path, keysdir: Path, apptainer) -> None:
    if not OCI_ARCHIVE.exists():
        pytest.skip(f"{OCI_ARCHIVE} not built yet")
    archive = shutil.copy(OCI_ARCHIVE, tmp_path / OCI_ARCHIVE.name)  # the peer sees /tmp, not /work
    sif = tmp_path / "busybox.sif"
    apptainer("build", "-F", sif, f"oci-archive://{archive}")
    theirs = apptainer("verify", "--local", sif, check=False).stderr
    with pytest.raises(SignatureError, match="signature not found for object group 1") as ours:
        verify_image(sif, [])
    assert "signature not found for object group 1" in theirs and "system partition" in str(ours.value)
    keyring = Keyring()
    key = keyring.newpair("me")
    sign_image(sif, key)
    apptainer("verify", "--key", keyring.export("me", tmp_path / "me.pub"), sif)


@needs_gpg
def test_apptainer_verifies_our_pgp_signature(sif: Path, tmp_path: Path, keysdir: Path, apptainer) -> None:
    keyring = Keyring()
    key = keyring.newpair("me", "pgp", "Hpcsif Signer <signer@example.org>")
    sign_image(sif, key)
    apptainer("key", "import", keyring.export("me", tmp_path / "me.asc"))
    proc = apptainer("verify", "--local", sif)
    assert f"Fingerprint: {key.fingerprint}" in proc.stdout
    assert "Signing entity: Hpcsif Signer" in proc.stdout
    _flip_partition(sif)
    assert apptainer("verify", "--local", sif, check=False).returncode != 0


@needs_gpg
def test_we_verify_apptainer_pgp_signature(sif: Path, tmp_path: Path, keysdir: Path, apptainer) -> None:
    apptainer(
        "key", "newpair", "-N", "Peer Signer", "-E", "peer@example.org", "-C", "test", "-P", "", "-b", "2048",
        "--push=false",
    )  # fmt: skip
    apptainer("sign", "--keyidx", "0", sif)
    exported = tmp_path / "peer.asc"
    apptainer("key", "export", "--armor", exported, stdin="0\n")
    imported = Keyring().import_file(exported, "peer")
    assert imported.uid == "Peer Signer (test) <peer@example.org>"
    (result,) = verify_image(sif, [describe_file(exported)]).verified
    with SIFImage.open(sif) as img:
        (sig,) = img.find(DataType.SIGNATURE)
    assert sig.entity == bytes.fromhex(imported.fingerprint) == bytes.fromhex(result.key.fingerprint)
    _flip_partition(sif)
    with pytest.raises(SignatureError, match=r"object 4 \(FS \*System\)"):
        verify_image(sif, Keyring().list())
