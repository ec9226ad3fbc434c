"""A test image holding this host's own Python runtime with ``distributed`` (no network).

The rootfs is copied from the running interpreter: the real executable (pyenv's CPython here),
its standard library (without tests, IDLE, Tk and the static-library ``config-*`` directory),
the installed files of ``distributed`` and every distribution it needs (followed recursively
through :mod:`importlib.metadata`), and the shared libraries all of those need (``ldd``). It
is laid out under ``/usr/local`` so the interpreter finds its prefix from its own location;
the libraries go to ``/usr/lib/x86_64-linux-gnu``, which the dynamic loader searches without a
cache. A static busybox provides ``/bin/sh``. ``/etc/hpcsif-dask-image`` exists only here, so
a task that reads it proves it ran inside the image. Variants for the image check: the same
Python without any site-packages, one whose ``distributed`` claims a release a year older
(an extra layer rewriting its ``METADATA``), and busybox alone.

Building reads ~150 MB of files; the ``docker save`` archive is cached across test runs in
a directory keyed on the interpreter, the package versions and this file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from packaging.requirements import Requirement

from hpcsif.image.compose import MTIME, Entry, ImageSpec, layer_tar, write_docker_archive

MARKER = "/etc/hpcsif-dask-image"
MARKER_TEXT = b"hpcsif dask test image\n"
PREFIX = "usr/local"
LIBDIR = "usr/lib/x86_64-linux-gnu"
APPLETS = ("sh", "cat", "ls", "echo", "env", "true", "sleep", "test", "id")
# stdlib parts a dask worker never imports; together over half of the standard library
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"}
_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(root: str = "distributed") -> list[md.Distribution]:
    """``root`` and every distribution its (non-extra) requirements name, recursively."""
    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        if _canonical(name) in seen:
            continue
        dist = md.distribution(name)
        seen[_canonical(name)] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _python() -> Path:
    return Path(os.path.realpath(sys.executable))


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _stdlib_files() -> Iterator[Path]:
    stdlib = _stdlib()
    for dirpath, dirnames, filenames in os.walk(stdlib):
        here = Path(dirpath)
        if here == stdlib:
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("config-")]
        for name in filenames:
            yield here / name


def _dist_files(dists: Iterable[md.Distribution]) -> Iterator[Path]:
    """The installed files of ``dists`` that live in site-packages (not console scripts)."""
    site = _site_packages()
    for dist in dists:
        for f in dist.files or []:
            path = Path(os.path.normpath(dist.locate_file(f)))
            if path.is_relative_to(site) and path.is_file():
                yield path


def _shared_libraries(objects: Iterable[Path]) -> dict[str, Path]:
    """``{soname: resolved host path}`` for everything ``objects`` load, as ``ldd`` reports it."""
    libs: dict[str, Path] = {}
    for obj in objects:
        out = subprocess.run(["ldd", str(obj)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if m := _LDD_LINE.match(line):
                libs.setdefault(m.group(1), Path(os.path.realpath(m.group(2))))
    return libs


def _loader() -> Path:
    return Path(os.path.realpath("/lib64/ld-linux-x86-64.so.2"))


def _restamp_pyc(data: bytes) -> bytes:
    """A timestamp-checked ``.pyc`` re-stamped with the image's fixed mtime.

    Every file in the composed image has the mtime :data:`MTIME`; without this the interpreter
    would find each ``.pyc`` stale, recompile on every import (seconds for ``distributed``) and
    be unable to write the result to the read-only image.
    """
    if len(data) < 16 or int.from_bytes(data[4:8], "little") != 0:  # hash-based pycs: unchanged
        return data
    return data[:8] + (MTIME & 0xFFFFFFFF).to_bytes(4, "little") + data[12:]


def python_rootfs(busybox: Path, *, packages: bool = True) -> bytes:
    """The rootfs layer: busybox, the marker, the interpreter, stdlib, (packages) and libraries."""
    python, stdlib, site = _python(), _stdlib(), _site_packages()
    pyname = python.name  # python3.11
    libpy = f"{PREFIX}/lib/{stdlib.name}"
    files: dict[str, tuple[Path, int]] = {}

    def add(dest: str, src: Path, mode: int = 0o644) -> None:
        files[dest] = (src, mode)

    stdlib_files = list(_stdlib_files())
    for f in stdlib_files:
        add(f"{libpy}/{f.relative_to(stdlib)}", f)
    package_files = list(_dist_files(distributions())) if packages else []
    for f in package_files:
        add(f"{libpy}/site-packages/{f.relative_to(site)}", f)
    add(f"{PREFIX}/bin/{pyname}", python, 0o755)
    binaries = [python, *(f for f in [*stdlib_files, *package_files] if f.suffix == ".so")]
    for soname, src in _shared_libraries(binaries).items():
        add(f"{LIBDIR}/{soname}", src, 0o755)
    add("lib64/ld-linux-x86-64.so.2", _loader(), 0o755)

    entries = [*_busybox_entries(busybox), Entry(MARKER.lstrip("/"), MARKER_TEXT)]
    entries += [Entry(d, mode=0o755) for d in ("usr", "lib64")]
    entries += [Entry("lib", symlink="usr/lib")]
    made = {"usr", "lib64"}
    for dest in sorted(files):
        parts = dest.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                entries.append(Entry(parent, mode=0o755))
        src, mode = files[dest]
        data = src.read_bytes()
        entries.append(Entry(dest, _restamp_pyc(data) if dest.endswith(".pyc") else data, mode))
    entries += [
        Entry(f"{PREFIX}/bin/python3", symlink=pyname),
        Entry(f"{PREFIX}/bin/python", symlink=pyname),
    ]
    return layer_tar(entries)


def _busybox_entries(busybox: Path) -> list[Entry]:
    entries = [Entry("bin", mode=0o755), Entry("bin/busybox", busybox.read_bytes(), 0o755)]
    entries += [Entry(f"bin/{a}", symlink="busybox") for a in APPLETS]
    return entries + [Entry(d, mode=0o755) for d in ("etc", "tmp", "root", "proc", "dev", "sys", "home")]


def _other_release_layer() -> bytes:
    """A layer rewriting distributed's installed version to a release from a year before."""
    dist = md.distribution("distributed")
    meta = next(f for f in dist.files or [] if f.name == "METADATA" and f.parent.name.endswith(".dist-info"))
    year, _, rest = dist.version.partition(".")
    older = f"{int(year) - 1}.{rest}"
    text = Path(dist.locate_file(meta)).read_text()
    text = re.sub(r"(?m)^Version: .*$", f"Version: {older}", text, count=1)
    dest = f"{PREFIX}/lib/{_stdlib().name}/site-packages/{meta}"
    return layer_tar([Entry(dest, text.encode())])


#: the images the tests use: a Python with distributed, one without, one with another release
VARIANTS = ("dask", "no-dask", "other-release", "no-python")


def image_spec(busybox: Path, variant: str = "dask") -> ImageSpec:
    """One of :data:`VARIANTS`."""
    if variant == "no-python":
        layers = [layer_tar(_busybox_entries(busybox))]
    elif variant == "no-dask":
        layers = [python_rootfs(busybox, packages=False)]
    elif variant == "other-release":
        layers = [python_rootfs(busybox), _other_release_layer()]
    elif variant == "dask":
        layers = [python_rootfs(busybox)]
    else:
        raise ValueError(f"unknown test image variant {variant!r} (one of {', '.join(VARIANTS)})")
    return ImageSpec(layers=layers, cmd=["/bin/sh"], env=["PATH=/usr/local/bin:/usr/bin:/bin"])


def cache_key() -> str:
    """What the built archive depends on: interpreter, package versions and this builder."""
    h = hashlib.sha256()
    st = _python().stat()
    h.update(f"{_python()}:{st.st_size}:{st.st_mtime_ns}:{sys.version}".encode())
    for dist in sorted(distributions(), key=lambda d: _canonical(d.metadata["Name"])):
        h.update(f"{dist.metadata['Name']}=={dist.version};".encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def build_archive(cache_dir: Path, busybox: Path, variant: str = "dask") -> Path:
    """The ``docker save`` archive of :func:`image_spec`, built once per key into ``cache_dir``."""
    from hpcsif.fsutil import flocked

    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / f"{variant}-{cache_key()}.tar"
    with flocked(str(dest) + ".lock"):
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            write_docker_archive(tmp, [(f"hpcsif-test/{variant}:latest", image_spec(busybox, variant))])
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            tmp.replace(dest)
    return dest
