"""Reference parsing for every transport."""

from __future__ import annotations

import pytest

from hpcsif.errors import ReferenceError
from hpcsif.refs import parse


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("docker://godlovedc/lolcow", "index.docker.io", "godlovedc/lolcow", "latest", None),
        ("docker://alpine", "index.docker.io", "library/alpine", "latest", None),
        ("docker://docker.io/alpine:3.19", "index.docker.io", "library/alpine", "3.19", None),
        ("docker://nvcr.io/nvidia/pytorch:18.11-py3", "nvcr.io", "nvidia/pytorch", "18.11-py3", None),
        ("docker://localhost:5000/team/app:1.2", "localhost:5000", "team/app", "1.2", None),
        ("docker://127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None),
        (
            "docker://registry:5000/team/app@sha256:" + "a" * 64,
            "registry:5000",
            "team/app",
            None,
            "sha256:" + "a" * 64,
        ),
        ("docker://r.io/a/b/c:t@sha256:" + "b" * 64, "r.io", "a/b/c", "t", "sha256:" + "b" * 64),
        ("oras://127.0.0.1:5000/team/app:1.2", "127.0.0.1:5000", "team/app", "1.2", None),
    ],
)
def test_registry_references(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_short_names_follow_apptainer() -> None:
    assert parse("docker://godlovedc/lolcow").short_name() == "lolcow_latest"
    assert parse("docker://nvcr.io/nvidia/pytorch:18.11-py3").short_name() == "pytorch_18.11-py3"
    assert parse("docker://r.io/app@sha256:" + "c" * 64).short_name() == "app@sha256_" + "c" * 64


def test_cache_names_stay_short(tmp_path) -> None:
    assert parse("docker://nvcr.io/nvidia/pytorch:18.11-py3").cache_name() == "pytorch_18.11-py3"
    assert parse("docker://r.io/app@sha256:" + "c" * 64).cache_name() == "app_" + "c" * 12
    archive = tmp_path / "img.tar.gz"
    archive.touch()
    assert parse(f"docker-archive://{archive}:app:1").cache_name() == "img"
    assert parse(f"docker-archive://{archive}").short_name() == "img.tar.gz_latest"


def test_file_transports_split_the_ref(tmp_path) -> None:
    layout = tmp_path / "lay:out"
    layout.mkdir()
    assert (parse(f"oci://{layout}").path, parse(f"oci://{layout}").name) == (str(layout), None)
    ref = parse(f"oci://{layout}:v1")
    assert (ref.path, ref.name) == (str(layout), "v1")
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"")
    ref = parse(f"docker-archive://{archive}:team/app:1.2")
    assert (ref.path, ref.name) == (str(archive), "team/app:1.2")
    ref = parse(f"oci-archive:{archive}:latest")  # Apptainer's single-colon spelling
    assert (ref.transport, ref.path, ref.name) == ("oci-archive", str(archive), "latest")
    digest = "sha256:" + "0" * 64  # Apptainer's oci:DIR@DIGEST, which its own errors ask for
    ref = parse(f"oci:{layout}@{digest}")
    assert (ref.transport, ref.path, ref.name) == ("oci", str(layout), digest)


def test_local_paths(tmp_path) -> None:
    (tmp_path / "x.sif").write_bytes(b"")
    assert parse(str(tmp_path / "x.sif")).transport == "sif"
    assert parse(str(tmp_path)).transport == "sandbox"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty image reference"),
        ("bogus://x", "unknown transport 'bogus'"),
        ("docker://UPPER/Case", "invalid repository name component"),
        ("docker://app:bad tag", "invalid tag"),
        ("docker://app@sha256:zz", "invalid digest"),
        ("docker-daemon://team/app", "need a tag"),
        ("/no/such/file.sif", "no such file or directory"),
        ("library://alpine", "not supported"),
    ],
)
def test_bad_references(text: str, message: str) -> None:
    with pytest.raises(ReferenceError, match=message):
        parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("docker://127.0.0.1:1/app:tag\n", "invalid tag"),
        ("docker://127.0.0.1:1/app\n", "invalid repository name component"),
        ("docker://127.0.0.1:1/app@sha256:" + "a" * 64 + "\n", "invalid digest"),
        ("docker://127.0.0.1:1\n/app", "invalid registry"),
    ],
)
def test_a_trailing_newline_is_no_part_of_a_name(text: str, message: str) -> None:
    """A name ending in a newline is refused in one line before anything is fetched (a regular
    expression's ``$`` matched before it, and the pull went on with the newline in its URLs)."""
    from tests.conftest import run_cli

    res = run_cli("pull", "/nonexistent-dir/x.sif", text, check=False)
    assert res.returncode != 0
    assert res.stderr.startswith("FATAL:   ") and message in res.stderr, res.stderr
    assert "cannot reach" not in res.stderr
