"""An image signed by two keys: ``verify`` needs both, as Apptainer's; the cache policy needs one.

``apptainer verify`` fails on any signature it cannot check ("signature object 6 not valid"), so
an image signed by alice and bob verifies with both keys and fails with alice's alone; the
``cache.require_signed`` policy accepts it when one signature is by a trusted key.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hpcsif.config import Config
from hpcsif.errors import SignatureError
from hpcsif.signing.keys import Keyring
from hpcsif.signing.verify import require_trusted, verify_trusted
from tests.conftest import run_cli

APPTAINER = shutil.which("apptainer") or shutil.which("peer-apptainer")


@pytest.fixture
def signed_twice(sif: Path, keysdir: Path) -> tuple[Path, Path, Path]:
    """*sif* signed with alice's then bob's PEM key: (image, alice.pub, bob.pub)."""
    keys = []
    for name in ("alice", "bob"):
        key = Keyring().newpair(name, "ed25519")
        run_cli("sign", "--key", str(key.private_path), str(sif))
        keys.append(key.public_path)
    return sif, keys[0], keys[1]


def test_verify_needs_every_signer(signed_twice: tuple[Path, Path, Path]) -> None:
    sif, alice, bob = signed_twice
    both = run_cli("verify", "--key", str(alice), "--key", str(bob), str(sif))
    assert "signed by alice" in both.stderr and "bob" in both.stderr
    assert both.stdout.count("Objects verified:") == 2
    for key, other in ((alice, 6), (bob, 5)):
        proc = run_cli("verify", "--key", str(key), str(sif), check=False)
        assert proc.returncode == 255
        fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL:")]
        assert fatal == [
            f"FATAL:   Failed to verify container: integrity: signature object {other} not valid: "
            "DSSE signature by a key not given (import the signer's public key or pass --key)"
        ]
    if APPTAINER:  # the peer agrees: one key is not enough
        peer = subprocess.run(
            [APPTAINER, "verify", "--key", str(alice), str(sif)], capture_output=True, text=True, timeout=120
        )
        assert peer.returncode == 255 and "signature object 6 not valid" in peer.stderr


def test_policy_needs_one_trusted_signer(signed_twice: tuple[Path, Path, Path]) -> None:
    sif, alice, _ = signed_twice
    cfg = Config.load()
    cfg.override("cache.require_signed", True)
    cfg.override("cache.trusted_keys", [str(alice)])
    require_trusted(sif, cfg)
    report = verify_trusted(sif, cfg)
    assert [r.key.name for r in report.verified] == ["alice"]
    assert [(d.id, why.startswith("DSSE signature by a key not given")) for d, why in report.skipped] == [
        (6, True)
    ]


def test_wrong_key_fails(sif: Path, keysdir: Path) -> None:
    key = Keyring().newpair("alice", "ed25519")
    run_cli("sign", "--key", str(key.private_path), str(sif))
    stranger = Keyring(keysdir / "other").newpair("stranger", "ed25519")
    proc = run_cli("verify", "--key", str(stranger.public_path), str(sif), check=False)
    assert proc.returncode == 255
    assert proc.stderr.splitlines()[-1] == (
        "FATAL:   Failed to verify container: integrity: signature object 5 not valid: "
        "DSSE signature by a key not given (import the signer's public key or pass --key)"
    )
    cfg = Config.load()
    cfg.override("cache.require_signed", True)
    cfg.override("cache.trusted_keys", [str(stranger.public_path)])
    with pytest.raises(SignatureError, match=r"not signed by a trusted key.*no signature could be checked"):
        require_trusted(sif, cfg)


def test_a_failed_verify_prints_what_was_verified_first(signed_twice: tuple[Path, Path, Path]) -> None:
    """As Apptainer's: the objects alice's signature covers, then the error for bob's, on stdout;
    ``--json`` counts both signatures and lists alice's objects."""
    sif, alice, _ = signed_twice
    text = run_cli("verify", "--key", str(alice), str(sif), check=False)
    assert text.stdout.count("Objects verified:") == 1
    assert text.stdout.endswith(
        "\nError encountered during signature verification: signature object 6 not valid: "
        "DSSE signature by a key not given (import the signer's public key or pass --key)\n"
    )
    doc = run_cli("verify", "--json", "--key", str(alice), str(sif), check=False)
    assert doc.returncode == 255 and '"Signatures": 2' in doc.stdout and '"Signer"' in doc.stdout
    if APPTAINER:
        for args, ours in ((["verify"], text), (["verify", "--json"], doc)):
            peer = subprocess.run(
                [APPTAINER, *args, "--key", str(alice), str(sif)], capture_output=True, text=True, timeout=120
            )
            assert peer.returncode == 255
            # the same up to the reasons' wording
            cut = "Error encountered during signature verification: signature object 6 not valid: "
            assert ours.stdout.split(cut)[0] == peer.stdout.split(cut)[0], (args, peer.stdout)
