"""Shared fixtures. Real services (registry, Slurm, sshd, Podman) live in tests/services/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.services.images",
    "tests.services.slurm",
    "tests.services.sshd",
    "tests.services.users",
    "tests.services.registry",
    "tests.services.podman",
    "tests.services.httpd",
]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own cache and config dirs so tests never share state by accident."""
    base = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HPCSIF_CACHEDIR", str(base / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "config"))
    for var in ("APPTAINER_CACHEDIR", "SINGULARITY_CACHEDIR", "HPCSIF_CONFIG", "HPCSIF_DISABLE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    from hpcsif.config import set_config

    set_config(None)


def run_cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    """Run ``hpcsif ARGS…`` as a user would (a separate process), capturing text output."""
    proc = subprocess.run(
        [sys.executable, "-m", "hpcsif.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"hpcsif {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


#: Apptainer 1.4's INFO lines for a conversion from a URI (pull, exec/run of a URI)
CONVERSION_INFO = [
    "INFO:    Converting OCI blobs to SIF format",
    "INFO:    Starting build...",
    "INFO:    Fetching OCI image...",
    "INFO:    Extracting OCI image...",
    "INFO:    Inserting Apptainer configuration...",
    "INFO:    Creating SIF file...",
]


def error_lines(stderr: str) -> list[str]:
    """What a command said besides Apptainer's ``INFO:`` progress lines (a build that failed
    midway has said its steps so far, as Apptainer's does)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("INFO:")]


@pytest.fixture
def cli():
    """The :func:`run_cli` helper as a fixture."""
    return run_cli


def peer_apptainer() -> str | None:
    """The Apptainer command to compare against (apptainer or the sid peer), if any."""
    return shutil.which("apptainer") or shutil.which("peer-apptainer")


@pytest.fixture
def apptainer() -> Iterator[str]:
    """Skip unless Apptainer (or the peer wrapper) is installed."""
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("Apptainer is not installed (see shared/peer/)")
    yield exe
