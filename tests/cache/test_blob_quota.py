"""Downloaded blobs count towards ``cache.quota`` and go before any converted image."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cache.conftest import CacheEnv, reap
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

BLOB_USER = """
import sys
from pathlib import Path
from hpcsif.cache.blobs import blobs_in_use
from hpcsif.cache.layout import CacheRoot
with blobs_in_use(CacheRoot(Path(sys.argv[1])).ensure()):
    print("using", flush=True)
    sys.stdin.read()
"""


def _blob_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "oci" / "blobs" / "sha256").iterdir() if not p.name.startswith(".")]


def _sifs(cache: Path) -> list[Path]:
    return list((cache / "sif").glob("*/*.sif"))


@pytest.fixture
def pulled(cache_env: CacheEnv, busybox_image, registry_open, tmp_path: Path) -> str:
    """A registry image pulled once through the cache (its SIF and blobs stored); returns the ref."""
    registry_open.push(busybox_image.oci_ref, "quota/bb:1")
    ref = registry_open.ref("quota/bb:1")
    run_cli("pull", "--nohttps", str(tmp_path / "bb.sif"), ref)
    assert _blob_files(cache_env.cache) and len(_sifs(cache_env.cache)) == 1
    return ref


def test_gc_removes_blobs_before_images(cache_env: CacheEnv, pulled: str) -> None:
    cache = cache_env.cache
    sif_size = _sifs(cache)[0].stat().st_size
    blob_bytes = sum(p.stat().st_size for p in _blob_files(cache))
    # room for the image and not for its blobs: the blobs go, the image stays
    quota = str(sif_size + blob_bytes // 4)
    dry = run_cli("cache", "gc", "--dry-run", "--quota", quota).stdout
    assert "would remove" in dry and "oci blob file(s)" in dry and "0 image(s) would evict" in dry
    assert _blob_files(cache), "a dry run removes nothing"
    out = run_cli("cache", "gc", "--quota", quota).stdout
    assert "removed" in out and "0 image(s) evicted" in out
    left = sum(p.stat().st_size for p in _blob_files(cache))
    assert sif_size + left <= int(quota)
    assert len(_sifs(cache)) == 1
    assert any(r["event"] == "evict-blobs" for r in cache_env.root.read_journal())
    # below the image's own size the image goes too
    out = run_cli("cache", "gc", "--quota", "1").stdout
    assert "1 image(s) evicted" in out
    assert not _sifs(cache) and not _blob_files(cache)
    assert "There are 0 container file(s)" in run_cli("cache", "list").stdout


def test_a_conversion_beyond_the_quota_keeps_its_image_and_drops_its_blobs(
    cache_env: CacheEnv, pulled: str, tmp_path: Path
) -> None:
    cache = cache_env.cache
    sif_size = _sifs(cache)[0].stat().st_size
    run_cli("cache", "clean", "--force")
    cache_env.configure(quota=sif_size + 64)
    run_cli("pull", "--nohttps", str(tmp_path / "again.sif"), pulled)
    assert len(_sifs(cache)) == 1, "the image just converted is never evicted"
    assert not _blob_files(cache), "its blobs exceed the quota and are removed after publishing"
    # the next conversion downloads them again
    run_cli("cache", "clean", "--force", "--type", "sif")
    run_cli("pull", "--nohttps", str(tmp_path / "third.sif"), pulled)
    assert len(_sifs(cache)) == 1


def test_blobs_in_use_are_left_alone(cache_env: CacheEnv, pulled: str) -> None:
    cache = cache_env.cache
    blobs = _blob_files(cache)
    user = cache_env.spawn(BLOB_USER, str(cache))
    try:
        assert user.stdout.readline().strip() == "using"
        out = run_cli("cache", "gc", "--quota", "1").stdout
        # the image is evicted by the quota, the blobs a fetch is reading are not touched
        assert "1 image(s) evicted" in out and "oci blob" not in out
        assert sorted(_blob_files(cache)) == sorted(blobs)
    finally:
        reap(user)
    out = run_cli("cache", "gc", "--quota", "1").stdout
    assert f"removed {len(blobs)} oci blob file(s)" in out
    assert not _blob_files(cache)


def test_a_running_build_keeps_gc_off_the_blobs(
    cache_env: CacheEnv, pulled: str, blocking_ref, tmp_path: Path
) -> None:
    """``hpcsif build`` holds the blob lock for its whole run (it may read cached layers)."""
    cache = cache_env.cache
    blobs = _blob_files(cache)
    ref, _ = blocking_ref
    build = subprocess.Popen(
        [sys.executable, "-m", "hpcsif.cli.main", "build", str(tmp_path / "b.sif"), ref],
        env=cache_env.env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = cache / "locks" / "blobs.lock"
        deadline = time.monotonic() + 30
        while not (lock.exists() and str(build.pid) in _lock_pids(lock)):
            assert time.monotonic() < deadline, "the build never took the blob lock"
            time.sleep(0.05)
        out = run_cli("cache", "gc", "--quota", "1").stdout
        assert "oci blob" not in out and sorted(_blob_files(cache)) == sorted(blobs)
    finally:
        reap(build)  # blocked on its held layer: killed, its lock goes with it
    assert f"removed {len(blobs)} oci blob file(s)" in run_cli("cache", "gc", "--quota", "1").stdout


def _lock_pids(lock: Path) -> list[str]:
    """The pids holding flocks on ``lock`` (from /proc/locks, matched by inode)."""
    ino = f":{lock.stat().st_ino}"
    rows = [line.split() for line in Path("/proc/locks").read_text().splitlines() if "->" not in line]
    return [r[4] for r in rows if len(r) > 5 and r[1] == "FLOCK" and r[5].endswith(ino)]
