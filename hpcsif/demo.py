"""``python -m hpcsif.demo`` (``make demo``): the main job, offline, on an embedded default image.

Builds a small image from local files only (busybox from Debian's ``busybox-static`` and a
greeting script) as a ``docker save`` archive, then runs it the way a job script would:
``hpcsif run docker-archive://…`` converts it once through the node-local cache and starts it
with the built-in engine; a second run is a warm cache hit. Nothing touches the network.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_docker_archive

GREETING = """#!/bin/sh
echo "Hello from the hpcsif demo container!"
echo "  running as: $(id -un 2>/dev/null || id -u) on $(hostname)"
echo "  image file: ${APPTAINER_CONTAINER:-?}"
echo "  DEMO_MESSAGE=$DEMO_MESSAGE"
echo "  arguments: $*"
"""
APPLETS = ("sh", "echo", "cat", "id", "hostname", "ls", "env", "uname", "true")


def busybox_path() -> Path:
    """The static busybox binary (from Debian's busybox-static)."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).is_file():
            return Path(candidate)
    raise SystemExit("busybox not found: install the Debian package 'busybox-static' (make demo does)")


def demo_image() -> ImageSpec:
    """Two layers (busybox, then the app) with ENTRYPOINT and Env set."""
    base = [Entry("bin", mode=0o755), Entry("bin/busybox", busybox_path().read_bytes(), 0o755)]
    base += [Entry(f"bin/{a}", symlink="busybox") for a in APPLETS]
    base += [Entry(d, mode=0o755) for d in ("etc", "tmp", "usr", "usr/bin")]
    base.append(Entry("etc/os-release", b'NAME="hpcsif demo"\nID=hpcsif-demo\n'))
    app = [Entry("app", mode=0o755), Entry("app/greet.sh", GREETING.encode(), 0o755)]
    return ImageSpec(
        layers=[layer_tar(base), layer_tar(app)],
        entrypoint=["/app/greet.sh"],
        env=["PATH=/usr/bin:/bin", "DEMO_MESSAGE=converted once, cached, run unprivileged"],
        labels={"org.opencontainers.image.title": "hpcsif-demo"},
    )


def main() -> int:
    """Build the demo archive, then run it through the cache twice (cold, then warm)."""
    from hpcsif.cli.main import main as hpcsif

    work = Path(os.environ.get("HPCSIF_DEMO_DIR", "demo")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    archive = work / "hpcsif-demo.tar"
    if not archive.exists():
        write_docker_archive(archive, [("hpcsif/demo:latest", demo_image())])
    os.environ.setdefault("HPCSIF_CACHEDIR", str(work / "cache"))
    ref = f"docker-archive://{archive}"
    print(f"== demo image: {ref}", flush=True)
    # an earlier demo (or run) may have converted it already: say what really happens
    cached = any(Path(os.environ["HPCSIF_CACHEDIR"]).glob("sif/*/*.sif"))
    first = "warm cache: converted by an earlier run" if cached else "cold cache: converts once"
    for label in (first, "warm cache: no conversion"):
        start = time.monotonic()
        rc = hpcsif(["run", ref, "arg one", "arg two"])
        print(f"== {label}: exit {rc} in {time.monotonic() - start:.2f} s", flush=True)
        if rc != 0:
            return rc
    hpcsif(["cache", "list"])
    if shutil.which("hpcsif"):
        print(f"== try it yourself: HPCSIF_CACHEDIR={work / 'cache'} hpcsif exec {ref} cat /etc/os-release")
    return 0


if __name__ == "__main__":
    sys.exit(main())
