"""Small test images built from local files only (no network).

``busybox_oci_layout`` is a session-scoped fixture: an OCI image layout directory with tag
``latest`` holding a five-layer image built from the ``busybox-static`` package's
``/bin/busybox``: the binary, then ``/bin`` applet symlinks, ``/data``, ``/etc`` (with
``passwd`` and ``group``; one gzip layer each), then a layer whiting out ``/etc/removed``.
The config sets ENTRYPOINT, CMD and Env. The layers are written with :mod:`tarfile` (Debian's
umoci 0.4.7 ``insert`` writes tar streams without padding or end-of-archive blocks, which GNU
tar and Python reject), through :mod:`hpcsif.image.compose` with fixed timestamps, so digests
are the same in every session.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_oci_layout

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "env", "true", "false", "id", "sleep", "pwd", "test", "wc")
ENTRYPOINT = ["/bin/sh", "-c"]
CMD = ["echo hello from busybox"]
ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "HPCSIF_TEST=busybox", "GREETING=hello world"]
#: the /etc/passwd and /etc/group real images have (an image without them starts with Apptainer's
#: two warnings that it has none)
ETC_USERS = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
    "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
}


@dataclass(frozen=True)
class TestImage:
    """An OCI layout on disk and what the tests may assert about it."""

    __test__ = False  # not a pytest test class

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]
    files: dict[str, bytes]  # path in the image -> content, for checks after conversion
    removed: tuple[str, ...]  # paths whited out by the top layer

    @property
    def oci_ref(self) -> str:
        """``oci:DIR:TAG`` as skopeo spells it."""
        return f"oci:{self.layout}:{self.tag}"


def busybox_binary() -> Path:
    """The static busybox from the ``busybox-static`` package (skip the test if missing)."""
    try:
        out = subprocess.run(["dpkg", "-L", "busybox-static"], capture_output=True, text=True, check=True)
        paths = [Path(p) for p in out.stdout.split() if p.endswith("/bin/busybox")]
    except (OSError, subprocess.CalledProcessError):
        paths = []
    for p in [*paths, BUSYBOX]:
        if p.is_file():
            return p
    pytest.skip("busybox-static is not installed")


def build_busybox_layout(dest: Path, tag: str = "latest") -> TestImage:
    """Build the five-layer busybox OCI layout at ``dest`` (which must not exist)."""
    busybox = busybox_binary().read_bytes()
    files = {
        "etc/hello.txt": b"hello from the etc layer\n",
        "etc/removed": b"this file is whited out by the top layer\n",
        **ETC_USERS,
        "data/numbers.txt": b"".join(b"%d\n" % i for i in range(2000)),
    }
    layers = [
        [Entry("bin", mode=0o755), Entry("bin/busybox", busybox, 0o755)],
        [Entry("bin", mode=0o755), *(Entry(f"bin/{a}", symlink="busybox", mode=0o777) for a in APPLETS)],
        [Entry("data", mode=0o755), Entry("data/numbers.txt", files["data/numbers.txt"])],
        [Entry("etc", mode=0o755), *(Entry(k, v) for k, v in files.items() if k.startswith("etc/"))],
        [Entry("etc/.wh.removed", b"")],
    ]
    spec = ImageSpec([layer_tar(e) for e in layers], entrypoint=ENTRYPOINT, cmd=CMD, env=ENV, workdir="/")
    manifest_digest = write_oci_layout(dest, spec, tag)
    manifest = json.loads((dest / "blobs" / "sha256" / manifest_digest[7:]).read_bytes())
    kept = {k: v for k, v in files.items() if k != "etc/removed"}
    kept["bin/busybox"] = busybox
    return TestImage(
        layout=dest,
        tag=tag,
        manifest_digest=manifest_digest,
        config_digest=manifest["config"]["digest"],
        layer_digests=tuple(d["digest"] for d in manifest["layers"]),
        files=kept,
        removed=("etc/removed",),
    )


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    """The busybox test image with its expected digests and files (built once per session)."""
    return build_busybox_layout(tmp_path_factory.mktemp("images") / "busybox")


@pytest.fixture(scope="session")
def busybox_oci_layout(busybox_image: TestImage) -> Path:
    """A multi-layer busybox OCI layout directory with tag ``latest`` (built once per session)."""
    return busybox_image.layout
