"""``Bootstrap: oras`` / ``From: registry/repo:tag``: a build from a SIF in a registry, as Apptainer's.

The SIF is pulled through the SIF cache (an ``oras`` entry, leased while it is read; with
``--disable-cache``, into the build directory) and built from as a local image. It was refused
("bootstrap agent oras is not supported").
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import peer_apptainer
from tests.services.registry import clean_env, registry_open  # noqa: F401 - fixture
from tests.services.registry import loopback_cli as hpcsif

pytestmark = pytest.mark.slow


def steps(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The INFO lines of a build that worked, with the cache's path left out."""
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("INFO:")]
    return [line.split(" /")[0] if "bootstrap image /" in line else line for line in lines]


def test_bootstrap_oras_builds_from_a_pushed_sif(registry_open, busybox_image, tmp_path) -> None:  # noqa: F811
    base = tmp_path / "base.sif"
    assert hpcsif(tmp_path, "build", str(base), f"oci:{busybox_image.layout}:latest").returncode == 0
    where = f"{registry_open.host}/bootstrap/base:1"
    assert hpcsif(tmp_path, "push", str(base), f"oras://{where}").returncode == 0
    post = "%post\n    echo built > /built.txt\n"
    (tmp_path / "app.def").write_text(
        f"Bootstrap: oras\nFrom: {where}\n\n{post}\n%runscript\n    echo custom\n"
    )
    expected = [
        "INFO:    Starting build...",
        "INFO:    Downloading oras image",
        "INFO:    Verifying bootstrap image",
        "INFO:    Running post scriptlet",
        "INFO:    Adding runscript",
        "INFO:    Creating SIF file...",
        "INFO:    Build complete: app.sif",
    ]
    assert steps(hpcsif(tmp_path, "build", "app.sif", "app.def")) == expected
    hello = busybox_image.files["etc/hello.txt"].decode()
    for argv, out in ((["exec", "app.sif", "cat", "/etc/hello.txt", "/built.txt"], hello + "built\n"),
                      (["run", "app.sif"], "custom\n")):  # fmt: skip
        assert hpcsif(tmp_path, *argv).stdout == out
    labels = hpcsif(tmp_path, "inspect", "app.sif").stdout
    assert "org.label-schema.usage.singularity.deffile.bootstrap: oras\n" in labels
    assert f"org.label-schema.usage.singularity.deffile.from: {where}\n" in labels

    # the pulled SIF is an oras cache entry: the next build uses it, a cache-less one downloads aside
    listing = hpcsif(tmp_path, "cache", "list", "-T", "oras").stdout
    assert listing.startswith("There are 1 container file(s)"), listing
    again = steps(hpcsif(tmp_path, "build", "--force", "app.sif", "app.def"))
    assert again == [expected[0], "INFO:    Using cached SIF image", *expected[2:]]
    uncached = hpcsif(tmp_path, "build", "--disable-cache", "--force", "app.sif", "app.def")
    assert steps(uncached)[1].startswith("INFO:    Downloading oras image to tmp cache: ")
    assert hpcsif(tmp_path, "exec", "app.sif", "cat", "/built.txt").stdout == "built\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.def", "app.sif", "base.sif", "cache"]

    # a tag the registry does not hold: one line naming the definition file's line
    (tmp_path / "bad.def").write_text(f"Bootstrap: oras\nFrom: {registry_open.host}/bootstrap/absent:1\n")
    bad = hpcsif(tmp_path, "build", "bad.sif", "bad.def")
    assert bad.returncode == 255 and bad.stderr.splitlines() == [
        f"FATAL:   bad.def:2: {registry_open.host}/bootstrap/absent:1: manifest unknown"
    ], bad.stderr
    assert not (tmp_path / "bad.sif").exists()

    peer = peer_apptainer()
    if peer is None:
        return  # the comparison with Apptainer below needs it
    (tmp_path / "peer.def").write_text(f"Bootstrap: oras\nFrom: {where}\n\n%runscript\n    echo custom\n")
    env = {
        **clean_env(),
        "APPTAINER_CACHEDIR": str(tmp_path / "peer-cache"),
        "PATH": "/usr/bin:/bin:/usr/sbin",
    }
    theirs = subprocess.run(
        [peer, "build", "--no-https", str(tmp_path / "peer.sif"), str(tmp_path / "peer.def")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # the same steps as our first build (Apptainer's %post cannot run in its chroot here)
    assert steps(theirs)[:-1] == [s for s in expected[:-1] if "post" not in s], theirs.stderr
