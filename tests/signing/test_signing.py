"""Signing and verifying SIF images: round trips, tampering, keyring, CLI and the trusted-cache policy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hpcsif.config import Config
from hpcsif.errors import ConfigError, SignatureError
from hpcsif.sif.format import DESCRIPTOR_SIZE, DataType, Descriptor
from hpcsif.sif.reader import SIFImage
from hpcsif.sif.writer import ObjectSpec, add_objects, remove_objects, write_sif
from hpcsif.signing import dsse
from hpcsif.signing.keys import Keyring, describe_file
from hpcsif.signing.metadata import image_metadata
from hpcsif.signing.sign import sign_image
from hpcsif.signing.verify import require_trusted, verify_image
from tests.conftest import run_cli
from tests.signing.conftest import needs_gpg

UNSIGNED = "no signatures found for system partition"


def _flip(path: Path, offset: int) -> None:
    """Invert one byte of *path* in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _object(path: Path, datatype: DataType) -> Descriptor:
    with SIFImage.open(path) as img:
        return img.find(datatype)[0]


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256", "rsa-3072"])
def test_dsse_round_trip(sif: Path, keysdir: Path, algorithm: str) -> None:
    key = Keyring().newpair("me", algorithm)
    (sig,) = sign_image(sif, key)
    with SIFImage.open(sif) as img:
        assert sig.datatype == DataType.SIGNATURE and sig.group_id == 0
        assert sig.link_is_group and sig.link_id == 1
        envelope = json.loads(img.read_object(img.get(sig.id)))
    assert envelope["payloadType"] == dsse.PAYLOAD_TYPE
    assert envelope["signatures"][0]["keyid"] == key.fingerprint
    report = verify_image(sif, [describe_file(key.public_path)])
    (result,) = report.verified
    assert [o.id for o in result.objects] == [1, 2, 3, 4]
    assert result.key.fingerprint == key.fingerprint
    assert not report.skipped


def test_signed_metadata_covers_the_group(sif: Path) -> None:
    with SIFImage.open(sif) as img:
        doc = json.loads(image_metadata(img, 1))
    assert doc["version"] == 1 and doc["header"]["digest"].startswith("sha256:")
    assert [o["relativeId"] for o in doc["objects"]] == [0, 1, 2, 3]
    part = _object(sif, DataType.PARTITION)
    with SIFImage.open(sif) as img:
        want = hashlib.sha256(img.read_object(part)).hexdigest()
    assert doc["objects"][3]["objectDigest"] == f"sha256:{want}"


@needs_gpg
def test_pgp_round_trip(sif: Path, keysdir: Path) -> None:
    key = Keyring().newpair("pgpkey", "pgp", "Test Signer <signer@example.org>")
    assert len(key.fingerprint) == 40 and key.uid == "Test Signer <signer@example.org>"
    (sig,) = sign_image(sif, key)
    assert sig.entity == bytes.fromhex(key.fingerprint)
    with SIFImage.open(sif) as img:
        assert img.read_object(img.get(sig.id)).startswith(b"-----BEGIN PGP SIGNED MESSAGE-----")
    (result,) = verify_image(sif, Keyring().list()).verified
    assert result.key.name == "pgpkey"
    other = Keyring(keysdir / "other").newpair("other", "pgp", "Other <o@example.org>")
    unknown = r"signature object 5 not valid: openpgp: signature made by unknown entity .*not among the keys"
    with pytest.raises(SignatureError, match=unknown):
        verify_image(sif, [other])


@pytest.mark.parametrize(
    ("what", "datatype", "expect"),
    [
        ("partition", DataType.PARTITION, r"data object integrity compromised: object 4 \(FS \*System\)"),
        ("labels", DataType.LABELS, r"data object integrity compromised: object 2 \(JSON.Labels\)"),
        (
            "generic json",
            DataType.GENERIC_JSON,
            r"data object integrity compromised: object 3 \(JSON.Generic 'inspect-metadata.json'\)",
        ),
        ("def file", DataType.DEFFILE, r"data object integrity compromised: object 1 \(Def.FILE\)"),
    ],
)
def test_tampered_object_fails_naming_it(
    sif: Path, keysdir: Path, what: str, datatype: DataType, expect: str
) -> None:
    key = Keyring().newpair("me")
    sign_image(sif, key)
    verify_image(sif, [key])
    desc = _object(sif, datatype)
    _flip(sif, desc.offset + desc.size // 2)
    with pytest.raises(SignatureError, match=expect) as err:
        verify_image(sif, [key])
    assert str(err.value).startswith("verification failed: ")


def test_tampered_descriptor_and_header(sif: Path, keysdir: Path, tmp_path: Path) -> None:
    key = Keyring().newpair("me")
    sign_image(sif, key)
    pristine = sif.read_bytes()
    with SIFImage.open(sif) as img:
        table = img.header.descriptors_offset
    # the name field of descriptor 3 (JSON.Generic) starts 73 bytes into its record
    _flip(sif, table + 2 * DESCRIPTOR_SIZE + 73)
    with pytest.raises(SignatureError, match=r"descriptor integrity compromised: object 3 \(JSON.Generic"):
        verify_image(sif, [key])
    sif.write_bytes(pristine)
    _flip(sif, 50)  # inside the image UUID
    with pytest.raises(SignatureError, match="header integrity compromised"):
        verify_image(sif, [key])


def test_object_added_after_signing(sif: Path, keysdir: Path) -> None:
    key = Keyring().newpair("me")
    sign_image(sif, key)
    add_objects(sif, [ObjectSpec(DataType.GENERIC_JSON, data=b"{}", name="late.json")])
    with pytest.raises(SignatureError, match=r"object 6 \(JSON.Generic 'late.json'\): object not signed"):
        verify_image(sif, [key])
    remove_objects(sif, [6, 2])
    with pytest.raises(SignatureError, match="object 2: signed object not found"):
        verify_image(sif, [key])


def test_unsigned_and_unknown_key(sif: Path, keysdir: Path) -> None:
    with pytest.raises(SignatureError, match=f"^verification failed: .*{UNSIGNED}$"):
        verify_image(sif, [])
    sign_image(sif, Keyring().newpair("signer"))
    stranger = Keyring(keysdir / "elsewhere").newpair("stranger", "ecdsa-p256")
    unknown = "signature object 5 not valid: DSSE signature by a key not given"
    with pytest.raises(SignatureError, match=unknown):
        verify_image(sif, [stranger])


def test_cli_sign_verify(sif: Path, keysdir: Path) -> None:
    proc = run_cli("verify", str(sif), check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith("INFO:    Verifying image with PGP key material\n")
    assert (
        f"FATAL:   Failed to verify container: integrity: signature not found for object group 1: {UNSIGNED}"
        in (proc.stderr)
    )
    run_cli("key", "newpair", "--name", "alice")
    run_cli("sign", str(sif))
    done = run_cli("verify", str(sif))
    # Apptainer's lines: the table on stdout (PEM keys name no signing entity), the verdict on stderr
    assert done.stdout.startswith("Objects verified:\n") and "Signing entity" not in done.stdout
    assert "4   |1       |NONE    |FS" in done.stdout
    assert f"INFO:    Verified signature(s) from image '{sif}' (signed by alice (" in done.stderr
    desc = _object(sif, DataType.LABELS)
    _flip(sif, desc.offset)
    proc = run_cli("verify", str(sif), check=False)
    assert proc.returncode != 0 and "object 2 (JSON.Labels)" in proc.stderr


def test_cli_sign_with_key_file(sif: Path, tmp_path: Path) -> None:
    keyring = Keyring(tmp_path / "k")
    keyring.newpair("x", "ecdsa-p384")
    priv, pub = tmp_path / "x.pem", tmp_path / "x.pub.pem"
    keyring.export("x", priv, private=True)
    keyring.export("x", pub)
    run_cli("sign", "--key", str(priv), str(sif))
    done = run_cli("verify", "--key", str(pub), str(sif))
    assert done.stdout.startswith("Objects verified:\n")
    assert f"INFO:    Verifying image with key material from '{pub}'" in done.stderr


def test_cli_key_round_trip(tmp_path: Path) -> None:
    env_a = {"HPCSIF_KEYSDIR": str(tmp_path / "a")}
    env_b = {"HPCSIF_KEYSDIR": str(tmp_path / "b")}
    out = run_cli("key", "newpair", "-N", "alice", "-t", "ecdsa-p256", env=env_a).stdout
    fpr = out.split("fingerprint ")[1].split()[0]
    assert fpr.startswith("SHA256:")
    keys = tmp_path / "a"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "alice.key").stat().st_mode) == 0o600
    listing = run_cli("key", "list", env=env_a).stdout
    assert "Name:              alice  [default]" in listing and fpr in listing and "key pair" in listing
    run_cli("key", "export", "alice", str(tmp_path / "alice.pub"), env=env_a)
    run_cli("key", "export", "--secret", "alice", str(tmp_path / "alice.pem"), env=env_a)
    assert b"PUBLIC KEY" in (tmp_path / "alice.pub").read_bytes()
    assert stat.S_IMODE((tmp_path / "alice.pem").stat().st_mode) == 0o600
    run_cli("key", "import", str(tmp_path / "alice.pub"), env=env_b)
    listing = run_cli("key", "list", env=env_b).stdout
    assert "alice" in listing and fpr in listing and "public key" in listing
    proc = run_cli("key", "import", str(tmp_path / "alice.pub"), env=env_b, check=False)
    assert proc.returncode != 0 and "already belongs to the keyring (as alice)" in proc.stderr
    # the private half joins the public key imported before (whatever name it is given)
    run_cli("key", "import", "--name", "alice2", str(tmp_path / "alice.pem"), env=env_b)
    listing = run_cli("key", "list", env=env_b).stdout
    assert "alice  [default]" in listing and "key pair" in listing and "alice2" not in listing
    run_cli("key", "remove", "--both", fpr, env=env_a)
    assert "No keys" in run_cli("key", "list", env=env_a).stdout
    assert not (keys / "alice.key").exists() and not (keys / "default").exists()


def _config(tmp_path: Path, **cache: object) -> Config:
    cfg = Config.load()
    for key, value in cache.items():
        cfg.override(f"cache.{key}", value)
    return cfg


def test_require_trusted(sif: Path, tmp_path: Path, keysdir: Path) -> None:
    require_trusted(sif, _config(tmp_path))  # policy off: unsigned images pass
    trusted = Keyring(tmp_path / "admin").newpair("site", "ed25519")
    cfg = _config(tmp_path, require_signed=True, trusted_keys=[str(trusted.public_path)])
    with pytest.raises(SignatureError, match=f"not signed by a trusted key.*{UNSIGNED}"):
        require_trusted(sif, cfg)
    sign_image(sif, Keyring().newpair("user"))  # signed, but by an untrusted key
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        require_trusted(sif, cfg)
    sign_image(sif, trusted)
    require_trusted(sif, cfg)
    # a directory of keys, and a fingerprint of a keyring key, work too
    require_trusted(sif, _config(tmp_path, require_signed=True, trusted_keys=[str(tmp_path / "admin")]))
    Keyring().import_file(trusted.public_path, "site")
    require_trusted(sif, _config(tmp_path, require_signed=True, trusted_keys=[trusted.fingerprint]))
    with pytest.raises(ConfigError, match="SHA256:xxxx"):
        require_trusted(sif, _config(tmp_path, require_signed=True, trusted_keys=["SHA256:" + "x" * 43]))
    with pytest.raises(SignatureError, match="names no key"):
        require_trusted(sif, _config(tmp_path, require_signed=True, trusted_keys=[]))


def test_private_keys_are_never_readable_by_others(keysdir: Path) -> None:
    old = os.umask(0)
    try:
        Keyring().newpair("k")
    finally:
        os.umask(old)
    assert stat.S_IMODE((keysdir / "k.key").stat().st_mode) == 0o600
    assert not list(keysdir.glob(".*tmp"))


def test_converted_image_is_unsigned(busybox_oci_layout: Path, tmp_path: Path) -> None:
    from hpcsif.convert import convert_ref

    out = convert_ref(f"oci:{busybox_oci_layout}:latest", tmp_path / "conv.sif")
    proc = run_cli("verify", str(out), check=False)
    assert proc.returncode != 0 and UNSIGNED in proc.stderr


def test_require_signed_in_cache_and_exec(sif: Path, tmp_path: Path, keysdir: Path) -> None:
    """With the policy on, the cache (what the prolog stages through) and exec refuse unsigned images."""
    from hpcsif.cache.api import ensure_image
    from hpcsif.config import set_config

    site = Keyring(tmp_path / "site").newpair("site")
    conf = tmp_path / "hpcsif.toml"
    conf.write_text(f'[cache]\nrequire_signed = true\ntrusted_keys = ["{site.public_path}"]\n')
    proc = run_cli("exec", str(sif), "true", env={"HPCSIF_CONFIG": str(conf)}, check=False)
    assert proc.returncode != 0
    assert f"FATAL:   {sif}: not signed by a trusted key (cache.require_signed)" in proc.stderr
    assert UNSIGNED in proc.stderr
    set_config(_config(tmp_path, require_signed=True, trusted_keys=[str(site.public_path)]))
    try:
        with pytest.raises(SignatureError, match=UNSIGNED):
            ensure_image(str(sif))
        with pytest.raises(SignatureError, match="sandbox directory"):
            ensure_image(str(tmp_path / "site"))
        sign_image(sif, site)
        assert ensure_image(str(sif)) == sif.resolve()
    finally:
        set_config(None)


@needs_gpg
def test_trusted_fingerprint_in_a_shared_keyring_file(sif: Path, tmp_path: Path, keysdir: Path) -> None:
    """A fingerprint in trusted_keys trusts that key only, not its neighbours in an OpenPGP keyring file."""
    alice = Keyring(tmp_path / "a").newpair("alice", "pgp", "Alice <a@example.org>")
    bob = Keyring(tmp_path / "b").newpair("bob", "pgp", "Bob <b@example.org>")
    ring = tmp_path / "ring.asc"
    ring.write_bytes(alice.public_bytes() + bob.public_bytes())
    shared = Keyring().import_file(ring)
    assert shared.matches(alice.fingerprint) and shared.matches(bob.fingerprint)
    sign_image(sif, bob)
    assert verify_image(sif, [shared]).verified[0].key.name == "ring"
    cfg = _config(tmp_path, require_signed=True, trusted_keys=[alice.fingerprint])
    with pytest.raises(SignatureError, match=f"{bob.fingerprint}, which is not among the keys given"):
        require_trusted(sif, cfg)
    require_trusted(sif, _config(tmp_path, require_signed=True, trusted_keys=[bob.fingerprint[-16:]]))


@needs_gpg
def test_legacy_signatures_are_not_trusted(sif: Path, keysdir: Path) -> None:
    """A pre-1.1 'SIFHASH' signature covers no descriptors: skipped, as Apptainer does by default."""
    from hpcsif.sif.format import HashType
    from hpcsif.signing import pgp

    key = Keyring().newpair("old", "pgp", "Old <old@example.org>")
    legacy = pgp.clearsign(key.private_path.read_bytes(), key.fingerprint, b"SIFHASH:\n" + b"0" * 96 + b"\n")
    spec = ObjectSpec(
        DataType.SIGNATURE, data=legacy, group_id=0, link_id=1, link_is_group=True, hashtype=HashType.SHA384
    )
    add_objects(sif, [spec])
    with pytest.raises(SignatureError, match=UNSIGNED):
        verify_image(sif, [key])
    sign_image(sif, key)
    report = verify_image(sif, [key])
    assert len(report.verified) == 1
    assert [(d.id, why) for d, why in report.skipped] == [(5, "legacy (pre-1.1) signature, not checked")]


@pytest.mark.slow
def test_exec_runs_an_image_signed_by_a_trusted_key(tmp_path: Path) -> None:
    """The policy's other half: a trusted signature lets ``hpcsif exec`` run the image."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not (shutil.which("mksquashfs") and os.path.exists(busybox)):
        pytest.skip("needs mksquashfs and busybox-static")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    fs = tmp_path / "rootfs.sqfs"
    subprocess.run(["mksquashfs", str(root), str(fs), "-noappend", "-quiet", "-no-progress"], check=True)
    sif = write_sif(tmp_path / "run.sif", [ObjectSpec(DataType.PARTITION, path=fs)])
    site = Keyring(tmp_path / "site").newpair("site")
    conf = tmp_path / "hpcsif.toml"
    conf.write_text(f'[cache]\nrequire_signed = true\ntrusted_keys = ["{tmp_path / "site"}"]\n')
    env = {"HPCSIF_CONFIG": str(conf)}
    args = ("exec", str(sif), "/bin/sh", "-c", "echo signed-and-running")
    assert "no signatures found" in run_cli(*args, env=env, check=False).stderr
    sign_image(sif, site)
    assert run_cli(*args, env=env).stdout == "signed-and-running\n"
