"""``pull``/``push`` against loopback registries, side by side with Apptainer 1.4 where it is installed.

What a user sees is compared: the ``INFO:`` lines Apptainer prints at its default verbosity (a
conversion, a cache hit, an oras download, an upload), the single ``FATAL:`` line and exit status
for references Apptainer rejects, and registries that serve corrupt or missing blobs. Pulls
interrupted mid-download stop at once, keep their part for a resume and leave no output file.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import CONVERSION_INFO, peer_apptainer
from tests.services.images import TestImage
from tests.services.registry import Registry, clean_env, start_registry
from tests.services.relay import relay
from tests.services.users import USER_PYTHON, unpriv_user  # noqa: F401 (fixture)
from tests.sources.helpers import assert_store_sound

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(cwd: Path) -> dict[str, str]:
    """The CLI's environment: a cache under ``cwd``, plain HTTP to the loopback registries."""
    env = clean_env()
    env.update(PYTHONPATH=str(REPO_ROOT), APPTAINER_CACHEDIR=str(cwd / "cache"), APPTAINER_NOHTTPS="1")
    return env


def hpcsif(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    """Run the CLI in ``cwd`` (see :func:`_env`)."""
    argv = [sys.executable, "-m", "hpcsif.cli.main", *args]
    return subprocess.run(argv, cwd=cwd, env=_env(cwd), capture_output=True, text=True, **kw)


def peer(cwd: Path, *args: str, cache: Path | None = None, **kw) -> subprocess.CompletedProcess[str]:
    """The same command with Apptainer (skips the test when it is not installed), its cache in
    ``cache`` (default: ``cwd/peer-cache``)."""
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("neither apptainer nor peer-apptainer is on PATH")
    env = clean_env()
    env.update(APPTAINER_CACHEDIR=str(cache or cwd / "peer-cache"), APPTAINER_NOHTTPS="1")
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


def info_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("INFO:")]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory under /tmp that the peer (in its chroot) sees at the same path."""
    assert str(tmp_path).startswith("/tmp/")
    return tmp_path


# -- what a pull prints --------------------------------------------------------------------------
def test_pull_and_push_print_apptainers_info_lines(registry_open, busybox_image, work) -> None:
    registry_open.push(busybox_image.oci_ref, "peer/busybox:1")
    ref = registry_open.ref("peer/busybox:1")
    first = hpcsif(work, "pull", "--name", "a.sif", ref)
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines() == CONVERSION_INFO
    again = hpcsif(work, "pull", "--name", "b.sif", ref)
    assert again.stderr.splitlines() == ["INFO:    Using cached SIF image"]
    assert hpcsif(work, "-q", "pull", "--name", "c.sif", ref).stderr == ""
    uncached = hpcsif(work, "pull", "--disable-cache", "--name", "d.sif", ref)
    assert uncached.stderr.splitlines() == CONVERSION_INFO
    sandbox = hpcsif(work, "pull", "--sandbox", "--name", "sb", ref)
    assert sandbox.stderr.splitlines() == [  # the cached SIF, then a local build from it
        "INFO:    Using cached SIF image",
        "INFO:    Starting build...",
        "INFO:    Extracting local image...",
        "INFO:    Creating sandbox directory...",
        "INFO:    Build complete: sb",
    ]

    oras = registry_open.ref("peer/busybox-sif:1", transport="oras")
    push = hpcsif(work, "push", str(work / "a.sif"), oras)
    assert push.returncode == 0 and push.stdout == "", push  # Apptainer's line goes to stderr
    assert push.stderr.startswith(f"INFO:    Upload complete: {oras} (sha256:")
    down = hpcsif(work, "pull", "--name", "e.sif", oras)
    assert down.stderr.splitlines() == ["INFO:    Downloading oras image"]
    down = hpcsif(work, "pull", "--name", "f.sif", oras)
    assert down.stderr.splitlines() == ["INFO:    Using cached SIF image"]
    assert (work / "f.sif").read_bytes() == (work / "a.sif").read_bytes()

    # every line we print is one Apptainer prints for the same pull (it adds its build steps)
    for name, uri, ours in (
        ("p1.sif", ref, first),
        ("p2.sif", ref, again),
        ("p3.sif", oras, hpcsif(work, "pull", "--disable-cache", "--name", "g.sif", oras)),
        ("p4.sif", oras, down),
        ("sb", ref, sandbox),
    ):
        where = work / "peer" if name == "sb" else work  # beside our own "sb" directory
        where.mkdir(exist_ok=True)
        sandbox_flag = ["--sandbox"] if name == "sb" else []
        theirs = peer(where, "pull", *sandbox_flag, "--name", name, uri, cache=work / "peer-cache")
        assert theirs.returncode == 0, theirs.stderr
        assert set(info_lines(ours.stderr)) <= set(info_lines(theirs.stderr)), (ours.stderr, theirs.stderr)
    assert (work / "p4.sif").read_bytes() == (work / "a.sif").read_bytes()


# -- references Apptainer rejects ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "ours", "theirs"),
    [
        ("Team/busybox:1", "'Team' in 'docker://{host}/Team/busybox:1' (repository names must be lowercase)",
         "repository name must be lowercase"),
        ("team/busybox:1/", "invalid image reference 'docker://{host}/team/busybox:1/': no repository name",
         "invalid reference format"),
        ("team/busybox@sha256:abc", "invalid digest 'sha256:abc'", "invalid reference format"),
    ],
)  # fmt: skip
def test_bad_references_are_one_fatal_line_as_apptainers(work, path: str, ours: str, theirs: str) -> None:
    host = "127.0.0.1:1"  # never contacted: the reference is refused first
    res = hpcsif(work, "pull", f"docker://{host}/{path}")
    assert res.returncode == 255
    assert len(res.stderr.splitlines()) == 1 and ours.format(host=host) in res.stderr, res.stderr
    assert not [p for p in work.iterdir() if p.name != "cache"]
    other = peer(work, "pull", f"docker://{host}/{path}")
    assert other.returncode == 255 and theirs in other.stderr, other.stderr


# -- registries serving bad content --------------------------------------------------------------
def _blob_file(reg: Registry, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return reg.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, busybox_image: TestImage) -> Iterator[dict[str, Registry]]:
    """Two registries holding the busybox image: one with its big layer corrupted, one without it."""
    regs = {
        kind: start_registry(tmp_path_factory.mktemp(f"registry-{kind}"), "open") for kind in ("bad", "gone")
    }
    try:
        for reg in regs.values():
            reg.push(busybox_image.oci_ref, "team/busybox:1")
        layer = _blob_file(regs["bad"], busybox_image.layer_digests[0])
        data = bytearray(layer.read_bytes())
        data[100] ^= 0xFF
        layer.write_bytes(bytes(data))
        _blob_file(regs["gone"], busybox_image.layer_digests[0]).unlink()
        yield regs
    finally:
        for reg in regs.values():
            reg.stop()


@pytest.mark.parametrize(
    ("kind", "ours", "theirs"),
    [
        ("bad", "the registry serves corrupt content (downloaded twice, both times hashing to sha256:",
         "error verifying sha256 checksum"),
        ("gone", "blob unknown to the registry", "BLOB_UNKNOWN"),
    ],
)  # fmt: skip
def test_corrupt_or_missing_blob(damaged, busybox_image, work, kind: str, ours: str, theirs: str) -> None:
    ref = damaged[kind].ref("team/busybox:1")
    start = time.monotonic()
    res = hpcsif(work, "pull", ref)
    assert time.monotonic() - start < 10  # no long series of retries
    assert res.returncode == 255
    fatal = [line for line in res.stderr.splitlines() if line.startswith("FATAL:")]
    assert len(fatal) == 1 and busybox_image.layer_digests[0] in fatal[0] and ours in fatal[0], res.stderr
    assert not (work / "busybox_1.sif").exists()
    assert not (work / "cache" / "oci" / "blobs" / "sha256" / busybox_image.layer_digests[0][7:]).exists()
    assert_store_sound(work / "cache" / "oci", partials=kind == "gone")  # an empty part, for a resume
    other = peer(work, "pull", "--name", "peer.sif", ref)
    assert other.returncode == 255 and theirs in other.stderr, other.stderr


# -- interrupted pulls ---------------------------------------------------------------------------
class SlowProxy:
    """Forwards to a registry, sending blob bodies 64 KiB at a time with a pause between."""

    def __init__(self, upstream: str, pause: float) -> None:
        outer = self
        self.upstream, self.pause = upstream, pause

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                body = relay(self, outer.upstream)
                for i in range(0, len(body), 1 << 16):
                    try:
                        self.wfile.write(body[i : i + (1 << 16)])
                        self.wfile.flush()
                    except OSError:  # the client went away
                        return
                    if "/blobs/" in self.path:
                        time.sleep(outer.pause)

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_download_stops_at_once_and_resumes(registry_open, busybox_image, work, sig) -> None:
    registry_open.push(busybox_image.oci_ref, "slow/busybox:1")
    proxy = SlowProxy(registry_open.url, pause=0.15)
    layer = busybox_image.layer_digests[0]  # the 1 MiB busybox binary: 16 pauses, 2.4 s
    size = (busybox_image.layout / "blobs" / "sha256" / layer[7:]).stat().st_size
    part = work / "cache" / "oci" / ".partial" / layer[7:]
    child = subprocess.Popen(
        [sys.executable, "-m", "hpcsif.cli.main", "pull", f"docker://{proxy.host}/slow/busybox:1"],
        cwd=work, env=_env(work), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 0) and child.poll() is None:
        assert time.monotonic() < deadline, "the download did not start"
        time.sleep(0.02)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    proxy.server.shutdown()
    assert child.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
    assert err.splitlines()[-1] in ("FATAL:   interrupted", "FATAL:   terminated")
    # the download stopped at its next block instead of running to the end of the layer
    assert part.exists() and 0 < part.stat().st_size < size, "the layer was downloaded to its end"
    assert not [p.name for p in work.iterdir() if p.name != "cache"]  # no SIF, no temporary file
    assert_store_sound(work / "cache" / "oci", partials=True)
    res = hpcsif(work, "-v", "pull", registry_open.ref("slow/busybox:1"))
    assert res.returncode == 0, res.stderr
    assert f"Resuming blob {layer} at byte" in res.stderr
    assert (work / "busybox_1.sif").stat().st_size > 0
    assert_store_sound(work / "cache" / "oci")


def test_a_complete_part_left_behind_is_verified_not_requested_again(
    registry_open, busybox_image, work
) -> None:
    """A pull stopped between the last byte and the check: its part is whole, and a Range from
    its end used to fail every later pull of the image."""
    registry_open.push(busybox_image.oci_ref, "slow/busybox:1")
    small = min(
        busybox_image.layer_digests,
        key=lambda d: (busybox_image.layout / "blobs/sha256" / d[7:]).stat().st_size,
    )
    partial = work / "cache" / "oci" / ".partial"
    partial.mkdir(parents=True)
    shutil.copy(busybox_image.layout / "blobs" / "sha256" / small[7:], partial / small[7:])
    res = hpcsif(work, "pull", registry_open.ref("slow/busybox:1"))
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stderr
    assert (work / "cache" / "oci" / "blobs" / "sha256" / small[7:]).exists()
    assert_store_sound(work / "cache" / "oci")


# -- archives holding several images -------------------------------------------------------------
@pytest.fixture(scope="module")
def two_image_archives(tmp_path_factory) -> tuple[Path, Path]:
    """An oci-archive tagged ``one`` and ``two``, and a docker-archive of the same two images
    (``hpcsif/one:latest``, ``hpcsif/two:latest``), each image labelled with its name."""
    import json
    import tarfile

    from hpcsif.image.compose import Entry, ImageSpec, layer_tar, write_oci_layout

    root = tmp_path_factory.mktemp("archives")
    layout = root / "layout"
    for name in ("one", "two"):
        layer = layer_tar([Entry("which", name.encode())])
        write_oci_layout(layout, ImageSpec([layer], labels={"org.test.which": name}), name)
    oci = root / "two.oci.tar"
    with tarfile.open(oci, "w") as tar:  # no "./" prefix: Apptainer rejects those
        for path in sorted(layout.iterdir()):
            tar.add(path, arcname=path.name)
    manifest: list[object] = []
    docker = root / "multi.docker.tar"
    with tarfile.open(docker, "w") as out:
        seen: set[str] = set()
        for name in ("one", "two"):
            single = root / f"single-{name}.tar"
            dest = f"docker-archive:{single}:hpcsif/{name}:latest"
            subprocess.run(
                ["skopeo", "copy", "--quiet", f"oci:{layout}:{name}", dest], check=True, capture_output=True
            )
            with tarfile.open(single) as tar:
                for member in tar.getmembers():
                    if member.name == "manifest.json":
                        manifest += json.load(tar.extractfile(member))  # type: ignore[arg-type]
                    elif member.name not in seen and member.name != "repositories":
                        seen.add(member.name)
                        out.addfile(member, tar.extractfile(member) if member.isfile() else None)
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    return oci, docker


def _label(work: Path, sif: str) -> str:
    res = hpcsif(work, "inspect", "--labels", sif)
    return next(line.split(": ", 1)[1] for line in res.stdout.splitlines() if "org.test.which" in line)


def test_multi_image_archives_pick_the_named_image_through_one_cache(two_image_archives, work) -> None:
    oci, docker = two_image_archives
    picks = [
        (f"oci-archive:{oci}:one", "one"),
        (f"oci-archive:{oci}:two", "two"),  # the same file: it used to return the cached "one"
        (f"docker-archive:{docker}:hpcsif/two:latest", "two"),
        (f"docker-archive://{docker}:hpcsif/one", "one"),
        (f"docker-archive:{docker}:@1", "two"),  # containers/image's source index
    ]
    for i, (uri, which) in enumerate(picks):
        res = hpcsif(work, "pull", "--name", f"{i}.sif", uri)
        assert res.returncode == 0, res.stderr
        assert _label(work, f"{i}.sif") == which, uri
    for uri, names in ((f"oci-archive:{oci}", "one, two"), (f"docker-archive:{docker}", "hpcsif/two:latest")):
        res = hpcsif(work, "pull", "--name", "x.sif", uri)
        assert res.returncode == 255 and "holds 2 images" in res.stderr and names in res.stderr, res.stderr
        assert len(res.stderr.splitlines()) == 1  # the FATAL line alone: no image, no conversion
        other = peer(work, "pull", "--name", "x.sif", uri)
        assert other.returncode == 255, other.stderr  # "choose an image" / "expected 1 item, got 2"
        assert len(other.stderr.splitlines()) == 1
    res = hpcsif(work, "pull", "--name", "x.sif", f"docker-archive:{docker}:@2")
    assert res.returncode == 255 and "no image @2 (it holds 2: @0 to @1)" in res.stderr
    assert not (work / "x.sif").exists()


def test_unreachable_docker_daemon_is_one_plain_line(work) -> None:
    sock = work / "no-daemon.sock"
    res = hpcsif(work, "pull", "--docker-host", f"unix://{sock}", "docker-daemon:team/app:1")
    assert res.returncode == 255
    assert res.stderr.splitlines()[-1] == (
        f"FATAL:   docker-daemon:team/app:1: cannot reach the Docker daemon at unix://{sock}: "
        "no such file or directory"
    )


@pytest.mark.parametrize("how", [[], ["--sandbox"], ["--disable-cache"], ["oras"]])
def test_unwritable_output_directory_fails_before_any_download(request, how: list[str]) -> None:
    """One line naming the directory, before the registry is asked (it would be: nothing listens
    on port 1) or anything converted; it used to be a traceback (oras, --sandbox) or to come only
    after the whole conversion."""
    if os.geteuid() != 0:  # a directory the current user cannot write to
        home, run = Path(request.getfixturevalue("tmp_path")), None
    else:  # root writes anywhere: as the unprivileged test user
        user = request.getfixturevalue("unpriv_user")
        home, run = Path(user.home), user
    work = home / f"pull-ro-{os.getpid()}-{'-'.join(how) or 'plain'}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "ro").mkdir(parents=True)
    try:
        if run:
            os.chown(work, run.uid, run.gid)
        (work / "ro").chmod(0o555)
        uri = "oras://127.0.0.1:1/team/app:1" if how == ["oras"] else "docker://127.0.0.1:1/team/app:1"
        flags = [] if how == ["oras"] else how
        argv = ["-m", "hpcsif.cli.main", "pull", *flags, "--dir", str(work / "ro"), uri]
        env = _env(work)
        if run:  # the user's own login environment, with ours for hpcsif
            keep = ("PYTHONPATH", "APPTAINER_CACHEDIR", "APPTAINER_NOHTTPS")
            res = run.run([USER_PYTHON, *argv], env={k: env[k] for k in keep}, cwd=str(work))
        else:
            res = subprocess.run([sys.executable, *argv], env=env, cwd=work, capture_output=True, text=True)
        name = "app_1.sif"
        assert res.returncode == 255
        assert res.stderr.splitlines() == [
            f"FATAL:   cannot write {work}/ro/{name}: permission denied in directory {work}/ro"
        ], res.stderr
        assert not any((work / "ro").iterdir())
    finally:
        (work / "ro").chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)


def test_a_registry_failing_for_good_names_the_status(registry_open, work) -> None:
    from tests.services.faultproxy import fault_proxy

    (work / "hpcsif.toml").write_text("[registry]\nretries = 1\n")
    for proxy in fault_proxy(registry_open.url):
        proxy.arm(error500=10)
        res = hpcsif(work, "-c", str(work / "hpcsif.toml"), "pull", f"docker://{proxy.host}/team/app:1")
        assert res.returncode == 255
        assert res.stderr.splitlines() == [
            f"WARNING: GET http://{proxy.host}/v2/: HTTP 500; retrying (1/1)",
            f"FATAL:   http://{proxy.host}/v2/: HTTP 500 (UNKNOWN: injected)",
        ]


def _image_paths(sif: Path) -> set[str]:
    """The paths of the image's own tree in a SIF (without Apptainer's runtime files)."""
    from hpcsif.sif.reader import SIFImage

    with SIFImage.open(sif) as img:
        offset = img.primary_partition().offset
    out = subprocess.run(
        ["unsquashfs", "-l", "-o", str(offset), "-d", "", str(sif)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    skip = ("/.singularity.d", "/etc/hosts", "/etc/resolv.conf")  # Apptainer's own, known differences
    return {p for p in out.splitlines() if p.startswith("/") and not p.startswith(skip)}


def test_docker_daemon_pull_matches_apptainers(podman_service, busybox_image, work) -> None:
    uri = f"docker-daemon:{podman_service.image}"  # Apptainer's spelling; docker-daemon:// works too
    res = hpcsif(work, "pull", "--docker-host", podman_service.docker_host, "--name", "ours.sif", uri)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == CONVERSION_INFO
    other = peer(work, "pull", "--docker-host", podman_service.docker_host, "--name", "peer.sif", uri)
    assert other.returncode == 0, other.stderr
    ours = _image_paths(work / "ours.sif")
    assert {f"/{p}" for p in busybox_image.files} <= ours
    assert ours == _image_paths(work / "peer.sif")


def test_pulled_files_get_the_umask_as_apptainers(registry_open, busybox_image, work) -> None:
    """0777 & ~umask, as Apptainer: a user's umask 027 keeps a private image from other users."""
    registry_open.push(busybox_image.oci_ref, "peer/busybox:1")
    ref, oras = registry_open.ref("peer/busybox:1"), registry_open.ref("peer/umask:1", transport="oras")
    assert hpcsif(work, "pull", "--name", "a.sif", ref, preexec_fn=lambda: os.umask(0o022)).returncode == 0
    assert hpcsif(work, "push", str(work / "a.sif"), oras).returncode == 0
    assert (work / "a.sif").stat().st_mode & 0o777 == 0o755
    umask = {"preexec_fn": lambda: os.umask(0o027)}
    for name, args in (("b.sif", [ref]), ("c.sif", ["--disable-cache", ref]), ("d.sif", [oras])):
        res = hpcsif(work, "pull", "--name", name, *args, **umask)
        assert res.returncode == 0, res.stderr
        assert (work / name).stat().st_mode & 0o777 == 0o750, name
    theirs = peer(work, "pull", "--name", "p.sif", ref, **umask)
    assert theirs.returncode == 0, theirs.stderr
    assert (work / "p.sif").stat().st_mode & 0o777 == 0o750


def test_network_pull_says_so_and_gets_the_umask(http_files, work) -> None:
    (http_files.root / "notes.txt").write_bytes(b"plain file\n")
    umask = {"preexec_fn": lambda: os.umask(0o027)}
    res = hpcsif(work, "pull", f"{http_files.url}/notes.txt", **umask)
    assert res.returncode == 0 and res.stderr == "INFO:    Downloading network image\n", res.stderr
    assert (work / "notes.txt").stat().st_mode & 0o777 == 0o750
    (work / "peer").mkdir()
    theirs = peer(work / "peer", "pull", f"{http_files.url}/notes.txt", **umask)
    assert theirs.returncode == 0 and info_lines(theirs.stderr) == ["INFO:    Downloading network image"]
    assert (work / "peer" / "notes.txt").stat().st_mode & 0o777 == 0o750


# -- what a build prints -------------------------------------------------------------------------
BUILD_DEF = """Bootstrap: localimage
From: a.sif

%files
    note.txt /opt/note.txt
%environment
    export A=1
%runscript
    echo run
%startscript
    echo start
%labels
    X y
%test
    true
%help
    help me
"""


def test_build_prints_apptainers_steps(registry_open, busybox_image, work) -> None:
    registry_open.push(busybox_image.oci_ref, "peer/busybox:2")
    ref = registry_open.ref("peer/busybox:2")
    (work / "note.txt").write_text("note\n")
    (work / "x.def").write_text(BUILD_DEF)
    fetch = ["Starting build...", "Fetching OCI image...", "Extracting OCI image..."]
    local = ["Starting build...", "Verifying bootstrap image a.sif", "Extracting local image..."]
    cases = {
        ("a.sif", ref): [*fetch, "Inserting Apptainer configuration...", "Creating SIF file..."],
        ("b.sif", "a.sif"): [*local, "Creating SIF file..."],
        ("--sandbox", "sb", "a.sif"): [*local, "Creating sandbox directory..."],
        ("c.sif", "sb"): ["Starting build...", "Extracting local image...", "Creating SIF file..."],
        ("--notest", "d.sif", "x.def"): [
            *local,
            "Copying note.txt to /opt/note.txt",
            "Adding help info",
            "Adding labels",
            "Adding environment to container",
            "Adding startscript",
            "Adding runscript",
            "Adding testscript",
            "Creating SIF file...",
        ],
    }
    for args, steps in cases.items():
        ours = hpcsif(work, "build", *args)
        assert ours.returncode == 0, ours.stderr
        expected = [f"INFO:    {s}" for s in steps] + [f"INFO:    Build complete: {args[-2]}"]
        assert info_lines(ours.stderr) == expected, args
    # the same commands with Apptainer, into other files (its own cache; a.sif is ours)
    for args in cases:
        theirs = peer(work, "build", "-F", *args[:-2], f"peer-{args[-2]}", args[-1])
        assert theirs.returncode == 0, theirs.stderr
        mine = info_lines(hpcsif(work, "build", "-F", *args[:-2], f"again-{args[-2]}", args[-1]).stderr)
        assert [line.replace("again-", "peer-") for line in mine] == info_lines(theirs.stderr), args
