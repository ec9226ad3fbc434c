"""OpenPGP verification tolerates clocks that disagree, as Apptainer's does (real gpg)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from hpcsif.signing import pgp
from tests.signing.conftest import needs_gpg


def _gpg(home: Path, *args: str, data: bytes | None = None) -> bytes:
    cmd = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--pinentry-mode", "loopback", *args]
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


@needs_gpg
def test_a_key_that_looks_newer_than_its_signature_still_verifies(tmp_path: Path) -> None:
    """A signing host whose clock ran an hour ahead made the key; the signature carries now."""
    home = tmp_path / "g"
    home.mkdir(mode=0o700)
    ahead = time.strftime("%Y%m%dT%H%M%S!", time.gmtime(time.time() + 3600))
    uid = "Skewed Clock <skew@example.org>"
    _gpg(home, "--faked-system-time", ahead, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign")
    public = _gpg(home, "--armor", "--export")
    signed = _gpg(home, "--ignore-time-conflict", "--ignore-valid-from", "--clearsign", data=b"digest: 42\n")
    # plain gpg refuses this one
    plain = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--verify"], input=signed, capture_output=True, check=False
    )
    assert plain.returncode != 0
    checked = pgp.verify(signed, [public])
    assert checked is not None and checked[0].strip() == b"digest: 42"
