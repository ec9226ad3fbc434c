"""docker:// through a fault-injecting proxy: the pull succeeds with verified content or fails clearly,
and the blob store never holds a blob whose content does not match its digest."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcsif.errors import IntegrityError, NetworkError, SourceError
from hpcsif.image.store import OCIStore
from hpcsif.refs import parse
from hpcsif.sources import get_source
from hpcsif.sources.credentials import Credentials
from tests.services.faultproxy import FaultProxy, fault_proxy
from tests.services.images import TestImage
from tests.services.registry import PASSWORD, USER
from tests.sources.helpers import assert_store_sound

pytestmark = pytest.mark.slow

REPO = "private/busybox:1"


@pytest.fixture(scope="module")
def proxy(registry_basic, busybox_image: TestImage) -> Iterator[FaultProxy]:
    """A fault proxy before the Basic-auth registry, with a blob host on 127.0.0.2."""
    registry_basic.push(busybox_image.oci_ref, REPO)
    blobs_dir = busybox_image.layout / "blobs" / "sha256"
    blobs = {"sha256:" + p.name: p.read_bytes() for p in blobs_dir.iterdir()}
    yield from fault_proxy(registry_basic.url, blobs)


def _pull(proxy: FaultProxy, store: Path, retries: int = 4):
    ref = parse(f"docker://{proxy.host}/{REPO}")
    source = get_source(ref, credentials=Credentials(USER, PASSWORD, "test"), retries=retries, backoff=0.01)
    return source.fetch(ref, OCIStore(store))


def _assert_complete(image, busybox_image: TestImage, store: Path) -> None:
    assert image.manifest_digest == busybox_image.manifest_digest
    assert assert_store_sound(store) == 2 + len(busybox_image.layer_digests)


def test_reset_mid_blob_is_survived(proxy, busybox_image, tmp_path) -> None:
    proxy.arm(reset=2)
    image = _pull(proxy, tmp_path)
    assert proxy.fired["reset"] == 2
    _assert_complete(image, busybox_image, tmp_path)


def test_connection_cut_mid_blob_resumes_with_range(proxy, busybox_image, tmp_path) -> None:
    proxy.arm(cut=2)
    image = _pull(proxy, tmp_path)
    assert proxy.fired["cut"] == 2
    # both resumptions asked for the rest only
    assert len(proxy.ranges) == 2 and not any(r.startswith("bytes=0-") for r in proxy.ranges)
    _assert_complete(image, busybox_image, tmp_path)


def test_server_errors_are_retried(proxy, busybox_image, tmp_path) -> None:
    proxy.arm(error500=3)
    image = _pull(proxy, tmp_path)
    assert proxy.fired["error500"] == 3
    _assert_complete(image, busybox_image, tmp_path)


def test_429_honours_retry_after(proxy, busybox_image, tmp_path) -> None:
    proxy.arm(throttle=1)
    start = time.monotonic()
    image = _pull(proxy, tmp_path)
    assert proxy.fired["throttle"] == 1
    assert time.monotonic() - start >= 1.0  # Retry-After: 1, although our own backoff is 10 ms
    _assert_complete(image, busybox_image, tmp_path)


@pytest.mark.parametrize("fault", ["wrong", "short"])
def test_bad_blob_is_discarded_and_refetched(proxy, busybox_image, tmp_path, fault) -> None:
    proxy.arm(**{fault: 1})
    image = _pull(proxy, tmp_path)
    assert proxy.fired[fault] == 1
    _assert_complete(image, busybox_image, tmp_path)


def test_persistently_wrong_blob_fails_clearly_and_keeps_nothing(proxy, busybox_image, tmp_path) -> None:
    proxy.arm(wrong=100)
    with pytest.raises(IntegrityError, match=r"the registry serves corrupt content \(downloaded twice"):
        _pull(proxy, tmp_path, retries=4)
    # every blob the proxy corrupts (those over 200 bytes) was downloaded twice, never kept: the same
    # wrong bytes twice are the registry's, and retrying them (with backoff) only delays the error
    blobs = [busybox_image.layout / "blobs" / "sha256" / d[7:] for d in busybox_image.layer_digests]
    big = sum(1 for p in blobs if p.stat().st_size > 200) + 1  # + the config
    assert 2 <= proxy.fired["wrong"] <= 2 * big
    assert_store_sound(tmp_path)
    assert not OCIStore(tmp_path).has_blob(busybox_image.layer_digests[0])


def test_persistent_cuts_fail_clearly_and_the_next_pull_resumes(proxy, busybox_image, tmp_path) -> None:
    proxy.arm(cut=100)
    with pytest.raises(NetworkError, match=r"download failed after 3 tries"):
        _pull(proxy, tmp_path, retries=2)
    assert_store_sound(tmp_path, partials=True)
    layer = busybox_image.layer_digests[0]  # the only blob large enough to be cut
    kept = (tmp_path / ".partial" / layer[7:]).stat().st_size
    assert kept > 0
    proxy.arm()
    _assert_complete(_pull(proxy, tmp_path), busybox_image, tmp_path)
    assert proxy.ranges == [f"bytes={kept}-"]


@pytest.mark.parametrize("garbage", [False, True])
def test_partial_left_by_another_process(proxy, busybox_image, tmp_path, garbage) -> None:
    layer = busybox_image.layer_digests[0]
    data = (busybox_image.layout / "blobs" / "sha256" / layer[7:]).read_bytes()
    half = data[: len(data) // 2]
    (tmp_path / ".partial").mkdir()
    (tmp_path / ".partial" / layer[7:]).write_bytes(bytes(len(half)) if garbage else half)
    proxy.arm()
    _assert_complete(_pull(proxy, tmp_path), busybox_image, tmp_path)
    # resumed at the half; a garbage prefix fails verification and the blob is fetched whole
    assert proxy.ranges == [f"bytes={len(half)}-"]
    assert OCIStore(tmp_path).read_blob(layer) == data


def test_redirect_to_other_host_does_not_leak_authorization(proxy, busybox_image, tmp_path) -> None:
    proxy.blob_host.seen.clear()
    proxy.arm(redirect=100)
    image = _pull(proxy, tmp_path)
    assert proxy.fired["redirect"] == 1 + len(busybox_image.layer_digests)  # config and layers
    assert len(proxy.blob_host.seen) == proxy.fired["redirect"]
    assert all("Authorization" not in h for h in proxy.blob_host.seen)
    _assert_complete(image, busybox_image, tmp_path)


def test_schema1_manifest_is_refused(proxy, tmp_path) -> None:
    proxy.arm(schema1=1)
    with pytest.raises(SourceError, match="Docker schema 1 manifests are not supported"):
        _pull(proxy, tmp_path)


def test_endless_manifest_is_cut_off_at_the_limit(proxy, tmp_path) -> None:
    """A registry answering with an endless manifest: refused at 4 MiB, in bounded memory."""
    import os
    import subprocess
    import sys

    proxy.arm(huge_manifest=1)
    (tmp_path / "out").mkdir()
    env = {
        **os.environ,
        "SINGULARITY_DOCKER_USERNAME": USER,
        "SINGULARITY_DOCKER_PASSWORD": PASSWORD,
        "HPCSIF_CACHEDIR": str(tmp_path / "cache"),
    }
    # a parent whose only child is the pull reports that child's peak RSS
    peak = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
    )
    cmd = [sys.executable, "-c", peak, sys.executable, "-m", "hpcsif.cli.main", "pull", "--nohttps"]
    proc = subprocess.run(
        [*cmd, "--dir", str(tmp_path / "out"), f"docker://{proxy.host}/{REPO}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and "exceeded maximum allowed size of 4194304 bytes" in fatal[0], proc.stderr
    assert proxy.fired["huge_manifest"] == 1
    peak_kib = int(proc.stderr.split("PEAK ")[1].split()[0])
    assert peak_kib < 150 * 1024, f"{peak_kib} KiB"
    assert not list((tmp_path / "out").iterdir())


def test_unreachable_registry_is_one_readable_line(tmp_path) -> None:
    """Nothing listens: the error names the address and the cause, not the HTTP stack's repr."""
    import socket

    from tests.conftest import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    proc = run_cli("pull", "--dir", str(tmp_path), f"docker://127.0.0.1:{port}/team/app:1", check=False)
    assert proc.returncode != 0
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert fatal == [f"FATAL:   cannot reach http://127.0.0.1:{port}/v2/: connection refused"]
    assert "retrying" not in proc.stderr  # a registry that never answered is down: no minute of backoff
    assert list(tmp_path.iterdir()) == []


def test_unknown_host_fails_at_once(tmp_path) -> None:
    """A name that does not resolve (``.invalid`` never does) is one line, without retries."""
    from tests.conftest import run_cli

    proc = run_cli("pull", "--dir", str(tmp_path), "docker://registry.invalid/team/app:1", check=False)
    assert proc.returncode == 255
    assert proc.stderr.splitlines() == [
        "FATAL:   cannot reach https://registry.invalid/v2/: name or service not known"
    ]
