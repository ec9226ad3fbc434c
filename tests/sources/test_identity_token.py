"""OAuth2 identity tokens: the ``identitytoken`` that ``docker login`` saves in ``config.json``
for a registry whose token server speaks OAuth2, or that a credential helper gives as user
``<token>``. As Docker and containers/image (Apptainer) do, it is POSTed to the token realm as a
refresh token (``grant_type=refresh_token``) for an access token; it was ignored with a warning.
It is never printed, logged (not even with ``-d``) or written to the cache.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import peer_apptainer
from tests.services.registry import IDENTITY_TOKEN, USER, Registry, clean_env

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
HELPER = """#!/bin/sh
# a Docker credential helper holding an identity token, as `docker login` leaves one
[ "$1" = get ] || exit 1
read -r server  # Docker writes the server without a newline: read fails, yet sets it
echo '{"ServerURL": "'"$server"'", "Username": "<token>", "Secret": "%s"}'
"""


def hpcsif(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI in ``cwd``: its cache in ``cwd/cache``, Docker's config in ``cwd/home/.docker``."""
    environ = {
        **clean_env(),
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": str(cwd / "home"),
        "DOCKER_CONFIG": str(cwd / "home" / ".docker"),
        "HPCSIF_CACHEDIR": str(cwd / "cache"),
        "APPTAINER_NOHTTPS": "1",
        **env,
    }
    argv = [sys.executable, "-m", "hpcsif.cli.main", *args]
    return subprocess.run(argv, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


def docker_config(where: Path, registry: Registry, token: str) -> Path:
    """A config.json as ``docker login`` writes it for an OAuth2 registry: no password, a token."""
    where.mkdir(parents=True, exist_ok=True)
    entry = {"auth": base64.b64encode(f"{USER}:".encode()).decode(), "identitytoken": token}
    (where / "config.json").write_text(json.dumps({"auths": {registry.host: entry}}))
    return where / "config.json"


def leaks(root: Path) -> list[Path]:
    """The files under ``root`` that hold the identity token."""
    return [p for p in root.rglob("*") if p.is_file() and IDENTITY_TOKEN.encode() in p.read_bytes()]


def test_identity_token_is_traded_for_access(registry_token, busybox_image, tmp_path) -> None:
    server = registry_token.token_server
    assert server is not None
    registry_token.push(busybox_image.oci_ref, "private/busybox:1")
    docker_config(tmp_path / "home" / ".docker", registry_token, IDENTITY_TOKEN)
    sif = tmp_path / "base.sif"
    assert hpcsif(tmp_path, "build", str(sif), f"oci:{busybox_image.layout}:latest").returncode == 0
    oras = registry_token.ref("private/tok:1", transport="oras")

    before = len(server.requests)
    push = hpcsif(tmp_path, "-d", "push", str(sif), oras)
    pull = hpcsif(tmp_path, "-d", "pull", "--name", "a.sif", registry_token.ref("private/busybox:1"))
    down = hpcsif(tmp_path, "-d", "pull", "--name", "b.sif", oras)
    for proc in (push, pull, down):
        assert proc.returncode == 0, proc.stderr
        assert IDENTITY_TOKEN not in proc.stdout + proc.stderr
        assert "identity token" in proc.stderr  # where the credentials came from, in -d's lines
    assert (tmp_path / "b.sif").read_bytes() == sif.read_bytes()
    asked = server.requests[before:]
    assert asked and all(
        r["grant_type"] == "refresh_token" and r["client_id"] == "hpcsif" and r["user"] == USER for r in asked
    ), asked
    assert all(r["authorization"] is None and r["service"] == ["hpcsif-test-registry"] for r in asked)
    assert {s for r in asked for s in r["scopes"]} >= {
        "repository:private/tok:pull,push",
        "repository:private/busybox:pull",
        "repository:private/tok:pull",
    }
    assert leaks(tmp_path / "cache") == []

    # a token the server does not know (revoked): one line, nothing written, the token unsaid
    docker_config(tmp_path / "home" / ".docker", registry_token, "revoked-" + IDENTITY_TOKEN)
    bad = hpcsif(tmp_path, "pull", "--name", "c.sif", registry_token.ref("private/tok:1", transport="oras"))
    assert bad.returncode == 255 and bad.stderr.splitlines() == [
        f"FATAL:   authentication failed for {registry_token.host}/private/tok: the registry refused the "
        f"identity token from {tmp_path}/home/.docker/config.json (it may have expired or been revoked: "
        "log in again; check that the repository exists)"
    ], bad.stderr
    assert not (tmp_path / "c.sif").exists()

    # from a credential helper (user "<token>"), as `docker login` with a credsStore leaves it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker-credential-hpcsiftok").write_text(HELPER % IDENTITY_TOKEN)
    (bin_dir / "docker-credential-hpcsiftok").chmod(0o755)
    (tmp_path / "home" / ".docker" / "config.json").write_text(json.dumps({"credsStore": "hpcsiftok"}))
    path = f"{bin_dir}:{os.environ['PATH']}"
    helped = hpcsif(tmp_path, "pull", "--disable-cache", "--name", "d.sif", oras, PATH=path)
    assert helped.returncode == 0 and helped.stderr == "INFO:    Downloading oras image\n", helped.stderr

    peer = peer_apptainer()
    if peer is None:
        return  # the comparison with Apptainer below needs it
    authfile = docker_config(tmp_path / "peer", registry_token, IDENTITY_TOKEN)
    env = {
        **clean_env(),
        "APPTAINER_CACHEDIR": str(tmp_path / "peer-cache"),
        "PATH": "/usr/bin:/bin:/usr/sbin",
    }
    before = len(server.requests)
    theirs = subprocess.run(
        [peer, "pull", "--no-https", "--authfile", str(authfile), str(tmp_path / "p.sif"), oras],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert theirs.returncode == 0, theirs.stderr
    assert (tmp_path / "p.sif").read_bytes() == sif.read_bytes()
    assert {r["grant_type"] for r in server.requests[before:]} == {"refresh_token"}
