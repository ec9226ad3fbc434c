"""docker-daemon:// against Podman's Docker API, http(s)/fsspec downloads, oras:// SIF round trips."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcsif.errors import AuthError, NotFoundError, SourceError
from hpcsif.image import mediatypes as mt
from hpcsif.image.store import OCIStore
from hpcsif.refs import parse
from hpcsif.sources import get_source
from hpcsif.sources.credentials import Credentials
from hpcsif.sources.distribution import RegistryClient
from hpcsif.sources.oras import download_sif, push_sif, resolve
from hpcsif.sources.remote import download
from tests.services.images import busybox_binary
from tests.services.registry import PASSWORD, USER
from tests.sources.helpers import assert_store_sound

pytestmark = pytest.mark.slow


# -- docker-daemon:// --------------------------------------------------------------------------
def test_daemon_fetch_and_resolve(podman_service, busybox_image, tmp_path) -> None:
    ref = parse(f"docker-daemon://{podman_service.image}")
    source = get_source(ref, docker_host=podman_service.docker_host)
    assert source.resolve(ref) == busybox_image.config_digest
    image = source.fetch(ref, OCIStore(tmp_path))
    assert image.config_digest == busybox_image.config_digest
    assert len(image.layers) == len(busybox_image.layer_digests)
    assert image.container_config["Cmd"] == ["echo hello from busybox"]
    assert_store_sound(tmp_path)


def test_daemon_honours_docker_host(podman_service, busybox_image, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", podman_service.docker_host)
    ref = parse(f"docker-daemon://{podman_service.image}")
    assert get_source(ref).fetch(ref, OCIStore(tmp_path)).config_digest == busybox_image.config_digest


def test_daemon_missing_image_and_no_daemon(podman_service, tmp_path) -> None:
    ref = parse("docker-daemon://hpcsif/absent:1")
    with pytest.raises(NotFoundError, match="has no image hpcsif/absent:1"):
        get_source(ref, docker_host=podman_service.docker_host).resolve(ref)
    with pytest.raises(SourceError, match="cannot reach the Docker daemon"):
        get_source(ref, docker_host=f"unix://{tmp_path}/none.sock").resolve(ref)


# -- http(s) and fsspec -------------------------------------------------------------------------
def test_http_download_is_complete_and_atomic(http_files, tmp_path) -> None:
    payload = busybox_binary().read_bytes()
    (http_files.root / "payload.bin").write_bytes(payload)
    seen: list[tuple[int, int]] = []
    out = download(
        f"{http_files.url}/payload.bin",
        tmp_path / "payload.bin",
        progress=lambda s, d, t: seen.append((d, t)),
    )
    assert out.read_bytes() == payload
    assert seen[-1] == (len(payload), len(payload))
    with pytest.raises(NotFoundError, match="not found"):
        download(f"{http_files.url}/absent.bin", tmp_path / "absent.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["payload.bin"]  # no partial files


def test_fsspec_file_url(tmp_path) -> None:
    (tmp_path / "src.tar").write_bytes(b"x" * 5000)
    download(f"file://{tmp_path}/src.tar", tmp_path / "copy.tar")
    assert (tmp_path / "copy.tar").read_bytes() == b"x" * 5000
    with pytest.raises(NotFoundError):
        download(f"file://{tmp_path}/nope.tar", tmp_path / "nope-copy.tar")


# -- oras:// ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_sif(tmp_path_factory) -> Path:
    """A SIF with a squashfs partition holding busybox (as ``hpcsif`` writes them)."""
    from hpcsif.sif.format import DataType, FSType, PartType
    from hpcsif.sif.writer import ObjectSpec, write_sif

    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs is not installed (squashfs-tools)")
    work = tmp_path_factory.mktemp("sif")
    root = work / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox_binary(), root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    squash = work / "root.squashfs"
    subprocess.run(
        ["mksquashfs", str(root), str(squash), "-noappend", "-quiet"], check=True, capture_output=True
    )
    part = ObjectSpec(DataType.PARTITION, path=squash, fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS)
    return write_sif(work / "small.sif", [ObjectSpec(DataType.DEFFILE, data=b"bootstrap: scratch\n"), part])


def test_oras_round_trip(registry_open, small_sif, tmp_path) -> None:
    ref = parse(registry_open.ref("team/small:1", transport="oras"))
    digest = push_sif(small_sif, ref)
    client = RegistryClient(registry_open.host, insecure=True)
    data, media_type, got = client.get_manifest("team/small", "1")
    assert got == digest and media_type == mt.OCI_MANIFEST
    manifest = json.loads(data)
    assert manifest["config"]["mediaType"] == mt.SIF_CONFIG
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == mt.SIF_LAYER
    assert layer["annotations"]["org.opencontainers.image.title"] == "small.sif"

    assert resolve(ref) == resolve(ref.with_digest(digest)) == layer["digest"]  # the SIF's own digest
    out = download_sif(ref, tmp_path / "pulled.sif")
    assert out.read_bytes() == small_sif.read_bytes()
    download_sif(ref.with_digest(digest), tmp_path / "again.sif", layer=layer["digest"])
    assert (tmp_path / "again.sif").read_bytes() == small_sif.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.sif", "pulled.sif"]  # nothing left aside


def test_oras_pull_refuses_a_container_image(registry_open, busybox_image, tmp_path) -> None:
    registry_open.push(busybox_image.oci_ref, "team/busybox:1.0")
    ref = parse(registry_open.ref("team/busybox:1.0", transport="oras"))
    with pytest.raises(SourceError, match="not a SIF artifact"):
        download_sif(ref, tmp_path / "x.sif")
    assert not (tmp_path / "x.sif").exists()


def test_oras_push_with_token_auth(registry_token, small_sif, tmp_path) -> None:
    ref = parse(registry_token.ref("private/small:1", transport="oras"))
    with pytest.raises(AuthError, match="authentication required"):
        push_sif(small_sif, ref)
    creds = Credentials(USER, PASSWORD, "test")
    push_sif(small_sif, ref, credentials=creds)
    out = download_sif(ref, tmp_path / "p.sif", credentials=creds)
    assert out.read_bytes() == small_sif.read_bytes()


def test_docker_source_refuses_an_oras_artifact(registry_open, small_sif, tmp_path) -> None:
    push_sif(small_sif, parse(registry_open.ref("team/small:2", transport="oras")))
    ref = parse(registry_open.ref("team/small:2"))
    with pytest.raises(SourceError, match="pull it with oras://"):
        get_source(ref).fetch(ref, OCIStore(tmp_path))


def test_oras_refuses_non_sif_files(registry_open, tmp_path) -> None:
    from hpcsif.image.digest import sha256_bytes

    fake = tmp_path / "fake.sif"
    fake.write_bytes(b"#!/bin/sh\necho not a sif\n" * 10)
    ref = parse(registry_open.ref("team/fake:1", transport="oras"))
    with pytest.raises(SourceError, match="not a SIF file"):
        push_sif(fake, ref)
    # an artifact that claims to be a SIF but is not
    client = RegistryClient(registry_open.host, insecure=True)
    data, config = fake.read_bytes(), b"{}"
    client.push_blob("team/fake", sha256_bytes(data), len(data), data)
    client.push_blob("team/fake", sha256_bytes(config), len(config), config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.SIF_CONFIG, "digest": sha256_bytes(config), "size": 2},
        "layers": [{"mediaType": mt.SIF_LAYER, "digest": sha256_bytes(data), "size": len(data)}],
    }
    client.put_manifest("team/fake", "1", json.dumps(manifest).encode(), mt.OCI_MANIFEST)
    with pytest.raises(SourceError, match="layer is not a SIF file"):
        download_sif(ref, tmp_path / "out.sif")
    assert not (tmp_path / "out.sif").exists()


def test_oras_pull_takes_the_prototype_sif_media_type(registry_open, small_sif, tmp_path) -> None:
    """Apptainer still pulls SIFs pushed with its prototype's layer media type (sic)."""
    from hpcsif.image.digest import sha256_bytes

    client = RegistryClient(registry_open.host, insecure=True)
    data, config = small_sif.read_bytes(), b"{}"
    client.push_blob("team/proto", sha256_bytes(data), len(data), data)
    client.push_blob("team/proto", sha256_bytes(config), len(config), config)
    layer = {
        "mediaType": "appliciation/vnd.sylabs.sif.layer.tar",
        "digest": sha256_bytes(data),
        "size": len(data),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.SIF_CONFIG, "digest": sha256_bytes(config), "size": 2},
        "layers": [layer],
    }
    client.put_manifest("team/proto", "1", json.dumps(manifest).encode(), mt.OCI_MANIFEST)
    out = download_sif(parse(registry_open.ref("team/proto:1", transport="oras")), tmp_path / "p.sif")
    assert out.read_bytes() == data
