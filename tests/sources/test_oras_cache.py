"""``pull``/``exec`` of ``oras://`` through the SIF cache, as Apptainer's ``oras`` cache type.

The SIF is kept once, keyed on its own (layer) digest: another tag, or another manifest of the
same file, is a hit; ``cache list -T oras`` counts it and ``cache clean -T oras`` removes it. It
used to go to the blob cache, where neither saw it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcsif.image import mediatypes as mt
from hpcsif.image.model import host_arch
from hpcsif.sources.distribution import RegistryClient
from tests.conftest import peer_apptainer
from tests.services.registry import clean_env
from tests.services.registry import loopback_cli as hpcsif

pytestmark = pytest.mark.slow


def said(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr's lines, after checking the command worked."""
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


@pytest.fixture(scope="module")
def busybox_sif(busybox_image, tmp_path_factory) -> Path:
    """A runnable SIF of the busybox test image."""
    work = tmp_path_factory.mktemp("oras-sif")
    sif = work / "bb.sif"
    said(hpcsif(work, "build", str(sif), f"oci:{busybox_image.layout}:latest"))
    return sif


def test_pull_and_exec_oras_use_the_sif_cache(registry_open, busybox_image, busybox_sif, tmp_path) -> None:
    sif, hello = busybox_sif, busybox_image.files["etc/hello.txt"].decode()
    digest = "sha256:" + hashlib.sha256(sif.read_bytes()).hexdigest()
    ref = registry_open.ref("cache/bb:1", transport="oras")
    said(hpcsif(tmp_path, "push", str(sif), ref))
    assert said(hpcsif(tmp_path, "pull", "--name", "a.sif", ref)) == ["INFO:    Downloading oras image"]
    assert (tmp_path / "a.sif").read_bytes() == sif.read_bytes()
    # one oras entry, named as Apptainer names it; nothing in the blob cache
    table = hpcsif(tmp_path, "cache", "list", "-v", "-T", "oras").stdout.splitlines()
    assert table[1].split()[0] == digest[:22] and table[1].split()[5] == "oras", table
    assert table[3] == f"There are 1 container file(s) using {sif.stat().st_size / 2**20:.2f} MiB of space"
    blobs = hpcsif(tmp_path, "cache", "list", "-T", "blob").stdout
    assert blobs.startswith("There are 0 oci blob file(s)"), blobs
    assert [p.name for p in (tmp_path / "cache" / "sif").iterdir()] == [digest[7:]]
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []

    assert said(hpcsif(tmp_path, "pull", "--name", "b.sif", ref)) == ["INFO:    Using cached SIF image"]
    assert (tmp_path / "b.sif").read_bytes() == sif.read_bytes()
    # the same file under another tag, in a manifest of its own (another title): still a hit
    other = tmp_path / "renamed.sif"
    shutil.copy(sif, other)
    other_ref = registry_open.ref("cache/other:2", transport="oras")
    manifest = said(hpcsif(tmp_path, "push", str(other), other_ref))[0].rsplit("(", 1)[1].rstrip(")")
    for uri in (other_ref, registry_open.ref(f"cache/other@{manifest}", transport="oras")):
        assert said(hpcsif(tmp_path, "pull", "--force", "--name", "c.sif", uri)) == [
            "INFO:    Using cached SIF image"
        ]
    # an index of SIF manifests (a multi-arch artifact): the host's is picked, or --arch's
    index = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {
                "mediaType": mt.OCI_MANIFEST,
                "digest": manifest,
                "size": 1,
                "platform": {"os": "linux", "architecture": a},
            }
            for a in ("riscv64", host_arch())
        ],
    }
    client = RegistryClient(registry_open.host, insecure=True)
    size = len(client.get_manifest("cache/other", manifest)[0])
    for entry in index["manifests"]:
        entry["size"] = size
    client.put_manifest("cache/other", "multi", json.dumps(index).encode(), mt.OCI_INDEX)
    multi = registry_open.ref("cache/other:multi", transport="oras")
    assert said(hpcsif(tmp_path, "pull", "--name", "m.sif", multi)) == ["INFO:    Using cached SIF image"]
    wrong = hpcsif(tmp_path, "pull", "--arch", "s390x", "--name", "s.sif", multi)
    available = f"linux/{host_arch()}, linux/riscv64"
    assert wrong.returncode == 255 and wrong.stderr.splitlines() == [
        f"FATAL:   {multi}: no image for platform linux/s390x (available: {available}); "
        "use --arch to choose another"
    ], wrong.stderr
    run = hpcsif(tmp_path, "exec", other_ref, "cat", "/etc/hello.txt")
    assert run.stdout == hello and said(run) == ["INFO:    Using cached SIF image"]
    # build from it too (Apptainer's lines; it was downloaded aside, not cached, saying less)
    built = said(hpcsif(tmp_path, "build", "built.sif", ref))
    entry = tmp_path / "cache" / "sif" / digest[7:] / "bb_1.sif"
    assert built == [
        "INFO:    Starting build...",
        "INFO:    Using cached SIF image",
        f"INFO:    Verifying bootstrap image {entry}",
        "INFO:    Creating SIF file...",
        "INFO:    Build complete: built.sif",
    ]
    assert hpcsif(tmp_path, "exec", "built.sif", "cat", "/etc/hello.txt").stdout == hello
    box = said(hpcsif(tmp_path, "pull", "--sandbox", "--name", "box", ref))
    assert box[0] == "INFO:    Using cached SIF image"
    assert (tmp_path / "box/etc/hello.txt").read_text() == hello

    clean = hpcsif(tmp_path, "cache", "clean", "-f", "-T", "oras")
    assert clean.stderr == f"INFO:    Removing oras cache entry: {digest} ({ref})\n", clean.stderr
    assert hpcsif(tmp_path, "cache", "list", "-T", "oras").stdout.startswith("There are 0 container file(s)")
    assert said(hpcsif(tmp_path, "pull", "--force", "--name", "b.sif", ref)) == [
        "INFO:    Downloading oras image"
    ]

    peer = peer_apptainer()
    if peer is None:
        return  # the comparison with Apptainer below needs it
    env = {
        **clean_env(),
        "APPTAINER_CACHEDIR": str(tmp_path / "peer-cache"),
        "PATH": "/usr/bin:/bin:/usr/sbin",
    }
    theirs = []
    for uri in (ref, ref, other_ref):
        out = subprocess.run(
            [peer, "pull", "--no-https", "--force", str(tmp_path / "p.sif"), uri],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        theirs.append(said(out))
    assert theirs == [["INFO:    Downloading oras image"], *[["INFO:    Using cached SIF image"]] * 2]
    listing = subprocess.run([peer, "cache", "list", "-T", "oras"], env=env, capture_output=True, text=True)
    ours = hpcsif(tmp_path, "cache", "list", "-T", "oras").stdout
    assert listing.stdout == ours, (listing.stdout, ours)


def test_a_remembered_tag_fetches_the_sif_it_named(
    registry_open, busybox_image, busybox_sif, tmp_path
) -> None:
    """Within cache.tag_ttl, ``exec`` of a tag that has moved on since, whose SIF was removed
    from the cache, downloads the SIF the tag named (by its digest); ``pull`` asks again."""
    from hpcsif.sif.format import DataType
    from hpcsif.sif.writer import ObjectSpec, write_sif

    ref = registry_open.ref("cache/moving:1", transport="oras")
    said(hpcsif(tmp_path, "push", str(busybox_sif), ref))
    hello = busybox_image.files["etc/hello.txt"].decode()
    assert hpcsif(tmp_path, "exec", ref, "cat", "/etc/hello.txt").stdout == hello
    newer = write_sif(tmp_path / "newer.sif", [ObjectSpec(DataType.DEFFILE, data=b"bootstrap: scratch\n")])
    said(hpcsif(tmp_path, "push", str(newer), ref))
    said(hpcsif(tmp_path, "cache", "clean", "-f", "-T", "oras"))
    run = hpcsif(tmp_path, "exec", ref, "cat", "/etc/hello.txt")
    assert run.stdout == hello and said(run) == ["INFO:    Downloading oras image"]
    assert said(hpcsif(tmp_path, "pull", "--name", "n.sif", ref)) == ["INFO:    Downloading oras image"]
    assert (tmp_path / "n.sif").read_bytes() == newer.read_bytes()  # a SIF without a partition, kept as it is
