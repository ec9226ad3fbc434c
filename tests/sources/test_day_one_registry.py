"""What an Apptainer user does on day one with a private registry, through the CLI, beside
Apptainer 1.4 where it is installed: credentials saved by ``apptainer registry login``, and a
plain-HTTP registry on a non-loopback address (which needs ``--no-https``)."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import peer_apptainer
from tests.services.httpd import FileServer
from tests.services.registry import PASSWORD, USER, Registry, clean_env
from tests.services.relay import relay

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(work: Path) -> dict[str, str]:
    """A user with an empty home and a cache under ``work``."""
    env = clean_env()
    env.pop("DOCKER_CONFIG", None)
    env.update(HOME=str(work / "home"), APPTAINER_CACHEDIR=str(work / "cache"))
    return env


def hpcsif(work: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(_env(work), PYTHONPATH=str(REPO_ROOT), **extra)
    argv = [sys.executable, "-m", "hpcsif.cli.main", *args]
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=120)


def peer(work: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """The same command with Apptainer (skips the test when it is not installed)."""
    exe = peer_apptainer()
    if exe is None:
        pytest.skip("neither apptainer nor peer-apptainer is on PATH")
    env = dict(_env(work), APPTAINER_CACHEDIR=str(work / "peer-cache"), **extra)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
    return subprocess.run([exe, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """A file server of this test's own (the session's is left to the tests that share it)."""
    server = FileServer(tmp_path_factory.mktemp("files"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory under /tmp that the peer (in its chroot) sees at the same path."""
    assert str(tmp_path).startswith("/tmp/")
    (tmp_path / "home").mkdir()
    return tmp_path


def _no_secret_under(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != "docker-config.json":
            assert PASSWORD.encode() not in p.read_bytes(), f"the password was written to {p}"


# -- credentials saved by `apptainer registry login` ---------------------------------------------
def test_credentials_from_apptainer_registry_login_file(
    registry_basic: Registry, busybox_image, work
) -> None:
    """``apptainer registry login`` keeps them in ``~/.apptainer/docker-config.json``, which
    Apptainer reads for docker:// and oras://; they used to be ignored here."""
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    ref = registry_basic.ref("private/busybox:1")
    anonymous = hpcsif(work, "pull", "--name", "anon.sif", ref)
    assert anonymous.returncode == 255 and "authentication required" in anonymous.stderr
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (work / "home" / ".apptainer").mkdir()
    (work / "home" / ".apptainer" / "docker-config.json").write_text(
        json.dumps({"auths": {registry_basic.host: {"auth": auth}}})
    )
    res = hpcsif(work, "-d", "pull", "--name", "a.sif", ref)
    assert res.returncode == 0, res.stderr
    assert "/.apptainer/docker-config.json" in res.stderr  # the debug line names the file
    assert PASSWORD not in res.stderr + res.stdout
    oras = registry_basic.ref("private/busybox-sif:1", transport="oras")
    push = hpcsif(work, "push", "a.sif", oras)
    assert push.returncode == 0, push.stderr
    down = hpcsif(work, "pull", "--name", "b.sif", oras)
    assert down.returncode == 0, down.stderr
    assert (work / "b.sif").read_bytes() == (work / "a.sif").read_bytes()
    _no_secret_under(work)
    theirs = peer(work, "pull", "--no-https", "--name", "p.sif", ref)
    assert theirs.returncode == 0, theirs.stderr


def test_username_and_password_from_different_prefixes(registry_basic: Registry, busybox_image, work) -> None:
    """Apptainer reads each variable from APPTAINER_ or else SINGULARITY_: a new
    APPTAINER_DOCKER_USERNAME with an old SINGULARITY_DOCKER_PASSWORD works there (it was
    refused here as half a pair), and SINGULARITY_X differing from APPTAINER_X is warned about."""
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    ref = registry_basic.ref("private/busybox:1")
    env = {"APPTAINER_DOCKER_USERNAME": USER, "SINGULARITY_DOCKER_PASSWORD": PASSWORD}
    res = hpcsif(work, "pull", "--disable-cache", "--name", "a.sif", ref, **env)
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stderr
    env |= {"APPTAINER_DOCKER_PASSWORD": "wrong", "SINGULARITY_DOCKER_USERNAME": "old-user"}
    res = hpcsif(work, "pull", "--disable-cache", "--name", "b.sif", ref, **env)
    assert res.returncode == 255
    differ = (
        "WARNING: SINGULARITY_DOCKER_{0} and APPTAINER_DOCKER_{0} have different values, using the latter"
    )
    assert res.stderr.splitlines() == [
        differ.format("USERNAME"),
        differ.format("PASSWORD"),
        f"FATAL:   authentication failed for {registry_basic.host}/private/busybox: the registry "
        f"refused user '{USER}' from $APPTAINER_DOCKER_USERNAME/PASSWORD (check the user name and "
        "password, and that the repository exists)",
    ]
    mixed = {"APPTAINER_DOCKER_USERNAME": USER, "SINGULARITY_DOCKER_PASSWORD": PASSWORD}
    theirs = peer(work, "pull", "--no-https", "--disable-cache", "--name", "p.sif", ref, **mixed)
    assert theirs.returncode == 0, theirs.stderr


# -- a plain-HTTP registry that is not on loopback -----------------------------------------------
def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if not a loopback one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if ipaddress.ip_address(addr).is_loopback else addr


class Forwarder:
    """A TCP forwarder from ``address:<free port>`` to a port on 127.0.0.1."""

    def __init__(self, address: str, port: int) -> None:
        self.upstream = port
        self.sock = socket.create_server((address, 0))
        self.host = f"{address}:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def outward_registry(registry_open: Registry) -> Iterator[str]:
    """``ADDRESS:PORT`` of the open registry, reached on a non-loopback address of this machine."""
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    fwd = Forwarder(address, registry_open.port)
    try:
        yield fwd.host
    finally:
        fwd.close()


def test_plain_http_registry_needs_no_https_and_says_so_at_once(
    registry_open: Registry, outward_registry: str, busybox_image, work
) -> None:
    """Without ``--no-https`` the TLS handshake meets a plain-HTTP answer: that used to be retried
    five times (15 s of warnings) and end in ``[ssl: wrong_version_number]``."""
    registry_open.push(busybox_image.oci_ref, "team/busybox:1")
    ref = f"docker://{outward_registry}/team/busybox:1"
    for uri in (ref, f"oras://{outward_registry}/team/busybox-sif:1"):
        start = time.monotonic()
        res = hpcsif(work, "pull", "--name", "x.sif", uri)
        assert time.monotonic() - start < 10
        assert res.returncode == 255
        assert res.stderr.splitlines() == [
            f"FATAL:   cannot reach https://{outward_registry}/v2/: the server answered in plain HTTP, "
            "not HTTPS (use --no-https for a registry without TLS)"
        ]
        assert not (work / "x.sif").exists()
    res = hpcsif(work, "pull", "--no-https", "--name", "a.sif", ref)
    assert res.returncode == 0, res.stderr
    # Apptainer needs --no-https too (without: "server gave HTTP response to HTTPS client")
    theirs = peer(work, "pull", "--no-https", "--name", "p.sif", ref)
    assert theirs.returncode == 0, theirs.stderr


def _certificate(
    tmp_path: Path, name: str, address: str | None = None, ca: tuple[object, object] | None = None
) -> tuple[object, object]:
    """A key and certificate written to ``tmp_path/NAME.pem`` and ``NAME.key``: a CA of its own
    when ``ca`` is None, else one for ``address`` signed by ``ca`` (its key, its certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address or f"hpcsif test {name}")])
    issuer_key, issuer = (key, subject) if ca is None else (ca[0], ca[1].subject)  # type: ignore[attr-defined]
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if address:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return key, cert


class TLSProxy:
    """HTTPS on ``address:<free port>`` in front of a plain-HTTP registry (GET and HEAD)."""

    def __init__(self, address: str, upstream: str, certdir: Path) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.wfile.write(relay(self, upstream))

            do_HEAD = do_GET

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certdir / "server.pem", certdir / "server.key")
        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.host = f"{address}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_registry_signed_by_a_site_ca_in_ssl_cert_file(
    registry_open: Registry, busybox_image, work, monkeypatch
) -> None:
    """A site's CA, given as OpenSSL and Go take it (``SSL_CERT_FILE``, or the system store), is
    trusted as Apptainer trusts it; only requests' own bundle (certifi) used to be."""
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    registry_open.push(busybox_image.oci_ref, "team/busybox:1")
    ca = _certificate(work, "ca")
    _certificate(work, "server", address, ca)
    proxy = TLSProxy(address, registry_open.url, work)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    try:
        ref = f"docker://{proxy.host}/team/busybox:1"
        start = time.monotonic()
        res = hpcsif(work, "pull", "--name", "a.sif", ref)
        assert time.monotonic() - start < 10
        assert res.returncode == 255
        assert res.stderr.splitlines() == [
            f"FATAL:   cannot reach https://{proxy.host}/v2/: TLS certificate not trusted: "
            "unable to get local issuer certificate"
        ]
        trust = {"SSL_CERT_FILE": str(work / "ca.pem")}
        res = hpcsif(work, "pull", "--name", "a.sif", ref, **trust)
        assert res.returncode == 0, res.stderr
        blob = f"https://{proxy.host}/v2/team/busybox/blobs/{busybox_image.config_digest}"
        res = hpcsif(work, "pull", "--name", "config.json", blob, **trust)  # a download, not a registry
        assert res.returncode == 0, res.stderr
        assert json.loads((work / "config.json").read_text())["config"]["Env"]
        theirs = peer(work, "pull", "--name", "p.sif", ref, **trust)
        assert theirs.returncode == 0, theirs.stderr
    finally:
        proxy.close()


def test_untrusted_certificate_is_not_retried(tmp_path: Path) -> None:
    """A registry whose certificate no CA vouches for fails at once, naming why."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from hpcsif.errors import NetworkError
    from hpcsif.sources.distribution import RegistryClient

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = time.time()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(now - 3600, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.UTC))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = socket.create_server(("127.0.0.1", 0))
    handshakes: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            handshakes.append(1)
            try:
                ctx.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        port = server.getsockname()[1]
        client = RegistryClient(f"127.0.0.1:{port}", endpoint=f"https://127.0.0.1:{port}", backoff=1.0)
        start = time.monotonic()
        with pytest.raises(NetworkError, match="TLS certificate not trusted: self-signed certificate"):
            client.head_manifest("team/app", "1")
        assert time.monotonic() - start < 5 and len(handshakes) == 1
    finally:
        server.close()


def test_loopback_registry_named_in_capitals_is_plain_http(
    registry_open: Registry, busybox_image, work
) -> None:
    """Host names have no case: ``LOCALHOST:PORT`` is loopback too (it used to be tried over
    https, which the plain-HTTP registry cannot answer; Apptainer pulls it with --no-https)."""
    registry_open.push(busybox_image.oci_ref, "solo:V1.0-RC_1")
    ref = f"docker://LOCALHOST:{registry_open.port}/solo:V1.0-RC_1"
    res = hpcsif(work, "pull", ref)
    assert res.returncode == 0, res.stderr
    assert (work / "solo_V1.0-RC_1.sif").is_file()


def _tiny_sif(path: Path, text: bytes) -> Path:
    from hpcsif.sif.format import DataType
    from hpcsif.sif.writer import ObjectSpec, write_sif

    return write_sif(path, [ObjectSpec(DataType.DEFFILE, data=text)])


def test_push_to_a_digest_reference(registry_open: Registry, work) -> None:
    """``push SIF oras://…@sha256:D`` stores it under D when D is its manifest's digest; another
    SIF is refused by the registry, in one line that spells the reference with ``@``."""
    first = _tiny_sif(work / "first.sif", b"bootstrap: scratch\n")
    tag = registry_open.ref("team/pinned:1", transport="oras")
    res = hpcsif(work, "push", str(first), tag)
    assert res.returncode == 0, res.stderr
    digest = res.stderr.split("(", 1)[1].split(")", 1)[0]
    pinned = registry_open.ref(f"team/pinned@{digest}", transport="oras")
    assert hpcsif(work, "push", str(first), pinned).returncode == 0
    other = _tiny_sif(work / "other.sif", b"bootstrap: scratch\n# another\n")
    res = hpcsif(work, "push", str(other), pinned)
    assert res.returncode == 255
    assert res.stderr.splitlines() == [
        f"FATAL:   {registry_open.host}/team/pinned@{digest}: manifest upload failed: "
        "HTTP 400 (DIGEST_INVALID: provided digest did not match uploaded content)"
    ]
    res = hpcsif(work, "pull", "--name", "back.sif", pinned)
    assert res.returncode == 0, res.stderr
    assert (work / "back.sif").read_bytes() == first.read_bytes()


# -- auth files that are not what they should be -------------------------------------------------
@pytest.mark.parametrize(
    ("content", "fatal"),
    [
        ("{bad", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("[1]", "not a JSON object"),
        ('{"auths": [1]}', '"auths" is not an object'),
        (None, "is a directory"),
    ],
)
def test_unreadable_authfile_is_one_fatal_line(registry_basic: Registry, work, content, fatal) -> None:
    """As Apptainer: a file the user named that is no auth file ends the pull (a list used to be
    an internal error); nothing is fetched."""
    path = work / "auth.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    res = hpcsif(work, "pull", "--authfile", str(path), registry_basic.ref("private/busybox:1"))
    assert res.returncode == 255
    assert res.stderr.splitlines() == [f"FATAL:   cannot read auth file {path}: {fatal}"]
    if content == "{bad":
        theirs = peer(
            work, "pull", "--no-https", "--authfile", str(path), registry_basic.ref("private/busybox:1")
        )
        assert theirs.returncode == 255 and "unmarshaling JSON" in theirs.stderr, theirs.stderr


@pytest.mark.parametrize(
    "entry",
    [{"auth": 5}, {"auth": base64.b64encode(b"no-colon").decode()}, {"username": 5, "password": 1}, "text"],
)
def test_malformed_entry_is_skipped_with_one_warning(
    registry_basic: Registry, busybox_image, work, entry
) -> None:
    """A number where base64 belongs used to be an internal error; each warning is said once,
    though credentials are looked up for the resolve and again for the fetch."""
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    path = work / "auth.json"
    path.write_text(json.dumps({"auths": {registry_basic.host: entry}}))
    res = hpcsif(work, "pull", "--authfile", str(path), registry_basic.ref("private/busybox:1"))
    assert res.returncode == 255
    lines = res.stderr.splitlines()
    anonymous = (
        f"WARNING: auth file {path} has no credentials for {registry_basic.host}/private/busybox; "
        "proceeding with anonymous access"
    )
    assert lines.count(anonymous) == 1, lines
    assert lines[-1].startswith(f"FATAL:   authentication required for {registry_basic.host}/private/busybox")
    assert len(lines) == (3 if isinstance(entry, dict) and "auth" in entry else 2), lines
    if len(lines) == 3:
        assert lines[0] == f"WARNING: ignoring malformed auth entry for {registry_basic.host} in {path}"


# -- a password in a URL ---------------------------------------------------------------------------
def test_password_in_a_url_is_never_shown_or_written(
    registry_open: Registry, files: FileServer, busybox_image, work
) -> None:
    """``https://user:PASSWORD@host/image.sif`` used to be printed in -v/-d lines and errors, and
    written to the cache's records (meta.json, journal, tag records, lock holders)."""
    registry_open.push(busybox_image.oci_ref, "team/busybox:1")
    assert hpcsif(work, "pull", "--name", "bb.sif", registry_open.ref("team/busybox:1")).returncode == 0
    (files.root / "bb.sif").write_bytes((work / "bb.sif").read_bytes())
    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{files.port}"
    shown = f"http://{USER}:***@127.0.0.1:{files.port}"
    runs = [
        hpcsif(work, "-d", "pull", "--name", "a.sif", f"{url}/bb.sif"),
        hpcsif(work, "-d", "exec", f"{url}/bb.sif", "cat", "/etc/hello.txt"),
        hpcsif(work, "-d", "pull", "--sandbox", "--name", "sb", f"{url}/bb.sif"),
        hpcsif(work, "cache", "list", "-v"),
    ]
    for res in runs:
        assert res.returncode == 0, res.stderr
        assert PASSWORD not in res.stdout + res.stderr
    assert f"{shown}/bb.sif" in runs[0].stderr and f"{shown}/bb.sif" in runs[3].stdout
    assert runs[1].stdout == "hello from the etc layer\n"
    missing = hpcsif(work, "pull", f"{url}/missing.sif")
    assert missing.returncode == 255
    assert missing.stderr.splitlines()[-1] == f"FATAL:   {shown}/missing.sif: not found (HTTP 404)"
    _no_secret_under(work)


# -- the cache ---------------------------------------------------------------------------------------
def test_a_new_cache_is_private_as_apptainers(registry_basic: Registry, busybox_image, work) -> None:
    """A private image's layers and SIF land in the cache: a cache directory created by a pull
    is 0700 (it was 0755, readable by every user of the node); an existing one keeps its mode."""
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    creds = {"APPTAINER_DOCKER_USERNAME": USER, "APPTAINER_DOCKER_PASSWORD": PASSWORD}
    ref = registry_basic.ref("private/busybox:1")
    assert hpcsif(work, "pull", "--name", "a.sif", ref, **creds).returncode == 0
    assert (work / "cache").stat().st_mode & 0o777 == 0o700
    (work / "shared").mkdir(mode=0o755)
    res = hpcsif(work, "pull", "--name", "b.sif", ref, APPTAINER_CACHEDIR=str(work / "shared"), **creds)
    assert res.returncode == 0, res.stderr
    assert (work / "shared").stat().st_mode & 0o777 == 0o755
    theirs = peer(work, "pull", "--no-https", "--name", "p.sif", ref, **creds)
    assert theirs.returncode == 0, theirs.stderr
    assert (work / "peer-cache").stat().st_mode & 0o777 == 0o700


def test_a_site_proxy_is_not_used_for_this_machine(registry_open: Registry, busybox_image, work) -> None:
    """Go's clients (Apptainer's) never send loopback requests through ``http_proxy``: a pull from
    a registry on this machine used to fail at the site's proxy; a proxy that fails is named."""
    registry_open.push(busybox_image.oci_ref, "team/busybox:1")
    proxy = {
        name: "http://127.0.0.1:1" for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")
    } | {"no_proxy": "", "NO_PROXY": ""}
    ref = registry_open.ref("team/busybox:1")
    res = hpcsif(work, "pull", "--disable-cache", "--name", "a.sif", ref, **proxy)
    assert res.returncode == 0, res.stderr
    theirs = peer(work, "pull", "--no-https", "--disable-cache", "--name", "p.sif", ref, **proxy)
    assert theirs.returncode == 0, theirs.stderr
    address = _outward_address()
    if address is not None:  # not this machine's loopback: through the proxy, which refuses
        res = hpcsif(
            work, "pull", "--no-https", "--name", "b.sif", f"docker://{address}:1/team/app:1", **proxy
        )
        assert res.returncode == 255
        assert res.stderr.splitlines() == [
            f"FATAL:   cannot reach http://{address}:1/v2/: via the proxy 127.0.0.1:1 ($https_proxy, "
            "$http_proxy, $no_proxy): connection refused"
        ]


@pytest.mark.parametrize(
    ("key", "found"),
    [
        ("{host}/private", True),  # podman login HOST/NAMESPACE
        ("{host}/private/busybox", True),
        ("http://{host}/v2/", True),  # a scheme and a path, as old Docker clients wrote them
        ("{host}/other", False),
    ],
)
def test_auth_file_entries_per_namespace(registry_basic: Registry, busybox_image, work, key, found) -> None:
    """containers/image (Apptainer's docker://, Podman, skopeo) looks up an auth file by the
    repository and its namespaces before the host, and reads keys with a scheme and a path;
    only the host and four fixed spellings were read here."""
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    ref = registry_basic.ref("private/busybox:1")
    good = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    bad = base64.b64encode(f"{USER}:wrong".encode()).decode()
    auths = {key.format(host=registry_basic.host): {"auth": good}}
    namespaced = key.startswith("{host}/")
    if namespaced and found:  # the most specific entry wins over the host's
        auths[registry_basic.host] = {"auth": bad}
    (work / "auth.json").write_text(json.dumps({"auths": auths}))
    res = hpcsif(work, "pull", "--authfile", "auth.json", "--disable-cache", "--name", "a.sif", ref)
    assert res.returncode == (0 if found else 255), res.stderr
    if not found:
        assert "authentication required" in res.stderr.splitlines()[-1]
    elif key == "{host}/private":  # Apptainer, with the namespace's entry alone (with both it mixes them up)
        del auths[registry_basic.host]
        (work / "auth.json").write_text(json.dumps({"auths": auths}))
        theirs = peer(work, "pull", "--no-https", "--authfile", "auth.json", "--name", "p.sif", ref)
        assert theirs.returncode == 0, theirs.stderr


def test_a_registry_that_never_answers_fails_after_one_timeout(work) -> None:
    """A port whose connections are never accepted (a full backlog: what a firewall dropping
    packets looks like) or never answered fails after one timeout, not after six timeouts and
    their backoff (more than six minutes with the default 60 s; Apptainer gives up after two)."""
    (work / "hpcsif.toml").write_text("[registry]\ntimeout = 2\n")
    with socket.create_server(("127.0.0.1", 0), backlog=0) as silent:
        port = silent.getsockname()[1]
        queued = []  # fill the accept queue: the kernel then drops further connection attempts
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            queued.append(s)
        start = time.monotonic()
        res = hpcsif(work, "-c", "hpcsif.toml", "pull", f"docker://127.0.0.1:{port}/team/app:1")
        elapsed = time.monotonic() - start
        for s in queued:
            s.close()
    assert res.returncode == 255
    assert res.stderr.splitlines() == [f"FATAL:   cannot reach http://127.0.0.1:{port}/v2/: timed out"]
    assert elapsed < 6


@pytest.mark.parametrize(
    ("scheme", "port", "fatal"),
    [
        ("http", None, "connection refused"),
        ("https", "files", "the server answered in plain HTTP, not HTTPS (use an http:// URL for a "
         "server without TLS)"),
    ],
)  # fmt: skip
def test_a_download_that_cannot_succeed_is_not_retried(request, work, scheme, port, fatal) -> None:
    """A refused connection or a plain-HTTP answer to https:// used to be retried three times,
    each with a WARNING line; Apptainer says one line."""
    port = request.getfixturevalue(port).port if port else _closed_port()
    url = f"{scheme}://127.0.0.1:{port}/image.sif"
    res = hpcsif(work, "pull", url)
    assert res.returncode == 255
    assert [line for line in res.stderr.splitlines() if not line.startswith("INFO:")] == [
        f"FATAL:   {url}: download failed: {fatal}"
    ]


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("uri", "fatal"),
    [
        ("docker://[::1/team/app:1", "invalid registry '[::1' in 'docker://[::1/team/app:1' (expected HOST"),
        ("docker://host:port/team/app:1", "invalid registry 'host:port'"),
        ("oras://127.0.0.1:99999/team/app:1", "invalid registry '127.0.0.1:99999'"),
        ("docker://:5000/team/app:1", "invalid registry ':5000'"),
        ("docker://reg.example/team/app@md5:" + "0" * 32, "invalid digest 'md5:" + "0" * 32 + "'"),
        ("docker://reg.example/" + "a/" * 130 + "app:1", "the name is longer than 255 characters"),
        ("https://[::1/image.sif", "invalid URL 'https://[::1/image.sif': no host name"),
        ("http:///image.sif", "invalid URL 'http:///image.sif': no host name"),
    ],
)  # fmt: skip
def test_malformed_registry_names_are_one_reference_error(work, uri: str, fatal: str) -> None:
    """As Apptainer ("invalid reference format"), refused before any request: an unclosed IPv6
    bracket used to be an internal error, a bad port a 'Failed to parse: http://…' from urllib3."""
    res = hpcsif(work, "pull", uri)
    assert res.returncode == 255
    assert len(res.stderr.splitlines()) == 1 and fatal in res.stderr, res.stderr
    if uri.startswith("docker://[::1"):
        theirs = peer(work, "pull", uri)
        assert theirs.returncode == 255 and "invalid reference format" in theirs.stderr, theirs.stderr


def test_a_loopback_registry_that_speaks_only_https(registry_open: Registry, busybox_image, work) -> None:
    """A registry on this machine is spoken to in plain HTTP; one serving TLS only answers that
    with a 400 asking for HTTPS, and is then spoken to in HTTPS (it was a FATAL 'HTTP 400 Bad
    Request'; Apptainer uses HTTPS unless --no-https)."""
    import shutil

    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip("docker-registry is not installed")
    registry_open.push(busybox_image.oci_ref, "team/busybox:1")
    ca = _certificate(work, "ca")
    _certificate(work, "server", "127.0.0.1", ca)
    port = _closed_port()
    config = {  # the open registry's storage, served over TLS
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(registry_open.root / "data")}},
        "http": {
            "addr": f"127.0.0.1:{port}",
            "tls": {"certificate": str(work / "server.pem"), "key": str(work / "server.key")},
        },
    }
    (work / "tls.yml").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [exe, "serve", str(work / "tls.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, "the TLS registry did not start"
            time.sleep(0.05)
        trust = {"SSL_CERT_FILE": str(work / "ca.pem"), "REQUESTS_CA_BUNDLE": str(work / "ca.pem")}
        ref = f"docker://127.0.0.1:{port}/team/busybox:1"
        res = hpcsif(work, "-v", "pull", "--name", "a.sif", ref, **trust)
        assert res.returncode == 0, res.stderr
        assert f"VERBOSE: registry 127.0.0.1:{port} asks for HTTPS; using it" in res.stderr
        theirs = peer(work, "pull", "--name", "p.sif", ref, **trust)
        assert theirs.returncode == 0, theirs.stderr
    finally:
        proc.terminate()
        proc.wait(10)


HELPER = """#!/bin/sh
# a Docker credential helper: `get` reads a server on stdin, answers from the store beside it
[ "$1" = get ] || exit 1
read -r server
echo "$server" >> "$(dirname "$0")/asked"
grep -q "^$server " "$(dirname "$0")/store" || { echo "credentials not found in native keychain"; exit 1; }
grep "^$server " "$(dirname "$0")/store" | cut -d' ' -f2-
"""


@pytest.mark.parametrize("how", ["credHelpers", "credsStore"])
def test_docker_credential_helpers(registry_basic: Registry, busybox_image, work, how: str) -> None:
    """``docker login`` with a credential store leaves ``credsStore``/``credHelpers`` in
    config.json and the password with a ``docker-credential-NAME`` program, which Apptainer
    (containers/image) asks; it was not asked here."""
    registry_basic.push(busybox_image.oci_ref, "private/busybox:1")
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker-credential-hpcsiftest").write_text(HELPER)
    (bin_dir / "docker-credential-hpcsiftest").chmod(0o755)
    answer = {"ServerURL": registry_basic.host, "Username": USER, "Secret": PASSWORD}
    (bin_dir / "store").write_text(f"{registry_basic.host} {json.dumps(answer)}\n")
    config = {"credHelpers": {registry_basic.host: "hpcsiftest"}} if how == "credHelpers" else {}
    config |= {"credsStore": "hpcsiftest"} if how == "credsStore" else {}
    (work / "home" / ".docker").mkdir()
    (work / "home" / ".docker" / "config.json").write_text(json.dumps(config))
    path = f"{bin_dir}:{os.environ['PATH']}"
    res = hpcsif(
        work,
        "-d",
        "pull",
        "--disable-cache",
        "--name",
        "a.sif",
        registry_basic.ref("private/busybox:1"),
        PATH=path,
    )
    assert res.returncode == 0, res.stderr
    assert "(docker-credential-hpcsiftest)" in res.stderr and PASSWORD not in res.stderr
    assert (bin_dir / "asked").read_text() == f"{registry_basic.host}\n"
    other = hpcsif(
        work,
        "pull",
        "--name",
        "b.sif",
        f"docker://localhost:{registry_basic.port}/private/busybox:1",
        PATH=path,
    )
    assert other.returncode == 255 and "authentication required" in other.stderr  # nothing stored for it
    _no_secret_under(work / "cache")
