"""Hostile local paths and outputs through the CLI: one FATAL line naming the problem."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
import urllib.parse
from pathlib import Path

import pytest
import requests

from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_oci_layout
from tests.conftest import ROOT, error_lines, run_cli
from tests.services.images import busybox_binary
from tests.services.registry import Registry
from tests.services.users import USER_PYTHON, TestUser

#: containers/image's limit for manifests and configs, and ours for every JSON document
LIMIT = 4 << 20


@pytest.fixture
def paths(tmp_path: Path) -> Path:
    """A symbolic link loop, a plain file and a dangling link."""
    os.symlink("loop", tmp_path / "loop")
    (tmp_path / "plain").write_bytes(b"")
    os.symlink("nowhere", tmp_path / "dangling")
    return tmp_path


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("loop", "too many levels of symbolic links"),
        ("loop/x.sif", "too many levels of symbolic links"),
        ("plain/x.sif", "not a directory"),
        ("dangling", "symbolic link to 'nowhere', which does not exist"),
    ],
)
def test_unreachable_local_image(paths: Path, name: str, problem: str) -> None:
    """Apptainer names the loop / ENOTDIR too ("EvalSymlinks: too many links", "not a directory")."""
    out = paths / "out.sif"
    for args in (("exec", name, "true"), ("run", name), ("build", str(out), name), ("pull", str(out), name)):
        proc = run_cli(*args, check=False, cwd=paths, timeout=60)
        assert (proc.returncode, proc.stderr) == (255, f"FATAL:   {name!r}: {problem}\n"), args
    assert not out.exists()


def test_unreachable_paths_in_a_definition_file(paths: Path, busybox_oci_layout: Path) -> None:
    """``From:`` of localimage and ``%files`` sources name the loop / ENOTDIR, as Apptainer's do."""
    out = paths / "out.sif"
    cases = (
        ("Bootstrap: localimage\nFrom: loop\n", "2: localimage loop: too many levels of symbolic links"),
        ("Bootstrap: localimage\nFrom: plain/x\n", "2: localimage plain/x: not a directory"),
        (
            f"Bootstrap: oci\nFrom: {busybox_oci_layout}:latest\n%files\n  plain/x /x\n",
            "4: %files source plain/x: not a directory",
        ),
    )
    for text, message in cases:
        (paths / "x.def").write_text(text)
        proc = run_cli("build", str(out), "x.def", check=False, cwd=paths, timeout=60)
        assert (proc.returncode, error_lines(proc.stderr)) == (255, [f"FATAL:   x.def:{message}"])
    assert not out.exists()


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive", "oci"])
def test_unreachable_transport_path(paths: Path, transport: str) -> None:
    """A loop or a file used as a directory was a traceback (or "no such directory") before."""
    out = paths / "out.sif"
    for name, problem in (("loop", "too many levels of symbolic links"), ("plain/x", "not a directory")):
        for command in ("build", "pull"):
            proc = run_cli(command, str(out), f"{transport}://{name}", check=False, cwd=paths, timeout=60)
            assert (proc.returncode, proc.stderr) == (255, f"FATAL:   '{transport}://{name}': {problem}\n")
    assert not out.exists()


def test_permission_denied(unpriv_user: TestUser) -> None:
    """An image in a directory the user may not search, or a file it may not read: no traceback."""
    with tempfile.TemporaryDirectory(prefix="hpcsif-robust-") as d:
        base = Path(d)
        os.chmod(base, 0o755)  # the user's way in; pytest's own tmp_path is root's alone
        (base / "locked").mkdir(mode=0o700)
        (base / "locked" / "x.sif").write_bytes(b"")
        (base / "unreadable.sif").write_bytes(b"")
        os.chmod(base / "unreadable.sif", 0o600)
        (base / "cache").mkdir()
        os.chown(base / "cache", unpriv_user.uid, unpriv_user.gid)
        (base / "out").mkdir()
        os.chown(base / "out", unpriv_user.uid, unpriv_user.gid)
        out = base / "out" / "out.sif"
        env = {"PYTHONPATH": str(ROOT), "HPCSIF_CACHEDIR": str(base / "cache")}
        for image, message in (
            ("locked/x.sif", "'locked/x.sif': permission denied"),
            ("unreadable.sif", "unreadable.sif: cannot open: Permission denied"),
        ):
            for args in (("exec", image, "true"), ("build", str(out), image)):
                cmd = [USER_PYTHON, "-m", "hpcsif.cli.main", *args]
                proc = unpriv_user.run(cmd, env=env, cwd=base, timeout=60)
                assert proc.returncode == 255 and proc.stderr.startswith("FATAL:   "), (args, proc.stderr)
                assert proc.stderr.endswith(f"{message}\n") and proc.stderr.count("\n") == 1, proc.stderr
        assert not out.exists()
        # a build into a directory the user may not write fails before any work, as pull does
        cmd = [USER_PYTHON, "-m", "hpcsif.cli.main", "build", str(base / "o.sif"), "docker://busybox"]
        proc = unpriv_user.run(cmd, env=env, cwd=base, timeout=60)
        assert (proc.returncode, proc.stderr) == (
            255,
            f"FATAL:   cannot write {base}/o.sif: permission denied in directory {base}\n",
        )


def test_build_output_mode_follows_umask(busybox_oci_layout: Path, tmp_path: Path) -> None:
    """Apptainer's build (like its pull, and ours) leaves a SIF 0777 & ~umask, not always 0755."""
    sif, again = tmp_path / "a.sif", tmp_path / "b.sif"
    run_cli("build", str(sif), f"oci://{busybox_oci_layout}:latest", umask=0o027)
    definition = tmp_path / "x.def"
    definition.write_text(f"Bootstrap: localimage\nFrom: {sif}\n")
    run_cli("build", str(again), str(definition), umask=0o077)
    assert (stat.S_IMODE(sif.stat().st_mode), stat.S_IMODE(again.stat().st_mode)) == (0o750, 0o700)
    run_cli("build", "-F", str(sif), str(again), umask=0o002)
    assert stat.S_IMODE(sif.stat().st_mode) == 0o775


def _layout(dest: Path, labels: dict[str, str] | None = None) -> Path:
    layer = layer_tar([Entry("bin", mode=0o755), Entry("bin/sh", busybox_binary().read_bytes(), 0o755)])
    write_oci_layout(dest, ImageSpec([layer], labels=labels or {}), "latest")
    return dest


def test_oversized_index_json(tmp_path: Path) -> None:
    """A 5 MiB index.json was read whole and parsed (a 100 MB one built at 314 MB RSS)."""
    layout = _layout(tmp_path / "layout")
    index = json.loads((layout / "index.json").read_text())
    index["annotations"] = {"pad": "x" * (LIMIT + 1)}
    (layout / "index.json").write_text(json.dumps(index))
    out = tmp_path / "out.sif"
    proc = run_cli("build", str(out), f"oci://{layout}", check=False, timeout=60)
    message = f"{layout}/index.json: exceeded maximum allowed size of {LIMIT} bytes (4 MiB)"
    assert (proc.returncode, proc.stderr) == (255, f"FATAL:   {message}\n")
    assert not out.exists()


def _push_raw(registry: Registry, layout: Path, repo: str) -> None:
    """Upload a layout's blobs and manifest with the registry API: skopeo refuses a >4 MiB config."""
    (desc,) = json.loads((layout / "index.json").read_text())["manifests"]
    manifest = (layout / "blobs/sha256" / desc["digest"][7:]).read_bytes()
    doc = json.loads(manifest)
    for blob in (doc["config"], *doc["layers"]):
        resp = requests.post(f"{registry.url}/v2/{repo}/blobs/uploads/", timeout=30)
        resp.raise_for_status()
        upload = urllib.parse.urljoin(registry.url, resp.headers["Location"])
        sep = "&" if "?" in upload else "?"
        data = (layout / "blobs/sha256" / blob["digest"][7:]).read_bytes()
        requests.put(f"{upload}{sep}digest={blob['digest']}", data=data, timeout=30).raise_for_status()
    headers = {"Content-Type": doc["mediaType"]}
    requests.put(
        f"{registry.url}/v2/{repo}/manifests/1", data=manifest, headers=headers, timeout=30
    ).raise_for_status()


def test_oversized_registry_config(registry_open: Registry, tmp_path: Path) -> None:
    """A config over 4 MiB is refused before it is downloaded, in containers/image's words.

    (Apptainer 1.4.5 itself pulls this one; skopeo and podman refuse it as we do.)
    """
    layout = _layout(tmp_path / "layout", {"pad": "x" * (LIMIT + 1)})
    _push_raw(registry_open, layout, "robust/big-config")
    out = tmp_path / "out.sif"
    proc = run_cli("pull", "--disable-cache", str(out), registry_open.ref("robust/big-config:1"), check=False)
    assert proc.returncode == 255 and proc.stderr.count("FATAL") == 1, proc.stderr
    assert proc.stderr.endswith(f"exceeded maximum allowed size of {LIMIT} bytes (4 MiB)\n"), proc.stderr
    assert " config sha256:" in proc.stderr and not out.exists()


def _peak_build(*args: str) -> tuple[object, int]:
    """Run ``hpcsif build ARGS`` in a parent whose only child it is: (process, peak RSS in KiB)."""
    import subprocess
    import sys

    peak = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
    )
    cmd = [sys.executable, "-c", peak, sys.executable, "-m", "hpcsif.cli.main", "build", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc, int(proc.stderr.split("PEAK ")[1].split()[0])


def test_compressed_archive_members_are_not_kept_in_memory(tmp_path: Path) -> None:
    """Junk members just under the document limit used to be kept in memory (100 x 4 MiB: 432 MB)."""
    import gzip
    import tarfile

    layout = _layout(tmp_path / "layout")
    archive = tmp_path / "img.oci-archive.tar.gz"
    junk = os.urandom(LIMIT - 4096)
    with gzip.open(archive, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        for i in range(40):
            info = tarfile.TarInfo(f"junk/{i}")
            info.size = len(junk)
            tar.addfile(info, io.BytesIO(junk))
        for path in sorted(layout.rglob("*")):
            tar.add(path, path.relative_to(layout).as_posix(), recursive=False)
    out = tmp_path / "out.sif"
    proc, peak_kib = _peak_build(str(out), f"oci-archive://{archive}")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert peak_kib < 120 * 1024, f"peak RSS {peak_kib} KiB"


def test_oversized_docker_archive_manifest(tmp_path: Path) -> None:
    """A manifest.json over the limit is named as such (it used to be 'archive has no manifest.json')."""
    import tarfile

    archive = tmp_path / "img.docker-archive.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        body = b"[" + b" " * (LIMIT + 1) + b"]"
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    out = tmp_path / "out.sif"
    proc = run_cli("build", str(out), f"docker-archive://{archive}", check=False, timeout=60)
    message = f"exceeded maximum allowed size of {LIMIT} bytes (4 MiB)"
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert proc.returncode == 255 and len(fatal) == 1 and message in fatal[0] and "manifest.json" in fatal[0]
    assert not out.exists()


def test_deeply_nested_oras_manifest(registry_open: Registry, tmp_path: Path) -> None:
    """An oras:// manifest nested beyond Python's recursion limit: one FATAL line, no traceback."""
    config = b"{}"
    resp = requests.post(f"{registry_open.url}/v2/robust/deep/blobs/uploads/", timeout=30)
    resp.raise_for_status()
    upload = urllib.parse.urljoin(registry_open.url, resp.headers["Location"])
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    sep = "&" if "?" in upload else "?"
    requests.put(f"{upload}{sep}digest={digest}", data=config, timeout=30).raise_for_status()
    deep = "[" * 5000 + "]" * 5000  # Go's JSON takes 10000 levels, Python's parser about 1000
    manifest = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        f'"config":{{"mediaType":"application/vnd.sylabs.sif.config.v1+json","digest":"{digest}","size":2}},'
        f'"layers":[],"annotations":{{"x":"y"}},"deep":{deep}}}'
    )
    headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    url = f"{registry_open.url}/v2/robust/deep/manifests/1"
    requests.put(url, data=manifest, headers=headers, timeout=30).raise_for_status()
    out = tmp_path / "out.sif"
    proc = run_cli("pull", str(out), registry_open.ref("robust/deep:1", transport="oras"), check=False)
    assert proc.returncode == 255 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("FATAL")] == [
        line for line in proc.stderr.splitlines() if line.strip()
    ], proc.stderr
    assert "is not valid JSON" in proc.stderr and not out.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_full_disk_is_one_line_and_leaves_nothing(busybox_oci_layout: Path, tmp_path: Path) -> None:
    """ENOSPC while building, unpacking a sandbox or filling the cache: one FATAL line, no half
    output, no cache entry."""
    import subprocess

    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(full)], check=True)
    try:
        src = f"oci://{busybox_oci_layout}:latest"
        env = {"HPCSIF_CACHEDIR": str(full / "cache")}
        for args in (["build", str(full / "x.sif"), src], ["build", "--sandbox", str(full / "sb"), src]):
            proc = run_cli(*args, check=False, timeout=60)
            assert proc.returncode == 255 and "Traceback" not in proc.stderr, proc.stderr
            assert len(error_lines(proc.stderr)) == 1, proc.stderr
            assert sorted(p.name for p in full.iterdir()) == [], list(full.iterdir())
        proc = run_cli("pull", str(tmp_path / "y.sif"), src, check=False, env=env, timeout=60)
        assert proc.returncode == 255 and len(error_lines(proc.stderr)) == 1, proc.stderr
        assert not (tmp_path / "y.sif").exists() and not list((full / "cache" / "sif").iterdir())
    finally:
        subprocess.run(["umount", str(full)], check=True)
