"""Fixtures for the source tests: real services from tests/services."""

from tests.services.httpd import http_files  # noqa: F401
from tests.services.images import busybox_image, busybox_oci_layout  # noqa: F401
from tests.services.podman import podman_service  # noqa: F401
from tests.services.registry import registry_basic, registry_open, registry_token  # noqa: F401
