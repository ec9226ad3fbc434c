"""Small test images built from local files only (no network).

``busybox_oci_layout`` is a session-scoped fixture: an OCI image layout directory with tag
``latest`` holding a five-layer image built from the ``busybox-static`` package's
``/bin/busybox``: the binary, then ``/bin`` applet symlinks, ``/data``, ``/etc`` (one gzip
layer each), then a layer whiting out ``/etc/removed``. The config sets ENTRYPOINT, CMD and
Env. The layers are written with :mod:`tarfile` (Debian's umoci 0.4.7 ``insert`` writes
tar streams without padding or end-of-archive blocks, which GNU tar and Python reject).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "env", "true", "false", "id", "sleep", "pwd", "test", "wc")
ENTRYPOINT = ["/bin/sh", "-c"]
CMD = ["echo hello from busybox"]
ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "HPCSIF_TEST=busybox", "GREETING=hello world"]
_MTIME = 1_700_000_000  # fixed, so the image's digests are the same in every session
_CREATED = "2023-11-14T22:13:20Z"


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


def _layer(entries: list[tuple[str, bytes | str | None, int]]) -> bytes:
    """A gzip tar layer; each entry is (path, bytes for a file | str symlink target | None dir, mode)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = _MTIME, mode
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return raw.getvalue()


def _put(blobs: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest[7:]).write_bytes(data)
    return digest


def build_busybox_layout(dest: Path, tag: str = "latest") -> TestImage:
    """Build the five-layer busybox OCI layout at ``dest`` (which must not exist)."""
    busybox = busybox_binary().read_bytes()
    files = {
        "etc/hello.txt": b"hello from the etc layer\n",
        "etc/removed": b"this file is whited out by the top layer\n",
        "data/numbers.txt": b"".join(b"%d\n" % i for i in range(2000)),
    }
    layers = [
        [("bin", None, 0o755), ("bin/busybox", busybox, 0o755)],
        [("bin", None, 0o755), *((f"bin/{a}", "busybox", 0o777) for a in APPLETS)],
        [("data", None, 0o755), ("data/numbers.txt", files["data/numbers.txt"], 0o644)],
        [("etc", None, 0o755), *((k, v, 0o644) for k, v in files.items() if k.startswith("etc/"))],
        [("etc/.wh.removed", b"", 0o644)],
    ]
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tars = [_layer(entries) for entries in layers]
    gzipped = [gzip.compress(t, mtime=0) for t in tars]
    layer_descs = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _put(blobs, g), "size": len(g)}
        for g in gzipped
    ]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "author": "hpcsif tests",
        "created": _CREATED,
        "config": {"Env": ENV, "Entrypoint": ENTRYPOINT, "Cmd": CMD, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]},
        "history": [{"created": _CREATED, "created_by": f"hpcsif tests layer {i}"} for i in range(len(tars))],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _put(blobs, config_bytes),
            "size": len(config_bytes),
        },
        "layers": layer_descs,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = _put(blobs, manifest_bytes)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    kept = {k: v for k, v in files.items() if k != "etc/removed"}
    kept["bin/busybox"] = busybox
    return TestImage(
        layout=dest,
        tag=tag,
        manifest_digest=manifest_digest,
        config_digest=manifest["config"]["digest"],
        layer_digests=tuple(d["digest"] for d in layer_descs),
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
