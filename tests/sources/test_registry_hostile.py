"""A hostile or broken registry, through the CLI: ``hpcsif pull docker://…`` behind
:class:`~tests.services.faultproxy.FaultProxy` ends with one ``FATAL`` line, a non-zero status, no
traceback, no output file, in bounded time, the blob cache sound and no secret in the ``-d`` log."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.faultproxy import FaultProxy, fault_proxy
from tests.services.images import TestImage
from tests.services.registry import PASSWORD, USER
from tests.sources.helpers import assert_store_sound

pytestmark = pytest.mark.slow

REPO = "private/busybox"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: a parent whose only child is the pull reports that child's peak RSS (KiB)
PEAK = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


@pytest.fixture(scope="module")
def proxy(registry_basic, busybox_image: TestImage) -> Iterator[FaultProxy]:
    """A fault proxy before the Basic-auth registry, with a blob host on 127.0.0.2."""
    registry_basic.push(busybox_image.oci_ref, f"{REPO}:1")
    yield from fault_proxy(registry_basic.url, {})


@pytest.fixture
def manifest(busybox_image: TestImage) -> dict:
    """The busybox image manifest, for hand-made variants."""
    return json.loads(
        (busybox_image.layout / "blobs" / "sha256" / busybox_image.manifest_digest[7:]).read_bytes()
    )


def _pull(proxy: FaultProxy, tmp: Path, tag: str = "1", registry_conf: str = "") -> tuple[str, float]:
    """``hpcsif -d pull`` through the proxy; checks what every failure must hold, returns (FATAL line, s)."""
    env = {
        **os.environ,
        "SINGULARITY_DOCKER_USERNAME": USER,
        "SINGULARITY_DOCKER_PASSWORD": PASSWORD,
        "HPCSIF_CACHEDIR": str(tmp / "cache"),
    }
    if registry_conf:
        (tmp / "hpcsif.toml").write_text(f"[registry]\n{registry_conf}\n")
        env["HPCSIF_CONFIG"] = str(tmp / "hpcsif.toml")
    (tmp / "out").mkdir(exist_ok=True)
    ref = f"docker://{proxy.host}/{REPO}:{tag}"
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK,
            sys.executable,
            "-m",
            "hpcsif.cli.main",
            "-d",
            "pull",
            "--dir",
            str(tmp / "out"),
            ref,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - start
    err = proc.stderr
    fatal = [line for line in err.splitlines() if line.startswith("FATAL")]
    assert proc.returncode != 0 and len(fatal) == 1, err[-3000:]
    assert "internal error" not in err, err[-3000:]  # -d prints tracebacks, an unforeseen error says so
    assert PASSWORD not in err and "Authorization" not in err and "Basic " not in err, err
    assert list((tmp / "out").iterdir()) == []
    assert int(err.split("PEAK ")[1].split()[0]) < 200 * 1024, "more than 200 MiB of memory"
    assert not [p for p in (tmp / "cache").rglob("*") if p.is_file() and p.parent.parent.name == "sif"]
    work = tmp / "cache" / "tmp"
    assert not work.is_dir() or not list(work.iterdir()), "conversion leftovers"
    for oci in (tmp / "cache").rglob("oci"):
        if (oci / "blobs").is_dir():
            assert_store_sound(oci, partials=True)
    return fatal[0], took


def _doc(proxy: FaultProxy, doc: dict, ctype: str = OCI_MANIFEST, tag: str | None = None) -> str:
    """Serve ``doc`` by digest (and under ``tag``); returns its digest."""
    data = json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    proxy.documents[digest] = (data, ctype)
    if tag:
        proxy.documents[tag] = (data, ctype)
    return digest


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("token_html", "sent an unreadable answer"),
        ("token_list", "sent an unreadable answer"),
        ("token_number", "sent an unreadable answer"),
        ("token_empty", "sent an unreadable answer"),
        ("token_huge", "exceeded maximum allowed size"),
        ("auth_loop", "authentication failed"),
        ("challenge_junk", "Bearer challenge without a realm"),
        ("realm_file", "token realm 'file:///etc/passwd' is not an http(s) URL"),
    ],
)
def test_broken_token_server(proxy, tmp_path, fault, message) -> None:
    proxy.arm(**{fault: 1})
    line, took = _pull(proxy, tmp_path)
    assert message in line
    assert took < 30
    assert len(proxy.token_requests) <= 2  # no retry storm: a first token, then one fresh one


def test_realm_on_another_host_gets_no_password_over_plain_http(proxy, tmp_path) -> None:
    """A challenge sending us to another host: the password goes there only over https."""
    proxy.blob_host.seen.clear()
    proxy.arm(realm_other_host=1)
    line, _ = _pull(proxy, tmp_path)
    assert "127.0.0.2" in line
    assert all("Authorization" not in h for h in proxy.blob_host.seen)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("redirect_loop", "redirect loop (more than 10 redirects)"),
        ("redirect_file", "redirected to file:///etc/passwd"),
        ("endless_blob", "serves more than the"),
        ("long_blob", "serves more than the"),
        ("notfound", "blob unknown to the registry"),
    ],
)
def test_broken_blob_answers(proxy, tmp_path, fault, message) -> None:
    proxy.arm(**{fault: 1000})
    line, took = _pull(proxy, tmp_path)
    assert message in line
    assert took < 10


def test_server_text_cannot_forge_lines_or_escape_sequences(proxy, tmp_path) -> None:
    proxy.arm(evil_error=10)
    line, _ = _pull(proxy, tmp_path)
    assert line.endswith("HTTP 400 (DENIED: \\x1b[31mred\\nFATAL:   fake)"), line


def test_http10_close_delimited_blob_is_fine(proxy, tmp_path) -> None:
    proxy.arm(http10=1000)
    env = {"SINGULARITY_DOCKER_USERNAME": USER, "SINGULARITY_DOCKER_PASSWORD": PASSWORD}
    from tests.conftest import run_cli

    run_cli("pull", "--dir", str(tmp_path), f"docker://{proxy.host}/{REPO}:1", env=env)
    assert proxy.fired["http10"] >= 2
    assert len(list(tmp_path.glob("*.sif"))) == 1


def test_trickling_blob_times_out(proxy, tmp_path) -> None:
    """A blob at one byte a second ends after about ``registry.timeout`` seconds per try."""
    proxy.arm(trickle=1)
    line, took = _pull(proxy, tmp_path, registry_conf="timeout = 2\nretries = 0")
    assert "too slow: " in line and "(at least 1024 bytes/s needed)" in line
    assert took < 10


def test_endless_error_body_is_not_read_to_the_end(proxy, tmp_path) -> None:
    """A 500 whose body never ends: the error is reported from what little was read (all of it
    was read before, gigabytes)."""
    proxy.arm(endless_error=1000)
    line, took = _pull(proxy, tmp_path, registry_conf="retries = 1")
    assert line.endswith("/v2/: HTTP 500 Internal Server Error")
    assert took < 10


def test_server_error_forever_ends_after_the_retries(proxy, tmp_path) -> None:
    proxy.arm(error500=1000)
    line, took = _pull(proxy, tmp_path, registry_conf="retries = 1")
    assert line.endswith("/v2/: HTTP 500 (UNKNOWN: injected)")
    assert proxy.fired["error500"] == 2
    assert took < 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": -1}, "descriptor size -1 is not an integer byte count"),
        ({"size": 10**18}, "bytes, not the 1000000000000000000 bytes the manifest gives"),
        ({"digest": "sha512:" + "a" * 128}, "digest"),
        ({"digest": "sha256:" + "A" * 64}, "digest"),
        ({"digest": "sha256:zz"}, "digest"),
        ({"digest": 5}, "digest"),
    ],
)
def test_bad_layer_descriptor(proxy, tmp_path, manifest, change, message) -> None:
    manifest["layers"][0].update(change)
    _doc(proxy, manifest, tag="bad")
    proxy.arm()
    line, took = _pull(proxy, tmp_path, "bad")
    assert message in line
    assert took < 30


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(layers="x"), "'layers' is not a list"),
        (lambda m: m.update(layers={"a": 1}), "'layers' is not a list"),
        (lambda m: m["layers"].__setitem__(0, [1, 2]), "descriptor is not a JSON object: [1, 2]"),
        (lambda m: m.update(config=None), "'config' descriptor is not a JSON object: null"),
        (lambda m: m["layers"][0].update(size=1.5), "descriptor size 1.5 is not an integer"),
        (lambda m: m["layers"][0].update(digest=None), "a descriptor has no digest"),
        (lambda m: m["layers"][0].update(size=True), "descriptor size true is not an integer"),
        (lambda m: m.update(manifests="x", layers=None), "'manifests' is not a list"),
        (
            lambda m: m.update(manifests=[{**m["config"], "platform": "linux"}], layers=None),
            'platform "linux"',
        ),
    ],
)
def test_malformed_manifest(proxy, tmp_path, manifest, change, message) -> None:
    """Descriptors of the wrong JSON type: one line naming the manifest (crashes before)."""
    change(manifest)
    _doc(proxy, manifest, tag="odd")
    proxy.arm()
    line, _ = _pull(proxy, tmp_path, "odd")
    assert "/private/busybox:odd" in line and message in line


def test_ten_thousand_layers(proxy, tmp_path, manifest) -> None:
    """10^4 (empty) layers: converted in bounded time."""
    empty = b"\0" * 1024  # an empty tar archive
    digest = "sha256:" + hashlib.sha256(empty).hexdigest()
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [digest] * 10_000}}
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    proxy.blobs.update({digest: empty, config_digest: config})
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": len(empty)}
    manifest["config"].update(digest=config_digest, size=len(config))
    manifest["layers"] = [layer] * 10_000
    _doc(proxy, manifest, tag="many")
    proxy.arm()
    env = {"SINGULARITY_DOCKER_USERNAME": USER, "SINGULARITY_DOCKER_PASSWORD": PASSWORD}
    from tests.conftest import run_cli

    start = time.monotonic()
    run_cli("pull", "--dir", str(tmp_path), f"docker://{proxy.host}/{REPO}:many", env=env)
    assert time.monotonic() - start < 30
    assert len(list(tmp_path.glob("*.sif"))) == 1


def test_index_of_ten_thousand_manifests(proxy, tmp_path, manifest, busybox_image) -> None:
    desc = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 10}
    other = [{**desc, "platform": {"os": "plan9", "architecture": "mips"}}] * 10_000
    _doc(proxy, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": other}, OCI_INDEX, tag="wide")
    proxy.arm()
    line, took = _pull(proxy, tmp_path, "wide")
    assert "plan9" in line or "platform" in line
    assert took < 30


def test_deeply_nested_indexes(proxy, tmp_path, manifest, busybox_image) -> None:
    inner = {"mediaType": OCI_MANIFEST, "digest": busybox_image.manifest_digest, "size": 1}
    for _ in range(50):
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [inner]}
        inner = {"mediaType": OCI_INDEX, "digest": _doc(proxy, index, OCI_INDEX), "size": 1}
        inner["size"] = len(proxy.documents[inner["digest"]][0])
    proxy.documents["deep"] = proxy.documents[inner["digest"]]
    proxy.arm()
    line, took = _pull(proxy, tmp_path, "deep")
    assert "nest" in line
    assert took < 30


def test_index_served_as_a_manifest(proxy, tmp_path, manifest, busybox_image) -> None:
    """A Content-Type that lies: the document's own mediaType and shape decide."""
    desc = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 10}
    other = [{**desc, "platform": {"os": "plan9", "architecture": "mips"}}]
    _doc(proxy, {"schemaVersion": 2, "manifests": other}, OCI_MANIFEST, tag="liar")
    proxy.arm()
    line, _ = _pull(proxy, tmp_path, "liar")
    assert "liar" in line


def test_upload_location_on_another_host_gets_no_credentials(proxy, tmp_path, busybox_image) -> None:
    """``push``: the registry names an upload location elsewhere; our password does not follow."""
    from tests.conftest import run_cli

    sif = tmp_path / "x.sif"
    env = {"SINGULARITY_DOCKER_USERNAME": USER, "SINGULARITY_DOCKER_PASSWORD": PASSWORD}
    run_cli("pull", str(sif), f"docker://{proxy.host}/{REPO}:1", env=env)
    proxy.blob_host.seen.clear()
    proxy.arm(upload_elsewhere=10)
    proc = run_cli("push", str(sif), f"oras://{proxy.host}/{REPO}-sif:1", env=env, check=False)
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert proc.returncode != 0 and len(fatal) == 1 and "HTTP 403" in fatal[0], proc.stderr
    assert proxy.blob_host.seen and all("Authorization" not in h for h in proxy.blob_host.seen)


def test_token_realm_on_the_same_machine_by_another_name(registry_token, busybox_image, tmp_path) -> None:
    """``localhost`` and ``127.0.0.1`` are one machine: the realm there gets the credentials."""
    from tests.conftest import run_cli

    registry_token.push(busybox_image.oci_ref, "private/busybox:1")
    assert registry_token.token_server.realm.startswith("http://127.0.0.1:")
    env = {"SINGULARITY_DOCKER_USERNAME": USER, "SINGULARITY_DOCKER_PASSWORD": PASSWORD}
    ref = f"docker://localhost:{registry_token.port}/private/busybox:1"
    run_cli("pull", "--dir", str(tmp_path), ref, env=env)
    assert len(list(tmp_path.glob("*.sif"))) == 1
