"""Passphrase-protected OpenPGP keys (``apptainer key newpair`` always asks for one) sign through the CLI.

``hpcsif key import`` keeps such a key as given; ``hpcsif sign`` asks for its passphrase as
Apptainer does (unechoed from a terminal, else a line of stdin). Before, the import worked and
every ``sign`` failed with gpg's "clear-sign failed: No passphrase given".
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import peer_apptainer, run_cli
from tests.signing.conftest import needs_gpg

PASSPHRASE = "correct horse 7"

pytestmark = needs_gpg


def _protected_key(tmp_path: Path) -> Path:
    """An armored ed25519 secret key protected by :data:`PASSPHRASE`, made by gpg itself."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg = [
        "gpg",
        "--homedir",
        str(home),
        "--batch",
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        PASSPHRASE,
    ]
    subprocess.run([*gpg, "--quick-gen-key", "Pat <pat@example.org>", "ed25519", "sign", "never"], check=True)
    secret = subprocess.run([*gpg, "--armor", "--export-secret-keys"], check=True, capture_output=True).stdout
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)
    path = tmp_path / "pat.asc"
    path.write_bytes(secret)
    return path


def test_sign_asks_the_passphrase_of_a_protected_key(sif: Path, tmp_path: Path, keysdir: Path) -> None:
    imported = run_cli("key", "import", str(_protected_key(tmp_path)))
    assert "protected by a passphrase: 'hpcsif sign' asks for it" in imported.stdout
    before = sif.read_bytes()
    for given, why in (("", "passphrase needed"), ("wrong\n", "wrong passphrase")):
        proc = run_cli("sign", str(sif), input=given, check=False)
        fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
        assert proc.returncode == 255 and len(fatal) == 1 and fatal[0].endswith(why), proc.stderr
        assert sif.read_bytes() == before  # nothing half-written
    proc = run_cli("sign", str(sif), input=PASSPHRASE + "\n")
    assert "Enter key passphrase : " in proc.stderr and "Signature created" in proc.stderr
    assert "Signing entity: Pat <pat@example.org>" in run_cli("verify", str(sif)).stdout


@pytest.mark.peer
@pytest.mark.slow
def test_apptainer_newpair_key_signs_for_apptainer(sif: Path, tmp_path: Path, keysdir: Path) -> None:
    """An Apptainer user's keyring file, imported as it is, signs images that Apptainer verifies."""
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("neither apptainer nor peer-apptainer on PATH")
    env = {**os.environ, "APPTAINER_KEYSDIR": str(tmp_path / "apptainer-keys")}
    newpair = [exe, "key", "newpair", "--name", "Peer", "--email", "peer@example.org", "--comment", "c"]
    newpair += ["--password", PASSPHRASE, "--bit-length", "1024", "--push=false"]
    subprocess.run(newpair, env=env, check=True, capture_output=True, timeout=120)
    run_cli("key", "import", str(tmp_path / "apptainer-keys" / "pgp-secret"))
    run_cli("sign", str(sif), input=PASSPHRASE + "\n")
    proc = subprocess.run([exe, "verify", str(sif)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Verified signature(s)" in proc.stderr, proc.stderr
