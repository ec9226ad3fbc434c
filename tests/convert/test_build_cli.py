"""``hpcsif build`` / ``inspect`` / ``sif list`` end to end, checked with real squashfs tools and bwrap."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_docker_archive, write_oci_layout
from hpcsif.sif.reader import SIFImage
from tests.conftest import error_lines, run_cli
from tests.services.images import TestImage

pytestmark = pytest.mark.slow


def partition_offset(sif: Path) -> int:
    with SIFImage.open(sif) as img:
        return img.primary_partition().offset


def unpack(sif: Path, dest: Path) -> Path:
    """Unpack the SIF's partition with the real unsquashfs."""
    subprocess.run(
        ["unsquashfs", "-q", "-n", "-o", str(partition_offset(sif)), "-d", str(dest), str(sif)],
        check=True,
        capture_output=True,
    )
    return dest


def bwrap_run(root: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run a command inside an unpacked root with bubblewrap, as issue 2's checks ask."""
    return subprocess.run(
        ["bwrap", "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev", "--clearenv", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


def skopeo(src: str, dest: str) -> None:
    subprocess.run(["skopeo", "copy", "-q", src, dest], check=True, capture_output=True)


def assert_busybox_tree(root: Path, image: TestImage) -> None:
    for rel, content in image.files.items():
        assert (root / rel).read_bytes() == content, rel
    for rel in image.removed:
        assert not (root / rel).exists(), f"{rel} should be whited out"
    assert not list(root.rglob(".wh.*")), "whiteout markers leaked into the image"


def assert_no_leftovers(directory: Path, *allowed: str) -> None:
    extra = sorted(p.name for p in directory.iterdir() if p.name not in allowed)
    assert not extra, f"left behind: {extra}"


@pytest.fixture(scope="module")
def archives(busybox_image: TestImage, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The busybox image as oci-archive, docker-archive and gzip'd docker-archive, made by skopeo."""
    d = tmp_path_factory.mktemp("archives")
    skopeo(busybox_image.oci_ref, f"oci-archive:{d / 'bb-oci.tar'}:latest")
    skopeo(busybox_image.oci_ref, f"docker-archive:{d / 'bb-docker.tar'}:test/busybox:latest")
    (d / "bb-docker.tar.gz").write_bytes(gzip.compress((d / "bb-docker.tar").read_bytes()))
    return {
        "oci-archive": d / "bb-oci.tar",
        "docker-archive": d / "bb-docker.tar",
        "gz": d / "bb-docker.tar.gz",
    }


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive", "gz"])
def test_build_from_each_local_transport(
    kind: str, busybox_image: TestImage, archives: dict[str, Path], tmp_path: Path
) -> None:
    source = {
        "oci": f"oci://{busybox_image.layout}:latest",
        "oci-archive": f"oci-archive://{archives['oci-archive']}",
        "docker-archive": f"docker-archive://{archives['docker-archive']}",
        "gz": f"docker-archive://{archives['gz']}",
    }[kind]
    sif = tmp_path / "out.sif"
    run_cli("build", str(sif), source)
    assert sif.stat().st_mode & 0o111, "a SIF is executable"
    assert sif.read_bytes()[:32].startswith(b"#!/usr/bin/env run-singularity\n")
    assert_no_leftovers(tmp_path, "out.sif")
    root = unpack(sif, tmp_path / "root")
    assert_busybox_tree(root, busybox_image)
    # the runscript (ENTRYPOINT sh -c + CMD) runs in the unpacked tree under bwrap
    proc = bwrap_run(root, "/bin/sh", "/.singularity.d/actions/run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello from busybox"
    proc = bwrap_run(root, "/bin/sh", "/.singularity.d/actions/exec", "/bin/sh", "-c", 'echo "$GREETING"')
    assert proc.stdout.strip() == "hello world"


def test_inspect_and_sif_list(busybox_image: TestImage, tmp_path: Path) -> None:
    sif = tmp_path / "bb.sif"
    run_cli("build", str(sif), f"oci://{busybox_image.layout}")
    labels = run_cli("inspect", str(sif)).stdout
    assert "org.label-schema.usage.singularity.deffile.bootstrap: oci\n" in labels
    assert f"org.label-schema.usage.singularity.deffile.from: {busybox_image.layout}\n" in labels
    as_json = json.loads(run_cli("inspect", "--json", "--labels", "--runscript", str(sif)).stdout)
    assert "OCI_ENTRYPOINT" in as_json["data"]["attributes"]["runscript"]
    assert (
        run_cli("inspect", "--deffile", str(sif)).stdout == f"bootstrap: oci\nfrom: {busybox_image.layout}\n"
    )
    env = run_cli("inspect", "--environment", str(sif)).stdout
    assert "=== /.singularity.d/env/10-docker2singularity.sh ===" in env and "HPCSIF_TEST" in env
    table = run_cli("sif", "list", str(sif)).stdout
    for kind in ("Def.FILE", "JSON.Generic", "FS (Squashfs/*System/amd64)"):
        assert kind in table


def test_several_images_need_a_ref(busybox_image: TestImage, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(busybox_image.layout, layout)
    tiny = ImageSpec([layer_tar([Entry("hello.txt", b"second image\n")])], cmd=["/bin/sh"])
    write_oci_layout(layout, tiny, tag="v2")
    proc = run_cli("build", str(tmp_path / "x.sif"), f"oci://{layout}", check=False)
    assert proc.returncode != 0
    line = proc.stderr.strip()
    assert line.startswith("FATAL:") and "\n" not in line
    assert "latest" in line and "v2" in line
    run_cli("build", str(tmp_path / "x.sif"), f"oci://{layout}:v2")
    root = unpack(tmp_path / "x.sif", tmp_path / "root")
    assert (root / "hello.txt").read_text() == "second image\n"


def test_docker_archive_with_several_images(tmp_path: Path) -> None:
    one = ImageSpec([layer_tar([Entry("which", b"one\n")])])
    two = ImageSpec([layer_tar([Entry("which", b"two\n")])])
    archive = write_docker_archive(tmp_path / "multi.tar", [("team/one:1.0", one), ("team/two:2.0", two)])
    proc = run_cli("build", str(tmp_path / "x.sif"), f"docker-archive://{archive}", check=False)
    assert proc.returncode != 0 and "team/one:1.0" in proc.stderr and "team/two:2.0" in proc.stderr
    run_cli("build", str(tmp_path / "x.sif"), f"docker-archive://{archive}:team/two:2.0")
    assert (unpack(tmp_path / "x.sif", tmp_path / "r") / "which").read_text() == "two\n"


def test_sandbox_round_trip(busybox_image: TestImage, tmp_path: Path) -> None:
    box = tmp_path / "box"
    run_cli("build", "--sandbox", str(box), f"oci://{busybox_image.layout}:latest")
    assert_busybox_tree(box, busybox_image)
    assert (box / ".singularity.d" / "runscript").is_file()
    (box / "added.txt").write_text("written in the sandbox\n")
    sif = tmp_path / "from-box.sif"
    run_cli("build", str(sif), str(box))
    assert (unpack(sif, tmp_path / "r1") / "added.txt").read_text() == "written in the sandbox\n"
    assert "bootstrap: localimage" in run_cli("inspect", "--deffile", str(sif)).stdout
    box2 = tmp_path / "box2"
    run_cli("build", "--sandbox", str(box2), str(sif))
    assert (box2 / "added.txt").read_text() == "written in the sandbox\n"
    assert_no_leftovers(tmp_path, "box", "box2", "from-box.sif", "r1")


def test_sif_to_sif_and_sandbox_to_sandbox(busybox_image: TestImage, tmp_path: Path) -> None:
    """As ``apptainer build new.sif old.sif``: a SIF repacked (here with another codec)."""
    sif = tmp_path / "a.sif"
    run_cli("build", str(sif), f"oci://{busybox_image.layout}:latest")
    gz = tmp_path / "gz.sif"
    run_cli("build", "--compression", "gzip", str(gz), str(sif))
    info = subprocess.run(
        ["unsquashfs", "-s", "-o", str(partition_offset(gz)), str(gz)], capture_output=True, text=True
    ).stdout
    assert "Compression gzip" in info
    root = unpack(gz, tmp_path / "r")
    assert_busybox_tree(root, busybox_image)
    assert bwrap_run(root, "/.singularity.d/runscript", "echo", "repacked").returncode == 0
    assert f"from: {sif}" in run_cli("inspect", "--deffile", str(gz)).stdout
    # the build labels are renewed, as Apptainer renews them, in the metadata and in the image
    labels = json.loads(run_cli("inspect", "--json", "--labels", str(gz)).stdout)["data"]["attributes"][
        "labels"
    ]
    inside = json.loads((root / ".singularity.d" / "labels.json").read_text())
    for found in (labels, inside):
        assert found["org.label-schema.usage.singularity.deffile.bootstrap"] == "localimage"
        assert found["org.label-schema.usage.singularity.deffile.from"] == str(sif)
    box = tmp_path / "box"
    run_cli("build", "--sandbox", str(box), str(sif))
    (box / "bin" / "sh-link").symlink_to("busybox")
    box2 = tmp_path / "box2"
    run_cli("build", "--sandbox", str(box2), str(box))
    assert_busybox_tree(box2, busybox_image)
    assert (box2 / "bin" / "sh-link").is_symlink()
    assert_no_leftovers(tmp_path, "a.sif", "gz.sif", "r", "box", "box2")


def test_sandbox_metadata_links_do_not_copy_host_files(busybox_image: TestImage, tmp_path: Path) -> None:
    """A sandbox whose runscript and labels.json are links to host files: a root build of it
    must not copy those files into the SIF's metadata (it read through the links)."""
    box = tmp_path / "box"
    run_cli("build", "--sandbox", str(box), f"oci://{busybox_image.layout}:latest")
    secret = tmp_path / "host-secret.json"
    secret.write_text('{"stolen": "host secret"}')
    for name in ("runscript", "labels.json"):
        (box / ".singularity.d" / name).unlink()
        (box / ".singularity.d" / name).symlink_to(secret)
    out = tmp_path / "out.sif"
    run_cli("build", str(out), str(box))
    assert "host secret" not in run_cli("inspect", "--json", "--all", str(out)).stdout


def test_usr_merged_image_with_a_layer_below_bin(tmp_path: Path) -> None:
    """A hand-made layer adding ``bin/hello`` over ``bin -> usr/bin`` lands in usr/bin, as with
    Apptainer, and the image's shell stays: the symlink is written through, not replaced."""
    from tests.services.images import busybox_binary

    base = [
        Entry("usr/"),
        Entry("usr/bin/"),
        Entry("usr/bin/busybox", busybox_binary().read_bytes(), 0o755),
        Entry("usr/bin/sh", symlink="busybox"),
        Entry("bin", symlink="usr/bin"),
    ]
    app = [Entry("bin/hello", b"#!/bin/sh\necho hello from usr/bin\n", 0o755)]
    write_oci_layout(tmp_path / "lay", ImageSpec([layer_tar(base), layer_tar(app)], cmd=["/bin/hello"]))
    sif = tmp_path / "merged.sif"
    run_cli("build", str(sif), f"oci://{tmp_path / 'lay'}")
    root = unpack(sif, tmp_path / "r")
    assert os.readlink(root / "bin") == "usr/bin"
    assert (root / "usr/bin/hello").is_file() and (root / "usr/bin/busybox").is_file()
    assert bwrap_run(root, "/.singularity.d/runscript").stdout == "hello from usr/bin\n"


def test_existing_target_needs_force(busybox_image: TestImage, tmp_path: Path) -> None:
    sif = tmp_path / "a.sif"
    sif.write_bytes(b"precious")
    proc = run_cli("build", str(sif), f"oci://{busybox_image.layout}", check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr
    assert sif.read_bytes() == b"precious"
    run_cli("build", "--force", str(sif), f"oci://{busybox_image.layout}")
    assert sif.read_bytes()[:32].startswith(b"#!/usr/bin/env run-singularity")


def corrupt_copy(layout: Path, dest: Path, digest: str) -> Path:
    shutil.copytree(layout, dest)
    blob = dest / "blobs" / "sha256" / digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    return dest


def test_errors_are_one_line_and_leave_nothing(busybox_image: TestImage, archives, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archives["docker-archive"].read_bytes()[:300_000])
    bad_layout = corrupt_copy(busybox_image.layout, tmp_path / "bad", busybox_image.layer_digests[0])
    cases = {
        "bogus://x": "unknown transport",
        f"docker-archive://{tmp_path / 'missing.tar'}": "no such file",
        f"docker-archive://{truncated}": "truncated",
        f"oci://{bad_layout}": busybox_image.layer_digests[0],
        f"oci://{busybox_image.layout}:nope": "no image with reference 'nope'",
    }
    for source, message in cases.items():
        proc = run_cli("build", str(out / "x.sif"), source, check=False)
        assert proc.returncode != 0, source
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("FATAL:"), (source, proc.stderr)
        assert message in lines[0], (source, lines[0])
        assert_no_leftovers(out)
    proc = run_cli("build", str(tmp_path / "nodir" / "x.sif"), f"oci://{busybox_image.layout}", check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_gzip_compression_flag(busybox_image: TestImage, tmp_path: Path) -> None:
    sif = tmp_path / "gz.sif"
    run_cli("build", "--compression", "gzip", str(sif), f"oci://{busybox_image.layout}")
    with SIFImage.open(sif) as img:
        part = img.primary_partition()
    info = subprocess.run(
        ["unsquashfs", "-s", "-o", str(part.offset), str(sif)], capture_output=True, text=True, check=True
    ).stdout
    assert "Compression gzip" in info


def test_build_from_a_private_registry(busybox_image: TestImage, registry_token, tmp_path: Path) -> None:
    """``build app.sif docker://…`` against the token-auth registry, credentials from Singularity's vars."""
    registry_token.push(busybox_image.oci_ref, "team/bb:1.0")
    sif = tmp_path / "bb.sif"
    proc = run_cli("build", str(sif), registry_token.ref("team/bb:1.0"), check=False)
    assert proc.returncode != 0 and "authentication required" in proc.stderr
    assert not sif.exists()
    creds = {"SINGULARITY_DOCKER_USERNAME": registry_token.username, "SINGULARITY_DOCKER_PASSWORD": "wrong"}
    proc = run_cli("-d", "build", str(sif), registry_token.ref("team/bb:1.0"), check=False, env=creds)
    assert proc.returncode != 0 and "wrong" not in proc.stderr
    creds["SINGULARITY_DOCKER_PASSWORD"] = registry_token.password
    proc = run_cli("-d", "build", str(sif), registry_token.ref("team/bb:1.0"), env=creds)
    assert registry_token.password not in proc.stderr + proc.stdout
    assert_busybox_tree(unpack(sif, tmp_path / "root"), busybox_image)
    assert f"from: {registry_token.host}/team/bb:1.0" in run_cli("inspect", "--deffile", str(sif)).stdout


def test_pull_of_a_named_archive_image_gets_a_plain_file_name(archives, tmp_path: Path) -> None:
    """``docker-archive:FILE:NAME:TAG`` is named as a registry image would be (the slash in NAME
    made the default name a path into a missing directory)."""
    ref = f"docker-archive:{archives['docker-archive']}:test/busybox:latest"
    run_cli("pull", ref, cwd=tmp_path, env={"HPCSIF_CACHEDIR": str(tmp_path / "cache")})
    assert (tmp_path / "bb-docker.tar_busybox_latest.sif").is_file()


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive", "gz"])
def test_build_from_a_pipe(kind: str, archives, busybox_image: TestImage, tmp_path: Path) -> None:
    """``docker save img | hpcsif build out.sif docker-archive:/dev/stdin`` (it failed with
    'Illegal seek'); pull, which caches by the input's digest, says why it cannot."""
    transport = "docker-archive" if kind == "gz" else kind
    out = tmp_path / "out.sif"
    data = archives[kind].read_bytes()  # through a pipe
    build_cmd = [sys.executable, "-m", "hpcsif.cli.main", "build", str(out), f"{transport}:/dev/stdin"]
    proc = subprocess.run(build_cmd, input=data, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert_busybox_tree(unpack(out, tmp_path / "r"), busybox_image)
    pull_cmd = [
        sys.executable,
        "-m",
        "hpcsif.cli.main",
        "pull",
        str(tmp_path / "p.sif"),
        f"{transport}:/dev/stdin",
    ]
    proc = subprocess.run(pull_cmd, input=data, capture_output=True, text=False)
    proc.stderr = proc.stderr.decode()
    assert proc.returncode == 255 and "a pipe or device can be read once only" in proc.stderr
    assert not (tmp_path / "p.sif").exists()
