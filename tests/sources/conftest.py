"""Fixtures for the source tests: real services (the busybox images come from tests/conftest.py)."""

from tests.services.httpd import http_files  # noqa: F401
from tests.services.podman import podman_service  # noqa: F401
from tests.services.registry import registry_basic, registry_open, registry_token  # noqa: F401
from tests.services.sshd import sshd_server  # noqa: F401
