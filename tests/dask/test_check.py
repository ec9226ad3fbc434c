"""The image check before any job is submitted: real images, run through the cache and the engine."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import distributed
import pytest

from hpcsif.dask import SIFSLURMCluster, check_image, image_versions
from hpcsif.errors import DaskImageError

pytestmark = pytest.mark.slow
CLIENT = distributed.__version__


def _converts(ref: str) -> int:
    journal = Path(os.environ["HPCSIF_CACHEDIR"]) / "journal.jsonl"
    events = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
    return sum(1 for e in events if e["event"] == "convert" and e["what"] == ref)


def test_image_with_the_clients_distributed_passes(dask_image: Callable[[str], str]) -> None:
    ref = dask_image("dask")
    versions = check_image(ref)
    assert versions["distributed"] == CLIENT
    assert versions["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert image_versions(ref) == versions
    assert _converts(ref) == 1  # converted once into the (session's) cache, then hits


def test_image_without_distributed_is_refused(dask_image: Callable[[str], str]) -> None:
    ref = dask_image("no-dask")
    with pytest.raises(DaskImageError) as info:
        check_image(ref)
    msg = str(info.value)
    assert "distributed is missing" in msg and f"client runs distributed {CLIENT}" in msg
    assert "No module named 'distributed'" in msg and "\n" not in msg


def test_image_with_another_release_is_refused(dask_image: Callable[[str], str]) -> None:
    ref = dask_image("other-release")
    older = f"{int(CLIENT.split('.')[0]) - 1}.{CLIENT.split('.', 1)[1]}"
    with pytest.raises(DaskImageError, match=rf"distributed {older} in the image .* distributed {CLIENT}"):
        check_image(ref)


def test_image_without_python_is_refused(dask_image: Callable[[str], str]) -> None:
    ref = dask_image("no-python")
    missing = r"cannot run 'python3' in the image .*python3\"?: executable file not found"
    with pytest.raises(DaskImageError, match=missing):
        check_image(ref)


def test_cluster_refuses_before_starting(dask_image: Callable[[str], str], tmp_path: Path) -> None:
    """The constructor checks before it starts a scheduler or submits the n_workers jobs."""
    with pytest.raises(DaskImageError, match="distributed is missing"):
        SIFSLURMCluster(image=dask_image("no-dask"), cores=1, memory="1GB", n_workers=1)


def test_python_is_a_command(dask_image: Callable[[str], str]) -> None:
    """``python`` is split as the job script's shell splits it: ``-S`` hides site-packages."""
    with pytest.raises(DaskImageError, match="distributed is missing from the image's Python"):
        check_image(dask_image("dask"), python="python3 -S")
