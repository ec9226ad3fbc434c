"""Small pure functions of the registry client: challenges, Retry-After, endpoint choice."""

from __future__ import annotations

import email.utils
import time

import pytest
import requests

from hpcsif.config import set_config
from hpcsif.refs import DOCKER_HUB
from hpcsif.sources.distribution import parse_challenge, retry_after
from hpcsif.sources.registry import is_loopback, make_clients
from tests.sources.helpers import use_config


def test_parse_bearer_challenge_with_commas_in_quotes() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:team/app:pull,push",error="insufficient_scope"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:team/app:pull,push",
        "error": "insufficient_scope",
    }
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})


def _response(retry: str | None) -> requests.Response:
    resp = requests.Response()
    resp.status_code = 429
    if retry is not None:
        resp.headers["Retry-After"] = retry
    return resp


def test_retry_after_seconds_date_and_cap() -> None:
    assert retry_after(_response("3")) == 3.0
    assert retry_after(_response(None)) is None
    assert retry_after(_response("garbage")) is None
    assert retry_after(_response("100000")) == 60.0
    soon = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.0 <= retry_after(_response(soon)) <= 5.0


def test_endpoints_https_unless_insecure_loopback_or_configured() -> None:
    try:
        use_config()
        assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") and is_loopback("[::1]:5000")
        assert not is_loopback("reg.example:5000")
        assert make_clients("reg.example:5000")[-1].base == "https://reg.example:5000"
        assert make_clients("reg.example:5000", insecure=True)[-1].base == "http://reg.example:5000"
        assert make_clients("127.0.0.1:5000")[-1].base == "http://127.0.0.1:5000"
        assert make_clients(DOCKER_HUB)[-1].base == "https://registry-1.docker.io"
        use_config(insecure=["reg.example:5000"], mirrors={DOCKER_HUB: ["https://mirror.example"]})
        assert make_clients("reg.example:5000")[-1].base == "http://reg.example:5000"
        assert [c.base for c in make_clients(DOCKER_HUB)] == [
            "https://mirror.example",
            "https://registry-1.docker.io",
        ]
    finally:
        set_config(None)


@pytest.mark.parametrize("registry", ["reg.example", "10.0.0.1:5000"])
def test_non_loopback_is_not_loopback(registry: str) -> None:
    assert not is_loopback(registry)
