"""Fixtures for the source tests: real services (the busybox images come from tests/conftest.py)."""

from collections.abc import Iterator

import pytest

from tests.services.httpd import http_files  # noqa: F401
from tests.services.podman import podman_service  # noqa: F401
from tests.services.registry import registry_basic, registry_open, registry_token  # noqa: F401
from tests.services.sshd import sshd_server  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_registry_clients() -> Iterator[None]:
    """Each test starts without the process's kept registry clients (tokens, connections)."""
    from hpcsif.sources.registry import clear_shared_clients

    clear_shared_clients()
    yield
    clear_shared_clients()
