"""Podman's Docker-compatible API on a unix socket, with an image loaded from a local archive.

Podman runs with private storage (``--root``/``--runroot`` under the test's temp dir, the
``vfs`` driver), so the host's container storage is never touched.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services.images import TestImage

IMAGE_NAME = "hpcsif/busybox:latest"


@dataclass
class PodmanService:
    """A running ``podman system service`` and the image it holds."""

    socket: Path
    proc: subprocess.Popen
    image: str  # the name it was loaded under

    @property
    def docker_host(self) -> str:
        """The value for ``DOCKER_HOST``."""
        return f"unix://{self.socket}"


def _podman(workdir: Path) -> list[str]:
    return [
        "podman",
        "--root", str(workdir / "root"),
        "--runroot", str(workdir / "run"),
        "--storage-driver", "vfs",
        "--cgroup-manager", "cgroupfs",
        "--events-backend", "file",
    ]  # fmt: skip


def start_podman(workdir: Path, archive: Path) -> PodmanService:
    """Load the docker-archive ``archive`` and serve the Docker API on ``workdir/podman.sock``."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    base = _podman(workdir)
    subprocess.run([*base, "load", "-i", str(archive)], check=True, capture_output=True)
    sock = workdir / "podman.sock"
    log = open(workdir / "podman.log", "wb")  # noqa: SIM115 - the child process keeps it
    proc = subprocess.Popen(
        [*base, "system", "service", "--time=0", f"unix://{sock}"], stdout=log, stderr=log
    )
    log.close()
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"podman service failed: {(workdir / 'podman.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return PodmanService(sock, proc, IMAGE_NAME)


@pytest.fixture(scope="session")
def podman_service(
    tmp_path_factory: pytest.TempPathFactory, busybox_image: TestImage
) -> Iterator[PodmanService]:
    """Podman's Docker API serving the busybox test image as ``hpcsif/busybox:latest``."""
    workdir = tmp_path_factory.mktemp("podman")
    archive = workdir / "busybox.docker-archive.tar"
    subprocess.run(
        ["skopeo", "copy", "--quiet", busybox_image.oci_ref, f"docker-archive:{archive}:{IMAGE_NAME}"],
        check=True,
        capture_output=True,
    )
    service = start_podman(workdir, archive)
    try:
        yield service
    finally:
        service.proc.terminate()
        try:
            service.proc.wait(10)
        except subprocess.TimeoutExpired:
            service.proc.kill()
            service.proc.wait()
