"""``hpcsif pull`` / ``hpcsif push`` end to end through the command line, against real services."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import error_lines
from tests.services.faultproxy import fault_proxy
from tests.services.registry import PASSWORD, USER, clean_env
from tests.sources.helpers import assert_store_sound

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def _conversion_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("hpcsif.sif.squashfs") is None:
        return False
    from hpcsif.image import layers

    tools = shutil.which("tar2sqfs") or shutil.which("mksquashfs")
    return hasattr(layers, "flatten") and tools is not None


needs_conversion = pytest.mark.skipif(
    not _conversion_available(), reason="the SIF conversion pipeline is missing"
)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = clean_env()
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        HPCSIF_CACHEDIR=str(tmp_path / "cache"),
        DOCKER_CONFIG=str(tmp_path / "docker-config"),
        HOME=str(tmp_path / "home"),
        **extra,
    )
    return env


def hpcsif(tmp_path: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run the CLI; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "hpcsif.cli.main", *args],
        cwd=cwd or tmp_path,
        env=env or _env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _sif_listing(sif: Path) -> str:
    """The paths inside the SIF's primary squashfs partition (via the lead's reader and unsquashfs)."""
    from hpcsif.sif.reader import SIFImage

    with SIFImage.open(sif) as img:
        part = img.primary_partition()
    out = subprocess.run(
        ["unsquashfs", "-l", "-o", str(part.offset), "-d", "", str(sif)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def _assert_busybox_sif(sif: Path, busybox_image) -> None:
    listing = _sif_listing(sif)
    for path in busybox_image.files:
        assert f"/{path}\n" in listing
    for path in busybox_image.removed:
        assert f"/{path}\n" not in listing


def _no_secret_under(root: Path, secret: bytes) -> None:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert secret not in p.read_bytes(), f"credentials written to {p}"


# -- docker:// -----------------------------------------------------------------------------------
@needs_conversion
def test_pull_by_tag_and_digest_default_names(registry_open, busybox_image, tmp_path) -> None:
    digest = registry_open.push(busybox_image.oci_ref, "team/busybox:1.0")
    res = hpcsif(tmp_path, "pull", registry_open.ref("team/busybox:1.0"))
    assert res.returncode == 0, res.stderr
    _assert_busybox_sif(tmp_path / "busybox_1.0.sif", busybox_image)
    # the same image by digest: a SIF cache hit, nothing fetched or converted
    res = hpcsif(tmp_path, "-v", "pull", registry_open.ref(f"team/busybox@{digest}"))
    assert res.returncode == 0, res.stderr
    assert "Copying blob" not in res.stderr and "Skipping fetch" not in res.stderr
    _assert_busybox_sif(tmp_path / f"busybox@sha256_{digest[7:]}.sif", busybox_image)  # Apptainer's name
    # other conversion options: a new SIF from the cached blobs
    res = hpcsif(
        tmp_path,
        "-v",
        "pull",
        "--compression",
        "gzip",
        "--name",
        "gz.sif",
        registry_open.ref("team/busybox:1.0"),
    )
    assert res.returncode == 0, res.stderr
    assert f"Skipping fetch of repeat blob {busybox_image.layer_digests[0]}" in res.stderr
    _assert_busybox_sif(tmp_path / "gz.sif", busybox_image)
    # an existing file is kept unless forced
    res = hpcsif(tmp_path, "pull", registry_open.ref("team/busybox:1.0"))
    assert res.returncode != 0 and "already exists" in res.stderr
    res = hpcsif(tmp_path, "pull", "--force", "--name", "x.sif", registry_open.ref("team/busybox:1.0"))
    assert res.returncode == 0, res.stderr
    assert_store_sound(tmp_path / "cache" / "oci")


@needs_conversion
def test_pull_with_env_credentials_never_shows_the_password(registry_token, busybox_image, tmp_path) -> None:
    registry_token.push(busybox_image.oci_ref, "private/busybox:1")
    env = _env(tmp_path, APPTAINER_DOCKER_USERNAME=USER, APPTAINER_DOCKER_PASSWORD=PASSWORD)
    res = hpcsif(tmp_path, "-d", "pull", "--name", "p.sif", registry_token.ref("private/busybox:1"), env=env)
    assert res.returncode == 0, res.stderr
    assert PASSWORD not in res.stderr and PASSWORD not in res.stdout
    assert "APPTAINER_DOCKER_USERNAME" in res.stderr  # the debug line names the source, not the secret
    _assert_busybox_sif(tmp_path / "p.sif", busybox_image)
    _no_secret_under(tmp_path / "cache", PASSWORD.encode())


@needs_conversion
def test_pull_through_faults_then_disable_cache(registry_basic, busybox_image, tmp_path) -> None:
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    env = _env(tmp_path, HPCSIF_DOCKER_USERNAME=USER, HPCSIF_DOCKER_PASSWORD=PASSWORD)
    for proxy in fault_proxy(registry_basic.url):
        proxy.arm(reset=1, error500=1, wrong=1)
        res = hpcsif(tmp_path, "pull", "--name", "f.sif", f"docker://{proxy.host}/private/busybox:1", env=env)
        assert res.returncode == 0, res.stderr
        assert sum(proxy.fired.values()) == 3
    _assert_busybox_sif(tmp_path / "f.sif", busybox_image)
    assert_store_sound(tmp_path / "cache" / "oci")
    shutil.rmtree(tmp_path / "cache")
    env["HPCSIF_DISABLE_CACHE"] = "1"
    res = hpcsif(tmp_path, "pull", "--name", "g.sif", registry_basic.ref("private/busybox:1"), env=env)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "cache" / "oci" / "blobs").exists()


@needs_conversion
def test_pull_docker_daemon(podman_service, busybox_image, tmp_path) -> None:
    # --docker-host (Apptainer's flag) wins over $DOCKER_HOST
    env = _env(tmp_path, DOCKER_HOST=f"unix://{tmp_path}/no-such.sock")
    uri = f"docker-daemon://{podman_service.image}"
    res = hpcsif(tmp_path, "pull", "--docker-host", podman_service.docker_host, uri, env=env)
    assert res.returncode == 0, res.stderr
    _assert_busybox_sif(tmp_path / "busybox_latest.sif", busybox_image)


def test_arch_that_a_single_arch_image_lacks_warns(busybox_image, tmp_path) -> None:
    """As Apptainer: the image is taken, with a warning naming both architectures its way."""
    uri = f"oci://{busybox_image.layout}:latest"
    res = hpcsif(tmp_path, "pull", "--arch", "arm", "--arch-variant", "7", "--name", "a.sif", uri)
    assert res.returncode == 0, res.stderr
    assert "WARNING: Architecture amd64 does not match build arch arm32v7\n" in res.stderr
    res = hpcsif(tmp_path, "pull", "--arch", "amd64", "--name", "b.sif", uri)
    assert res.returncode == 0 and "WARNING" not in res.stderr, res.stderr
    # a variant alone counts only for arm, as in Apptainer: amd64 is amd64
    res = hpcsif(tmp_path, "pull", "--arch-variant", "7", "--name", "c.sif", uri)
    assert res.returncode == 0 and "WARNING" not in res.stderr, res.stderr


# -- errors and --docker-login (no conversion needed: they fail or use oras://) -------------------
def test_auth_required_message_and_exit_code(registry_basic, busybox_image, tmp_path) -> None:
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    res = hpcsif(tmp_path, "pull", registry_basic.ref("private/busybox:1"))
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == (
        f"FATAL:   authentication required for {registry_basic.host}/private/busybox: "
        "set HPCSIF_DOCKER_USERNAME and HPCSIF_DOCKER_PASSWORD, use --docker-login or --authfile FILE"
    )
    assert not (tmp_path / "busybox_1.sif").exists()


def run_with_tty(argv: list[str], env: dict[str, str], cwd: Path, answers: list[tuple[bytes, bytes]]):
    """Run ``argv`` with a pseudo-terminal as its controlling tty, answering prompts; returns (rc, output)."""
    master, slave = os.openpty()

    def make_controlling_tty() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, preexec_fn=make_controlling_tty
    )
    os.close(slave)
    output, pending, deadline = b"", list(answers), time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        if pending and pending[0][0] in output:
            os.write(master, pending.pop(0)[1])
            output = output.replace(b"Enter Docker", b"(answered) Docker", 1)
        if proc.poll() is not None and not ready:
            break
    os.close(master)
    return proc.wait(30), output.decode(errors="replace")


def test_docker_login_prompt_with_oras(registry_token, tmp_path) -> None:
    sif = tmp_path / "tiny.sif"
    from hpcsif.sif.format import DataType
    from hpcsif.sif.writer import ObjectSpec, write_sif

    write_sif(sif, [ObjectSpec(DataType.DEFFILE, data=b"bootstrap: scratch\n")])
    ref = registry_token.ref("private/tiny:1", transport="oras")
    env = _env(tmp_path)
    base = [sys.executable, "-m", "hpcsif.cli.main"]
    answers = [
        (b"Enter Docker Username:", USER.encode() + b"\n"),
        (b"Enter Docker Password:", PASSWORD.encode() + b"\n"),
    ]
    rc, out = run_with_tty([*base, "push", "--docker-login", str(sif), ref], env, tmp_path, answers)
    assert rc == 0, out
    assert "Upload complete" in out and PASSWORD not in out  # the password is not echoed
    answers = [
        (b"Enter Docker Username:", USER.encode() + b"\n"),
        (b"Enter Docker Password:", PASSWORD.encode() + b"\n"),
    ]
    rc, out = run_with_tty([*base, "-d", "pull", "--docker-login", ref], env, tmp_path, answers)
    assert rc == 0, out
    assert PASSWORD not in out and "--docker-login" in out
    assert (tmp_path / "tiny_1.sif").read_bytes() == sif.read_bytes()
    _no_secret_under(tmp_path / "cache", PASSWORD.encode())
    # without credentials the same pull is refused
    res = hpcsif(tmp_path, "pull", "--name", "anon.sif", ref)
    assert res.returncode != 0 and "authentication required" in res.stderr


# -- oras://, http(s)://, file:// ----------------------------------------------------------------
def test_oras_push_pull_cli_and_peer(registry_open, tmp_path) -> None:
    from hpcsif.sif.format import DataType
    from hpcsif.sif.writer import ObjectSpec, write_sif

    sif = write_sif(tmp_path / "mine.sif", [ObjectSpec(DataType.DEFFILE, data=b"bootstrap: scratch\n")])
    ref = registry_open.ref("team/mine:2", transport="oras")
    res = hpcsif(tmp_path, "push", str(sif), ref)
    assert res.returncode == 0, res.stderr
    res = (
        hpcsif(tmp_path, "pull", "--dir", str(tmp_path / "out"), ref)
        if (tmp_path / "out").mkdir() is None
        else None
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "mine_2.sif").read_bytes() == sif.read_bytes()
    res = hpcsif(tmp_path, "push", str(sif), registry_open.ref("team/mine:2"))
    assert res.returncode != 0 and "oras:// references only" in res.stderr

    peer = shutil.which("apptainer") or shutil.which("peer-apptainer")
    if peer is None:
        pytest.skip("Apptainer is not installed: the peer half of the round trip is skipped")
    peer_dir = Path("/tmp") / f"hpcsif-peer-{os.getpid()}-{tmp_path.name}"
    peer_dir.mkdir()
    try:
        env = {**os.environ, "APPTAINER_CACHEDIR": str(peer_dir / "cache")}
        out = subprocess.run(
            [peer, "pull", "--no-https", str(peer_dir / "peer.sif"), ref],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert (peer_dir / "peer.sif").read_bytes() == sif.read_bytes()
        # and the other way: Apptainer pushes, hpcsif pulls
        peer_ref = registry_open.ref("team/from-peer:1", transport="oras")
        out = subprocess.run(
            [peer, "push", str(sif), peer_ref], capture_output=True, text=True, env=env, timeout=300
        )
        assert out.returncode == 0, out.stderr
        res = hpcsif(tmp_path, "pull", "--name", "from-peer.sif", peer_ref)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "from-peer.sif").read_bytes() == sif.read_bytes()
    finally:
        shutil.rmtree(peer_dir, ignore_errors=True)


def test_run_oras_images_through_the_cache(registry_open, busybox_image, tmp_path) -> None:
    """exec/run of ``oras://`` (as Apptainer's) downloads the SIF into the cache once, as an oras
    entry; ``--disable-cache`` downloads it aside. It failed: "transport 'oras' cannot be converted"."""
    sif = tmp_path / "bb.sif"
    assert hpcsif(tmp_path, "build", str(sif), f"oci:{busybox_image.layout}:latest").returncode == 0
    ref = registry_open.ref("team/runnable:1", transport="oras")
    assert hpcsif(tmp_path, "push", str(sif), ref).returncode == 0
    hello = busybox_image.files["etc/hello.txt"].decode()
    for flags, said in (
        ([], "Downloading oras image"),
        ([], "Using cached SIF image"),
        (["--disable-cache"], "Downloading oras image"),
    ):
        res = hpcsif(tmp_path, "exec", *flags, ref, "cat", "/etc/hello.txt")
        assert res.returncode == 0 and res.stdout == hello, res.stderr
        assert res.stderr == f"INFO:    {said}\n"
    listing = hpcsif(tmp_path, "cache", "list", "-T", "oras").stdout
    assert listing.startswith(f"There are 1 container file(s) using {sif.stat().st_size / 2**20:.2f} MiB")
    res = hpcsif(tmp_path, "run", registry_open.ref("team/absent:1", transport="oras"))
    assert res.returncode == 255 and res.stderr.endswith("team/absent:1: manifest unknown\n"), res.stderr


def test_run_http_images_through_the_cache(http_files, busybox_image, tmp_path) -> None:
    """exec of an ``http(s)://`` SIF (as Apptainer's): downloaded once into the cache and used
    again until the server's file changes; a page that is no SIF fails in one line, cached nowhere."""
    sif = http_files.root / "served.sif"
    assert hpcsif(tmp_path, "build", str(sif), f"oci:{busybox_image.layout}:latest").returncode == 0
    hello = busybox_image.files["etc/hello.txt"].decode()
    url = f"{http_files.url}/served.sif"
    for said in ("Downloading network image", "Using cached SIF image"):
        res = hpcsif(tmp_path, "exec", url, "cat", "/etc/hello.txt")
        assert res.returncode == 0 and res.stdout == hello, res.stderr
        assert res.stderr == f"INFO:    {said}\n"
    asking = _env(tmp_path, HPCSIF_TAG_TTL="0")  # each start asks the server (HEAD) again
    for said in ("Using cached SIF image", "Downloading network image"):
        res = hpcsif(tmp_path, "exec", url, "true", env=asking)
        assert res.returncode == 0 and res.stderr == f"INFO:    {said}\n", res.stderr
        os.utime(sif, (1, 1))  # the server's Last-Modified changes: fetched again
    (http_files.root / "page.html").write_text("<html></html>")
    res = hpcsif(tmp_path, "run", f"{http_files.url}/page.html")
    assert res.returncode == 255 and res.stderr.endswith("/page.html: not a SIF image\n"), res.stderr
    listing = hpcsif(tmp_path, "cache", "list", "-T", "net").stdout
    assert listing.startswith("There are 2 container file(s)"), listing


def test_build_from_oras_and_https_sifs(registry_open, http_files, busybox_image, tmp_path) -> None:
    """``build OUT oras://…`` and ``build OUT https://…/x.sif`` repack the SIF (or unpack it with
    ``--sandbox``), as Apptainer's build does; they were refused ("use hpcsif pull")."""
    sif = tmp_path / "bb.sif"
    assert hpcsif(tmp_path, "build", str(sif), f"oci:{busybox_image.layout}:latest").returncode == 0
    ref = registry_open.ref("team/buildable:1", transport="oras")
    assert hpcsif(tmp_path, "push", str(sif), ref).returncode == 0
    shutil.copy(sif, http_files.root / "bb.sif")
    hello = busybox_image.files["etc/hello.txt"].decode()
    for n, source in enumerate([ref, f"{http_files.url}/bb.sif"]):
        out = tmp_path / f"out{n}.sif"
        res = hpcsif(tmp_path, "build", str(out), source)
        assert res.returncode == 0, res.stderr
        assert hpcsif(tmp_path, "exec", str(out), "cat", "/etc/hello.txt").stdout == hello
        box = tmp_path / f"box{n}"
        assert hpcsif(tmp_path, "build", "--sandbox", str(box), source).returncode == 0
        assert (box / "etc/hello.txt").read_text() == hello
    (http_files.root / "page.html").write_text("<html>not a SIF</html>")
    res = hpcsif(tmp_path, "build", str(tmp_path / "bad.sif"), f"{http_files.url}/page.html")
    assert res.returncode == 255 and error_lines(res.stderr) == [
        f"FATAL:   {http_files.url}/page.html: not a SIF image"
    ], res.stderr
    assert not (tmp_path / "bad.sif").exists()


def test_pull_http_and_file_urls(http_files, tmp_path) -> None:
    (http_files.root / "alpine-oci-archive.tar").write_bytes(b"archive bytes " * 1000)
    res = hpcsif(tmp_path, "pull", f"{http_files.url}/alpine-oci-archive.tar")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "alpine-oci-archive.tar").read_bytes() == b"archive bytes " * 1000
    res = hpcsif(tmp_path, "pull", "--name", "copy.tar", f"file://{http_files.root}/alpine-oci-archive.tar")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "copy.tar").read_bytes() == b"archive bytes " * 1000
    res = hpcsif(tmp_path, "pull", f"{http_files.url}/missing.tar")
    assert res.returncode != 0 and "not found" in res.stderr
    assert not (tmp_path / "missing.tar").exists()


def test_pull_http_names_the_file_after_the_url_path(http_files, tmp_path) -> None:
    """Not after the host (``https://host/`` gave a file called ``host``), nor the query or fragment."""
    (http_files.root / "index.html").write_bytes(b"<html>index</html>")
    (http_files.root / "named.sif").write_bytes(b"sif bytes")
    assert hpcsif(tmp_path, "pull", f"{http_files.url}/").returncode == 0
    assert hpcsif(tmp_path, "pull", f"{http_files.url}/named.sif?v=2#top").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download", "named.sif"]


def test_docker_archive_of_an_oci_archive_as_apptainer_reads_it(busybox_image, tmp_path) -> None:
    """``podman save`` writes OCI archives by default; Apptainer's ``docker-archive:`` reads them too."""
    archive = tmp_path / "saved.tar"
    layout = busybox_image.layout
    subprocess.run(["tar", "-cf", str(archive), "-C", str(layout), *sorted(os.listdir(layout))], check=True)
    res = hpcsif(tmp_path, "pull", "--disable-cache", f"docker-archive:{archive}")
    assert res.returncode == 0, res.stderr
    out = hpcsif(tmp_path, "exec", "saved.tar_latest.sif", "cat", "/etc/hello.txt")
    assert out.returncode == 0 and out.stdout == busybox_image.files["etc/hello.txt"].decode(), out.stderr


def test_pull_sftp_url_checks_the_host_key(sshd_server, tmp_path) -> None:
    src = sshd_server.workdir / "remote-file.tar"
    src.write_bytes(b"over ssh " * 500)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(sshd_server.key_filename, home / ".ssh" / "id_ed25519")
    host = sshd_server.hosts[0]
    url = f"sftp://root@{host}:{sshd_server.port}{src}"
    res = hpcsif(tmp_path, "pull", "--name", "unknown.tar", url)
    assert res.returncode != 0 and "is not in ~/.ssh/known_hosts" in res.stderr
    assert not (tmp_path / "unknown.tar").exists()
    sshd_server.known_hosts_for([host], home / ".ssh" / "known_hosts")
    res = hpcsif(tmp_path, "pull", url)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "remote-file.tar").read_bytes() == b"over ssh " * 500
