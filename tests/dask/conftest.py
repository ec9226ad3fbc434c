"""Fixtures for the Dask tests: test images with the host's Python, the hooked Slurm cluster.

``slurm_cluster`` (no hooks) comes from tests/services/slurm.py through the root conftest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.dask.pyimage import build_archive
from tests.services.images import busybox_binary
from tests.slurm.cluster_setup import hpcsif_cluster  # noqa: F401  (a session fixture: prolog, epilog)


@pytest.fixture(scope="session")
def _dask_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dask-cache")


@pytest.fixture(autouse=True)
def _shared_cache(_dask_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One hpcsif cache for the Dask tests of a session: each test image is converted once."""
    monkeypatch.setenv("HPCSIF_CACHEDIR", str(_dask_cache))


@pytest.fixture(scope="session")
def dask_image(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``variant -> docker-archive:// reference`` (see ``pyimage.VARIANTS``).

    The archives are kept beside pytest's per-run directories, so a later run reuses them
    while the interpreter, the packages and the builder are unchanged.
    """
    pytest.importorskip("dask_jobqueue")
    for tool in ("bwrap", "squashfuse", "fusermount3"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (the bwrap engine runs the images)")
    cache = tmp_path_factory.getbasetemp().parent / "hpcsif-dask-images"
    busybox = busybox_binary()

    def get(variant: str = "dask") -> str:
        return f"docker-archive://{build_archive(Path(cache), busybox, variant)}"

    return get
