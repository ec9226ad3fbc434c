"""Staging from the shared tier: copies are not fsynced but tied to the boot that made them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpcsif.cache.api import ensure_image
from hpcsif.cache.eviction import collect_garbage
from hpcsif.cache.layout import CacheRoot
from hpcsif.cache.store import UNSYNCED_BOOT, Entry, SIFStore, boot_id, produce_copy
from hpcsif.config import set_config
from hpcsif.errors import CacheError
from hpcsif.fsutil import atomic_write_bytes, copy_file
from tests.cache.conftest import CacheEnv
from tests.conftest import run_cli

OTHER_BOOT = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def two_nodes(
    cache_env: CacheEnv, busybox_ref: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path, Path]:
    """node1 converted the image and published it to the shared tier; node2 copied it from there.

    Yields (node1's SIF, node2's SIF, the shared tier's root).
    """
    shared = tmp_path / "shared"
    monkeypatch.setenv("HPCSIF_SHARED_CACHEDIR", str(shared))
    paths = []
    for node in ("node1", "node2"):
        monkeypatch.setenv("HPCSIF_CACHEDIR", str(tmp_path / node))
        set_config(None)
        paths.append(ensure_image(busybox_ref))
    return paths[0], paths[1], shared


def _meta(sif: Path) -> dict:
    return json.loads((sif.parent / "meta.json").read_text())


def _set_boot(sif: Path, boot: str) -> None:
    atomic_write_bytes(sif.parent / "meta.json", json.dumps({**_meta(sif), UNSYNCED_BOOT: boot}).encode())


def _events(root: Path) -> list[str]:
    return [r["event"] for r in CacheRoot(root).read_journal()]


@pytest.mark.slow
def test_a_copy_records_its_boot_and_is_found_in_that_boot(two_nodes: tuple[Path, Path, Path]) -> None:
    converted, copied, _ = two_nodes
    assert boot_id() and len(boot_id()) == 36
    assert _meta(copied)["via"] == "copy" and _meta(copied)[UNSYNCED_BOOT] == boot_id()
    assert copied.read_bytes() == converted.read_bytes()
    root = CacheRoot(copied.parents[2])
    entry = SIFStore(root).lookup(copied.parent.name)
    assert entry is not None and entry.path == copied


@pytest.mark.slow
def test_converted_and_uploaded_entries_are_synced(two_nodes: tuple[Path, Path, Path]) -> None:
    converted, _, shared = two_nodes
    uploaded = next(shared.glob("sif/*/*.sif"))
    assert _meta(converted)["via"] == "convert" and UNSYNCED_BOOT not in _meta(converted)
    assert _meta(uploaded)["via"] == "upload" and UNSYNCED_BOOT not in _meta(uploaded)


@pytest.mark.slow
def test_a_copy_from_an_earlier_boot_is_staged_again(
    two_nodes: tuple[Path, Path, Path], busybox_ref: str
) -> None:
    _, copied, _ = two_nodes
    node2 = copied.parents[2]
    _set_boot(copied, OTHER_BOOT)
    copied.write_bytes(b"")  # what a crash may leave of data that never reached the disk
    store = SIFStore(CacheRoot(node2))
    assert store.lookup(copied.parent.name) is None
    assert list(store.entries()) == []
    again = ensure_image(busybox_ref)  # the environment still points at node2
    assert again == copied
    assert _meta(again)[UNSYNCED_BOOT] == boot_id() and again.stat().st_size > 0
    assert [p.name for p in (node2 / "sif").iterdir()] == [copied.parent.name]
    assert list((node2 / "tmp").iterdir()) == []
    assert _events(node2) == ["copy", "discard-stale", "copy"]
    assert [e.key for e in store.entries()] == [copied.parent.name]


@pytest.mark.slow
def test_a_directory_without_meta_is_replaced(two_nodes: tuple[Path, Path, Path], busybox_ref: str) -> None:
    """A crash can keep the entry's directory but lose its unsynced files."""
    _, copied, _ = two_nodes
    for f in copied.parent.iterdir():
        f.unlink()
    assert ensure_image(busybox_ref) == copied
    assert _meta(copied)[UNSYNCED_BOOT] == boot_id()
    assert list((copied.parents[2] / "tmp").iterdir()) == []


@pytest.mark.slow
def test_garbage_collection_drops_stale_copies_only(two_nodes: tuple[Path, Path, Path]) -> None:
    converted, copied, _ = two_nodes
    _set_boot(copied, boot_id())  # a fresh copy stays
    collect_garbage(CacheRoot(copied.parents[2]), quota=0)
    assert copied.is_file()
    _set_boot(copied, OTHER_BOOT)
    result = collect_garbage(CacheRoot(copied.parents[2]), quota=0)
    assert result.tmp_removed == 1 and not copied.parent.exists()
    assert _events(copied.parents[2])[-1] == "discard-stale"
    collect_garbage(CacheRoot(converted.parents[2]), quota=0)
    assert converted.is_file(), "a converted entry (no unsynced_boot) is never stale"


def test_copy_file_across_file_systems_and_from_procfs(tmp_path: Path) -> None:
    """copy_file_range cannot serve every pair of files; the fallback copies the same bytes."""
    data = os.urandom(3 << 20)
    src = tmp_path / "src"
    src.write_bytes(data)
    copy_file(src, tmp_path / "same-fs")
    assert (tmp_path / "same-fs").read_bytes() == data
    if os.path.isdir("/dev/shm"):  # tmpfs: another file system than tmp_path's
        other = Path("/dev/shm") / f"hpcsif-test-{os.getpid()}"
        try:
            copy_file(src, other)
            assert other.read_bytes() == data
            copy_file(other, tmp_path / "back")
            assert (tmp_path / "back").read_bytes() == data
        finally:
            other.unlink(missing_ok=True)
    # procfs files claim size 0 and copy_file_range gives 0 bytes of them
    copy_file("/proc/self/mounts", tmp_path / "mounts")
    assert (tmp_path / "mounts").read_bytes().strip()
    (tmp_path / "empty").write_bytes(b"")
    copy_file(tmp_path / "empty", tmp_path / "empty-copy")
    assert (tmp_path / "empty-copy").read_bytes() == b""


def test_a_copy_that_fails_is_a_cache_error(tmp_path: Path) -> None:
    root = CacheRoot(tmp_path / "other").ensure()
    gone = Entry(root, "k", {"name": "gone.sif"})
    with pytest.raises(CacheError, match=r"cannot copy .*gone\.sif into the cache: No such file"):
        produce_copy(gone)(tmp_path / "dest.sif")


@pytest.mark.slow
def test_cache_clean_names_a_stale_copy(
    two_nodes: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, copied, _ = two_nodes
    _set_boot(copied, OTHER_BOOT)
    monkeypatch.setenv("HPCSIF_CACHEDIR", str(copied.parents[2]))
    err = run_cli("cache", "clean", "--force").stderr
    assert f"INFO:    Removing stale copy from an earlier boot: {copied.parent}" in err
    assert not copied.parent.exists()
