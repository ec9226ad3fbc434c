"""Layers of uncompressed archives are read in place (not copied) and still verified."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_docker_archive, write_oci_layout
from tests.conftest import error_lines, run_cli
from tests.convert.test_build_cli import assert_no_leftovers, unpack

pytestmark = pytest.mark.slow

BIG = os.urandom(6 << 20)  # above the size up to which archive members are copied into the store


@pytest.fixture(scope="module")
def big_image() -> ImageSpec:
    return ImageSpec(
        [
            layer_tar([Entry("data", mode=0o755), Entry("data/big.bin", BIG)]),
            layer_tar([Entry("small.txt", b"s\n")]),
        ],
        cmd=["/bin/sh"],
    )


@pytest.fixture(scope="module")
def archives(big_image: ImageSpec, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inplace")
    docker = write_docker_archive(d / "docker.tar", [("team/big:1", big_image)])
    write_oci_layout(d / "layout", big_image, compress="none")
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{d / 'layout'}:latest", f"oci-archive:{d / 'oci.tar'}:latest"],
        check=True,
        capture_output=True,
    )
    return {"docker-archive": docker, "oci-archive": d / "oci.tar"}


def blob_bytes(cache: Path) -> int:
    blobs = cache / "oci" / "blobs" / "sha256"
    return sum(p.stat().st_size for p in blobs.iterdir()) if blobs.is_dir() else 0


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive"])
def test_large_layers_are_read_in_place(kind: str, archives: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    sif = tmp_path / "big.sif"
    run_cli("build", str(sif), f"{kind}://{archives[kind]}", env={"HPCSIF_CACHEDIR": str(cache)})
    assert (unpack(sif, tmp_path / "root") / "data" / "big.bin").read_bytes() == BIG
    assert blob_bytes(cache) < 1 << 20, "the large layer was copied into the blob cache"


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive"])
def test_corruption_inside_a_layer_left_in_place(
    kind: str, archives: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.tar"
    data = bytearray(archives[kind].read_bytes())
    at = data.find(BIG[1000:1064])
    assert at > 0
    data[at] ^= 0xFF
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("build", str(out / "x.sif"), f"{kind}://{bad}", check=False)
    assert proc.returncode != 0
    (line,) = error_lines(proc.stderr)
    assert line.startswith("FATAL:") and "sha256:" in line, line
    assert_no_leftovers(out)


def test_truncated_inside_a_large_layer(archives: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    data = archives["docker-archive"].read_bytes()
    cut.write_bytes(data[: data.find(BIG[:64]) + len(BIG) // 2])
    proc = run_cli("build", str(tmp_path / "x.sif"), f"docker-archive://{cut}", check=False)
    assert proc.returncode != 0 and "truncated" in proc.stderr
    assert not (tmp_path / "x.sif").exists()
