"""docker:// against real registries on loopback: open, Basic auth and Bearer token auth."""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from hpcsif.errors import AuthError, NotFoundError
from hpcsif.image.model import Platform
from hpcsif.image.store import OCIStore
from hpcsif.refs import parse
from hpcsif.sources import get_source
from hpcsif.sources.credentials import Credentials
from tests.services.images import TestImage
from tests.services.registry import PASSWORD, USER, Registry
from tests.sources.helpers import assert_store_sound

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for prefix in ("HPCSIF", "APPTAINER", "SINGULARITY"):
        monkeypatch.delenv(f"{prefix}_DOCKER_USERNAME", raising=False)
        monkeypatch.delenv(f"{prefix}_DOCKER_PASSWORD", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


def _creds() -> Credentials:
    return Credentials(USER, PASSWORD, "test")


def _fetch(reg: Registry, repo_tag: str, store_dir: Path, **options):
    ref = parse(reg.ref(repo_tag))
    return get_source(ref, **options).fetch(ref, OCIStore(store_dir))


def _check_image(image, expected: TestImage) -> None:
    assert image.manifest_digest == expected.manifest_digest
    assert image.config_digest == expected.config_digest
    assert tuple(d.digest for d in image.layers) == expected.layer_digests
    assert image.container_config["Entrypoint"] == ["/bin/sh", "-c"]
    for blob in image.layer_blobs():
        assert blob.path.is_file()


def test_open_registry_tag_digest_and_repeat_blobs(registry_open, busybox_image, tmp_path, caplog) -> None:
    digest = registry_open.push(busybox_image.oci_ref, "team/busybox:1.0")
    assert digest == busybox_image.manifest_digest
    image = _fetch(registry_open, "team/busybox:1.0", tmp_path / "store")
    _check_image(image, busybox_image)
    assert assert_store_sound(tmp_path / "store") == 2 + len(busybox_image.layer_digests)
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [digest]

    # by digest, into the same store: every blob is a repeat
    with caplog.at_level(logging.INFO, logger="hpcsif"):
        again = _fetch(registry_open, f"team/busybox@{digest}", tmp_path / "store")
    _check_image(again, busybox_image)
    for layer in busybox_image.layer_digests:
        assert f"Skipping fetch of repeat blob {layer}" in caplog.text
    assert "Copying blob" not in caplog.text

    ref = parse(registry_open.ref("team/busybox:1.0"))
    assert get_source(ref).resolve(ref) == digest
    assert get_source(ref).resolve(ref.with_digest(digest)) == digest


def test_unknown_tag_and_repository(registry_open, busybox_image, tmp_path) -> None:
    registry_open.push(busybox_image.oci_ref, "team/busybox:1.0")
    with pytest.raises(NotFoundError, match=r"team/busybox:nope: manifest unknown"):
        _fetch(registry_open, "team/busybox:nope", tmp_path)
    with pytest.raises(NotFoundError, match="manifest unknown"):
        _fetch(registry_open, "team/absent:1", tmp_path)


def test_basic_auth(registry_basic, busybox_image, tmp_path) -> None:
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    _check_image(
        _fetch(registry_basic, "private/busybox:1", tmp_path / "a", credentials=_creds()), busybox_image
    )
    with pytest.raises(AuthError) as info:
        _fetch(registry_basic, "private/busybox:1", tmp_path / "b")
    assert str(info.value) == (
        f"authentication required for {registry_basic.host}/private/busybox: "
        "set HPCSIF_DOCKER_USERNAME and HPCSIF_DOCKER_PASSWORD, use --docker-login or --authfile FILE"
    )
    wrong = Credentials(USER, "wrong-password", "test")
    with pytest.raises(
        AuthError, match=r"authentication failed for .*private/busybox: the registry refused user"
    ):
        _fetch(registry_basic, "private/busybox:1", tmp_path / "c", credentials=wrong)


def test_basic_auth_from_environment(registry_basic, busybox_image, tmp_path, monkeypatch) -> None:
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    monkeypatch.setenv("SINGULARITY_DOCKER_USERNAME", USER)
    monkeypatch.setenv("SINGULARITY_DOCKER_PASSWORD", PASSWORD)
    _check_image(_fetch(registry_basic, "private/busybox:1", tmp_path), busybox_image)


def test_token_auth_with_credentials_reuses_one_token(registry_token, busybox_image, tmp_path) -> None:
    registry_token.push(busybox_image.oci_ref, "private/busybox:1")
    server = registry_token.token_server
    before = len(server.requests)
    ref = parse(registry_token.ref("private/busybox:1"))
    # separate source objects, as the cache uses one to resolve and another to fetch
    assert get_source(ref, credentials=_creds()).resolve(ref) == busybox_image.manifest_digest
    _check_image(get_source(ref, credentials=_creds()).fetch(ref, OCIStore(tmp_path)), busybox_image)
    requests = server.requests[before:]
    # one token for the repository's pull scope serves the resolve, the manifests and all blobs
    assert requests == [
        {"user": USER, "scopes": ["repository:private/busybox:pull"], "service": ["hpcsif-test-registry"]}
    ]


def test_token_auth_anonymous(registry_token, busybox_image, tmp_path) -> None:
    registry_token.push(busybox_image.oci_ref, "public/busybox:1")
    registry_token.push(busybox_image.oci_ref, "private/busybox:1")
    _check_image(_fetch(registry_token, "public/busybox:1", tmp_path / "a"), busybox_image)
    with pytest.raises(AuthError, match=r"authentication required for .*/private/busybox: set HPCSIF_DOCKER"):
        _fetch(registry_token, "private/busybox:1", tmp_path / "b")
    with pytest.raises(AuthError, match="authentication failed"):
        _fetch(registry_token, "private/busybox:1", tmp_path / "c", credentials=Credentials(USER, "bad", "t"))


def test_token_expiry_renews(registry_token, busybox_image, tmp_path) -> None:
    registry_token.push(busybox_image.oci_ref, "public/busybox:1")
    ref = parse(registry_token.ref("public/busybox:1"))
    source = get_source(ref)
    source.resolve(ref)
    client = source._clients(ref)[-1]
    for token in client._tokens.values():
        token.expires = 0  # as if the token had run out
    before = len(registry_token.token_server.requests)
    source.fetch(ref, OCIStore(tmp_path))
    assert len(registry_token.token_server.requests) == before + 1


def multi_arch_layout(
    busybox_image: TestImage,
    dest: Path,
    platforms: tuple[tuple[str, str | None], ...] = (("amd64", None), ("arm64", "v8")),
) -> tuple[Path, dict[str, str]]:
    """A copy of the busybox layout whose tag ``multi`` is an index for ``platforms`` (arch, variant).

    Each image's config carries the label ``org.test.platform`` = ``arch[/variant]``; the digests
    returned are keyed by architecture.
    """
    shutil.copytree(busybox_image.layout, dest)
    store = OCIStore(dest)
    manifest = store.read_json(busybox_image.manifest_digest)
    config = store.read_json(busybox_image.config_digest)
    entries, digests = [], {}
    for arch, variant in platforms:
        inner = dict(config.get("config") or {})
        inner["Labels"] = {
            **(inner.get("Labels") or {}),
            "org.test.platform": "/".join(filter(None, (arch, variant))),
        }
        cfg = dict(config, architecture=arch, config=inner, **({"variant": variant} if variant else {}))
        cdesc = store.put_json(cfg, manifest["config"]["mediaType"])
        man = copy.deepcopy(manifest)
        man["config"] = cdesc.to_json()
        mdesc = store.put_json(man, manifest["mediaType"])
        platform = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        entries.append(dict(mdesc.to_json(), platform=platform))
        digests[arch] = mdesc.digest
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    store.add_to_index(store.put_json(index, index["mediaType"]), "multi")
    return dest, digests


def test_index_platform_selection(registry_open, busybox_image, tmp_path) -> None:
    layout, digests = multi_arch_layout(busybox_image, tmp_path / "multi")
    import subprocess

    subprocess.run(
        ["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi",
         f"docker://{registry_open.host}/team/multi:1"],
        check=True, capture_output=True,
    )  # fmt: skip
    ref = parse(registry_open.ref("team/multi:1"))
    for arch in ("amd64", "arm64"):
        source = get_source(ref, platform=Platform(architecture=arch))
        assert source.resolve(ref) == digests[arch]
        image = source.fetch(ref, OCIStore(tmp_path / f"store-{arch}"))
        assert image.manifest_digest == digests[arch]
        assert image.architecture == arch
        assert_store_sound(tmp_path / f"store-{arch}")
    with pytest.raises(
        NotFoundError, match=r"no image for platform linux/s390x \(available: linux/amd64, linux/arm64/v8\)"
    ):
        get_source(ref, platform=Platform(architecture="s390x")).resolve(ref)


def test_mirror_is_tried_first_then_the_registry(
    registry_open, registry_basic, busybox_image, tmp_path
) -> None:
    from hpcsif.config import set_config
    from tests.sources.helpers import use_config

    registry_open.push(busybox_image.oci_ref, "mirrored/busybox:1")
    registry_basic.push(busybox_image.oci_ref, "upstream-only/busybox:1")
    use_config(mirrors={registry_basic.host: [registry_open.url]})
    try:
        # the mirror (open) serves it: no credentials needed although the registry wants them
        _check_image(_fetch(registry_basic, "mirrored/busybox:1", tmp_path / "a"), busybox_image)
        # the mirror lacks it: the registry itself answers (with credentials)
        image = _fetch(registry_basic, "upstream-only/busybox:1", tmp_path / "b", credentials=_creds())
        _check_image(image, busybox_image)
    finally:
        set_config(None)


def test_download_progress_counts_every_missing_byte(registry_open, busybox_image, tmp_path) -> None:
    registry_open.push(busybox_image.oci_ref, "team/busybox:1.0")
    calls: list[tuple[str, int, int]] = []
    image = _fetch(registry_open, "team/busybox:1.0", tmp_path, progress=lambda *a: calls.append(a))
    total = sum(d.size for d in image.layers) + len(image.store.read_blob(image.config_digest))
    assert calls[-1] == ("download", total, total)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    calls.clear()
    _fetch(registry_open, "team/busybox:1.0", tmp_path, progress=lambda *a: calls.append(a))
    assert calls == []  # nothing to download the second time


def test_a_blob_another_process_is_downloading_is_waited_for(
    registry_open, busybox_image, tmp_path, caplog
) -> None:
    import threading

    registry_open.push(busybox_image.oci_ref, "team/busybox:1.0")
    layer = busybox_image.layer_digests[0]
    (tmp_path / ".partial").mkdir()
    other = os.open(tmp_path / ".partial" / f"{layer[7:]}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # "another process" owns the download of the big layer
    result: list[object] = []
    with caplog.at_level(logging.INFO, logger="hpcsif"):
        worker = threading.Thread(
            target=lambda: result.append(_fetch(registry_open, "team/busybox:1.0", tmp_path))
        )
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and not result
        # the other process finishes: the blob appears, the lock is released
        shutil.copy(
            busybox_image.layout / "blobs" / "sha256" / layer[7:], tmp_path / "blobs" / "sha256" / layer[7:]
        )
        os.close(other)  # releases the flock
        worker.join(30)
    _check_image(result[0], busybox_image)
    assert f"waiting for another process downloading blob {layer}" in caplog.text
    assert f"Skipping fetch of repeat blob {layer}" in caplog.text
