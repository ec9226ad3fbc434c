"""Credential lookup order and secrecy (no services needed)."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from hpcsif.refs import DOCKER_HUB
from hpcsif.sources import credentials
from hpcsif.sources.credentials import Credentials, find_credentials, from_docker_config, from_env

SECRET = "pw-should-never-show"


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for prefix in ("HPCSIF", "APPTAINER", "SINGULARITY"):
        monkeypatch.delenv(f"{prefix}_DOCKER_USERNAME", raising=False)
        monkeypatch.delenv(f"{prefix}_DOCKER_PASSWORD", raising=False)
        monkeypatch.delenv(f"{prefix}_AUTH_FILE", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.apptainer/docker-config.json
    monkeypatch.setattr(credentials, "_warned", set())  # each test sees its warnings


def _docker_config(tmp_path, auths: dict) -> None:
    (tmp_path / "docker").mkdir(exist_ok=True)
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": auths}))


def test_env_order_hpcsif_then_apptainer_then_singularity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINGULARITY_DOCKER_USERNAME", "sing")
    monkeypatch.setenv("SINGULARITY_DOCKER_PASSWORD", "p1")
    assert from_env().username == "sing"
    monkeypatch.setenv("APPTAINER_DOCKER_USERNAME", "app")
    monkeypatch.setenv("APPTAINER_DOCKER_PASSWORD", "p2")
    assert from_env().username == "app"
    monkeypatch.setenv("HPCSIF_DOCKER_USERNAME", "hpc")
    monkeypatch.setenv("HPCSIF_DOCKER_PASSWORD", "p3")
    creds = from_env()
    assert (creds.username, creds.password) == ("hpc", "p3")
    assert "HPCSIF_DOCKER" in creds.source


def test_half_set_env_pair_is_ignored_with_a_warning(monkeypatch, caplog) -> None:
    monkeypatch.setenv("HPCSIF_DOCKER_USERNAME", "only-user")
    with caplog.at_level(logging.WARNING):
        assert from_env() is None
    assert "HPCSIF_DOCKER_USERNAME is set without a DOCKER_PASSWORD" in caplog.text


def test_each_variable_from_its_first_prefix_as_apptainer(monkeypatch, caplog) -> None:
    """Apptainer takes each variable from APPTAINER_ or else SINGULARITY_ on its own, and warns
    when the two differ; a pair split across prefixes used to be refused."""
    monkeypatch.setenv("APPTAINER_DOCKER_USERNAME", "app")
    monkeypatch.setenv("SINGULARITY_DOCKER_PASSWORD", SECRET)
    creds = from_env()
    assert (creds.username, creds.password) == ("app", SECRET)
    assert creds.source == "$APPTAINER_DOCKER_USERNAME and $SINGULARITY_DOCKER_PASSWORD"
    monkeypatch.setenv("APPTAINER_DOCKER_PASSWORD", "newer")
    monkeypatch.setenv("SINGULARITY_DOCKER_USERNAME", "")  # empty: as if unset
    with caplog.at_level(logging.WARNING):
        creds = from_env()
    assert (creds.password, creds.source) == ("newer", "$APPTAINER_DOCKER_USERNAME/PASSWORD")
    assert caplog.messages == [
        "SINGULARITY_DOCKER_PASSWORD and APPTAINER_DOCKER_PASSWORD have different values, using the latter"
    ]


def test_docker_config_auths(tmp_path) -> None:
    token = base64.b64encode(b"alice:" + SECRET.encode()).decode()
    _docker_config(
        tmp_path, {"https://index.docker.io/v1/": {"auth": token}, "reg.example:5000": {"auth": token}}
    )
    hub = from_docker_config(DOCKER_HUB)
    assert (hub.username, hub.password) == ("alice", SECRET)
    assert from_docker_config("reg.example:5000").username == "alice"
    assert from_docker_config("other.example") is None


def test_explicit_beats_env_beats_docker_config(monkeypatch, tmp_path) -> None:
    _docker_config(tmp_path, {"reg.example": {"auth": base64.b64encode(b"cfg:x").decode()}})
    assert find_credentials("reg.example").username == "cfg"
    monkeypatch.setenv("APPTAINER_DOCKER_USERNAME", "env")
    monkeypatch.setenv("APPTAINER_DOCKER_PASSWORD", "y")
    assert find_credentials("reg.example").username == "env"
    assert find_credentials("reg.example", Credentials("flag", "z", "--docker-login")).username == "flag"


def test_malformed_docker_config_is_ignored(tmp_path, caplog) -> None:
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert from_docker_config("reg.example") is None
    assert "ignoring unreadable Docker config" in caplog.text


def test_password_not_in_repr_str_or_debug_log(caplog) -> None:
    creds = Credentials("bob", SECRET, "test")
    with caplog.at_level(logging.DEBUG):
        find_credentials("reg.example", creds)
    assert SECRET not in repr(creds) and SECRET not in str(creds)
    assert SECRET not in caplog.text and "bob" in caplog.text


def _authfile(path, registry: str, user: str) -> str:
    token = base64.b64encode(f"{user}:{SECRET}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    return str(path)


def test_authfile_replaces_docker_config_and_env_names_one(tmp_path, monkeypatch, caplog) -> None:
    _docker_config(tmp_path, {"reg.example:5000": {"auth": base64.b64encode(b"default:x").decode()}})
    authfile = _authfile(tmp_path / "auth.json", "reg.example:5000", "fromfile")
    assert find_credentials("reg.example:5000").username == "default"
    creds = find_credentials("reg.example:5000", authfile=authfile)
    assert (creds.username, creds.password, creds.source) == ("fromfile", SECRET, authfile)
    # Apptainer: the requested file replaces the default one; no entry there means anonymous
    with caplog.at_level(logging.WARNING):
        assert find_credentials("other.example", authfile=authfile) is None
        assert find_credentials("reg.example:5000", authfile=tmp_path / "missing.json") is None
    assert "has no credentials for other.example" in caplog.text and "does not exist" in caplog.text
    assert SECRET not in caplog.text
    monkeypatch.setenv("APPTAINER_AUTH_FILE", authfile)
    assert find_credentials("reg.example:5000").username == "fromfile"
    # explicit and *_DOCKER_USERNAME/PASSWORD credentials still come first
    monkeypatch.setenv("HPCSIF_DOCKER_USERNAME", "envuser")
    monkeypatch.setenv("HPCSIF_DOCKER_PASSWORD", "p")
    assert find_credentials("reg.example:5000", authfile=authfile).username == "envuser"
    assert find_credentials("reg.example:5000", Credentials("x", "y")).username == "x"


def test_apptainer_registry_login_file_comes_before_docker_config(tmp_path) -> None:
    """``apptainer registry login`` writes ``~/.apptainer/docker-config.json``; Apptainer reads it
    (and Docker's file only without it). Docker's file still answers for other registries here."""
    (tmp_path / "home" / ".apptainer").mkdir(parents=True)
    _authfile(tmp_path / "home" / ".apptainer" / "docker-config.json", "reg.example:5000", "apptainer")
    _docker_config(
        tmp_path,
        {
            "reg.example:5000": {"auth": base64.b64encode(b"docker:x").decode()},
            "other.example": {"auth": base64.b64encode(b"docker:y").decode()},
        },
    )
    creds = find_credentials("reg.example:5000")
    assert (creds.username, creds.password) == ("apptainer", SECRET)
    assert creds.source.endswith("/.apptainer/docker-config.json")
    assert find_credentials("other.example").username == "docker"
    # --authfile replaces both
    authfile = _authfile(tmp_path / "auth.json", "reg.example:5000", "fromfile")
    assert find_credentials("reg.example:5000", authfile=authfile).username == "fromfile"
    assert find_credentials("other.example", authfile=authfile) is None


def test_docker_hub_namespaces_as_podman_writes_them(tmp_path) -> None:
    """``podman login docker.io/team`` keys Hub credentials as ``docker.io/team``."""
    token = base64.b64encode(b"team-user:" + SECRET.encode()).decode()
    other = base64.b64encode(b"hub-user:x").decode()
    _docker_config(
        tmp_path, {"docker.io/team": {"auth": token}, "https://index.docker.io/v1/": {"auth": other}}
    )
    assert find_credentials(DOCKER_HUB, repository="team/app").username == "team-user"
    assert find_credentials(DOCKER_HUB, repository="library/busybox").username == "hub-user"
    assert find_credentials(DOCKER_HUB).username == "hub-user"
