"""ensure_image / leased_image end to end: leases and gc, shared tier, offline, archives, local SIFs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hpcsif.cache.api import ensure_image, leased_image
from hpcsif.cache.layout import CacheRoot
from hpcsif.cache.store import SIFStore
from hpcsif.errors import OfflineError, TrustError
from tests.cache.conftest import CacheEnv
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

LEASE_HOLDER = """
import sys
from hpcsif.cache.api import leased_image
with leased_image(sys.argv[1]) as path:
    print(path, flush=True)
    sys.stdin.read()
"""


def _entries(root: Path) -> list[str]:
    return [e.key for e in SIFStore(CacheRoot(root)).entries()]


def test_gc_keeps_a_leased_image_until_its_holder_dies(cache_env: CacheEnv, busybox_ref: str) -> None:
    holder = cache_env.spawn(LEASE_HOLDER, busybox_ref)
    path = Path(holder.stdout.readline().strip())
    assert path.is_file()
    out = run_cli("cache", "gc", "--quota", "1").stdout
    assert "0 image(s) evicted" in out
    assert path.is_file()
    listing = run_cli("cache", "list", "-v").stdout
    assert f"pid {holder.pid}@" in listing
    holder.kill()
    holder.wait()
    out = run_cli("cache", "gc", "--quota", "1").stdout
    assert "1 image(s) evicted" in out
    assert not path.exists() and _entries(cache_env.cache) == []


def test_eviction_after_publish_spares_leased_images(
    cache_env: CacheEnv, busybox_ref: str, busybox_oci_layout: Path, tmp_path: Path
) -> None:
    cache_env.configure(quota="1")  # every publication evicts all it may
    b, c = (f"oci://{tag_layout(busybox_oci_layout, tmp_path, t)}:{t}" for t in ("b", "c"))
    with leased_image(busybox_ref) as first:
        second = ensure_image(b)
        assert first.is_file() and second.is_file(), "leased and just-published images stay"
    third = ensure_image(c)
    assert third.is_file() and not first.exists() and not second.exists()
    assert [r["event"] for r in cache_env.root.read_journal()].count("evict") == 2


def tag_layout(layout: Path, where: Path, tag: str) -> Path:
    """A copy of ``layout`` whose only image has an extra annotation (so a new manifest digest)."""
    import hashlib
    import json

    dest = where / f"{layout.name}-{tag}"
    shutil.copytree(layout, dest)
    index = json.loads((dest / "index.json").read_text())
    blobs = dest / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    manifest["annotations"] = {"org.example.variant": tag}
    raw = json.dumps(manifest).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (blobs / digest).write_bytes(raw)
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(raw))
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = tag
    (dest / "index.json").write_text(json.dumps(index))
    return dest


NODE = """
import os, sys, time
from hpcsif.cache.api import ensure_image
while not os.path.exists(sys.argv[2]):
    time.sleep(0.002)
print(ensure_image(sys.argv[1]))
"""


def test_two_nodes_behind_a_shared_tier_convert_once(
    cache_env: CacheEnv, busybox_ref: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    gate = tmp_path / "go"
    nodes = [tmp_path / "node1", tmp_path / "node2"]
    procs = [
        cache_env.spawn(
            NODE, busybox_ref, str(gate), HPCSIF_CACHEDIR=str(n), HPCSIF_SHARED_CACHEDIR=str(shared)
        )
        for n in nodes
    ]
    time.sleep(1.0)
    gate.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = [Path(out.strip()) for out, _ in outs]
    assert paths[0].is_relative_to(nodes[0]) and paths[1].is_relative_to(nodes[1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    events = [[r["event"] for r in CacheRoot(n).read_journal()] for n in nodes]
    assert sorted(events) == [["convert"], ["copy"]]
    assert [r["event"] for r in CacheRoot(shared).read_journal()] == ["upload"]
    # a third node only copies
    third = cache_env.spawn(
        NODE, busybox_ref, str(gate), HPCSIF_CACHEDIR=str(tmp_path / "n3"), HPCSIF_SHARED_CACHEDIR=str(shared)
    )
    _, err = third.communicate(timeout=60)
    assert third.returncode == 0, err
    assert [r["event"] for r in CacheRoot(tmp_path / "n3").read_journal()] == ["copy"]


def test_archives_are_keyed_on_their_bytes(cache_env: CacheEnv, busybox_image, tmp_path: Path) -> None:
    archive = tmp_path / "bb.tar"
    subprocess.run(
        ["skopeo", "copy", "--quiet", busybox_image.oci_ref, f"docker-archive:{archive}:team/bb:1"],
        check=True,
        capture_output=True,
    )
    first = ensure_image(f"docker-archive://{archive}")
    assert ensure_image(f"docker-archive://{archive}") == first
    copy = tmp_path / "elsewhere.tar"
    shutil.copyfile(archive, copy)
    assert ensure_image(f"docker-archive://{copy}").parent == first.parent
    assert len(cache_env.conversions()) == 1


def test_offline_warm_hit_and_cold_miss(cache_env: CacheEnv, busybox_ref: str) -> None:
    path = ensure_image(busybox_ref)
    assert ensure_image(busybox_ref, offline=True) == path
    with pytest.raises(OfflineError, match="offline"):
        ensure_image("docker://127.0.0.1:9/team/app:1.2", offline=True)
    os.environ["HPCSIF_OFFLINE"] = "1"
    try:
        with pytest.raises(OfflineError):
            ensure_image("docker://127.0.0.1:9/team/app:1.2")
    finally:
        del os.environ["HPCSIF_OFFLINE"]


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a network namespace"
)
def test_registry_warm_hit_needs_no_network(cache_env: CacheEnv, busybox_image, registry_open) -> None:
    registry_open.push(busybox_image.oci_ref, "cache/bb:1")
    ref = registry_open.ref("cache/bb:1")
    path = ensure_image(ref)
    code = "import sys; from hpcsif.cache.api import ensure_image; print(ensure_image(sys.argv[1]))"
    # in a network namespace of its own the registry on loopback is unreachable: any request fails
    for extra in ({}, {"HPCSIF_OFFLINE": "1"}):
        proc = subprocess.run(
            ["unshare", "-n", "python3", "-c", code, ref],
            env=cache_env.env(**extra),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(path)
    # past the tag TTL a cached image still needs the registry to learn what the tag names now …
    cache_env.configure({"registry": {"retries": 0}}, tag_ttl=0)
    proc = subprocess.run(
        ["unshare", "-n", "python3", "-c", code, ref], env=cache_env.env(), capture_output=True, text=True
    )
    assert proc.returncode != 0
    # … unless offline or cache-first
    proc = subprocess.run(
        ["unshare", "-n", "python3", "-c", code, ref],
        env=cache_env.env(HPCSIF_OFFLINE="1"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(cache_env.conversions()) == 1


def test_local_sif_is_returned_after_the_trust_check(
    cache_env: CacheEnv, busybox_ref: str, tmp_path: Path
) -> None:
    cached = ensure_image(busybox_ref)
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chmod(mine, 0o755)
    local = mine / "app.sif"
    shutil.copyfile(cached, local)
    assert ensure_image(str(local)) == local
    os.chmod(mine, 0o777)
    with pytest.raises(TrustError):
        ensure_image(str(local))


def test_disable_cache_uses_a_temporary_root(cache_env: CacheEnv, busybox_ref: str) -> None:
    code = "import sys; from hpcsif.cache.api import ensure_image; print(ensure_image(sys.argv[1]))"
    proc = cache_env.spawn(code, busybox_ref, HPCSIF_DISABLE_CACHE="1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    path = Path(out.strip())
    assert not path.is_relative_to(cache_env.cache)
    assert not path.exists(), "the temporary cache is removed when the process exits"


def test_cache_list_and_clean(cache_env: CacheEnv, busybox_ref: str) -> None:
    path = ensure_image(busybox_ref)
    out = run_cli("cache", "list", "--verbose").stdout
    assert "There are 1 container file(s) using" in out
    assert "oci blob file(s) using" in out
    assert busybox_ref.split(":latest")[0] in out and "LAST USED" in out
    dry = run_cli("cache", "clean", "--dry-run")
    assert dry.stdout == "User requested a dry run. Not actually deleting any data!\n"
    assert "INFO:    Removing oci-tmp cache entry: " in dry.stderr and path.exists()
    cancelled = run_cli("cache", "clean", input="n\n").stdout
    assert "Do you want to continue? [y/N]" in cancelled and path.exists()
    broken = cache_env.cache / "sif" / "0123-broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    out = run_cli("cache", "clean", "--force", "--type", "sif")
    assert not path.exists() and not broken.exists()
    assert f"INFO:    Removing unreadable cache entry: {broken}" in out.stderr and out.stdout == ""
    assert "There are 0 container file(s)" in run_cli("cache", "list").stdout


def test_fsspec_shared_tier(cache_env: CacheEnv, busybox_ref: str, tmp_path: Path, monkeypatch) -> None:
    import fsspec

    from hpcsif.config import set_config

    url = f"memory://hpcsif-test-{os.getpid()}-{tmp_path.name}"
    monkeypatch.setenv("HPCSIF_SHARED_CACHEDIR", url)
    nodes = [tmp_path / "node1", tmp_path / "node2"]
    paths = []
    for node in nodes:
        monkeypatch.setenv("HPCSIF_CACHEDIR", str(node))
        set_config(None)
        paths.append(ensure_image(busybox_ref))
    assert [[r["event"] for r in CacheRoot(n).read_journal()] for n in nodes] == [["convert"], ["copy"]]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"{url}/sif/{paths[0].parent.name}/meta.json")
    fs.rm(url.removeprefix("memory://"), recursive=True)


def test_system_cache_is_consulted_first(
    cache_env: CacheEnv, busybox_ref: str, tmp_path: Path, monkeypatch
) -> None:
    from hpcsif.config import set_config

    system = tmp_path / "system"
    # the prolog fills the system cache (as root, with the system dir as its cache root)
    monkeypatch.setenv("HPCSIF_CACHEDIR", str(system))
    set_config(None)
    staged = ensure_image(busybox_ref)
    monkeypatch.setenv("HPCSIF_CACHEDIR", str(cache_env.cache))
    monkeypatch.setenv("HPCSIF_SYSTEM_CACHEDIR", str(system))
    set_config(None)
    assert ensure_image(busybox_ref) == staged
    assert cache_env.conversions() == []
    out = run_cli("cache", "list", env={"HPCSIF_SYSTEM_CACHEDIR": str(system)}).stdout
    assert f"in the system cache {system}" in out


def push_again(registry, layout: Path, repo_tag: str) -> None:
    """Push the ``multi`` image of *layout* under *repo_tag*, which names another image already."""
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:multi",
         f"docker://{registry.host}/{repo_tag}"],
        check=True, capture_output=True,
    )  # fmt: skip


def test_refresh_asks_what_a_moved_tag_names_now(cache_env: CacheEnv, busybox_image, registry_open) -> None:
    """A tag pushed again names another image: within ``cache.tag_ttl`` a plain request keeps the
    image it remembered, ``refresh`` (what ``pull`` asks for) finds the new one at once."""
    from tests.sources.test_registry_source import multi_arch_layout

    registry_open.push(busybox_image.oci_ref, "cache/moving:1")
    ref = registry_open.ref("cache/moving:1")
    first = ensure_image(ref)
    layout, digests = multi_arch_layout(busybox_image, cache_env.base / "multi", (("amd64", None),))
    push_again(registry_open, layout, "cache/moving:1")
    assert ensure_image(ref) == first  # within the TTL: no registry request
    second = ensure_image(ref, refresh=True)
    assert second != first and digests["amd64"][7:] in str(second)
    assert ensure_image(ref) == second  # the refreshed record serves the next requests
    assert ensure_image(ref, refresh=True) == second and len(cache_env.conversions()) == 2


def test_pull_gets_what_a_tag_pushed_again_names(
    cache_env: CacheEnv, busybox_image, registry_open, tmp_path
) -> None:
    """``pull`` of a tag pushed again gives the new image at once, as Apptainer's pull does (the
    cache kept serving the old one for cache.tag_ttl); ``--sandbox`` too."""
    import hashlib

    from tests.sources.test_registry_source import multi_arch_layout

    registry_open.push(busybox_image.oci_ref, "cache/repushed:1")
    ref = registry_open.ref("cache/repushed:1")
    out, box = tmp_path / "out.sif", tmp_path / "box"
    run_cli("pull", str(out), ref)
    run_cli("pull", "--sandbox", str(box), ref)
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    layout, _ = multi_arch_layout(busybox_image, cache_env.base / "multi2", (("amd64", None),))
    push_again(registry_open, layout, "cache/repushed:1")
    run_cli("pull", "-F", str(out), ref)
    assert hashlib.sha256(out.read_bytes()).hexdigest() != before
    assert len(cache_env.conversions()) == 2
    run_cli("pull", "-F", "--sandbox", str(box), ref)
    assert len(cache_env.conversions()) == 2  # the sandbox comes from the new image, converted once
