"""Real registries on loopback for the tests: Debian's ``docker-registry`` (distribution 2.8).

Three flavours, each a session-scoped fixture:

* ``registry_open``: no authentication;
* ``registry_basic``: htpasswd Basic auth (``htpasswd -Bbn``);
* ``registry_token``: token auth, with :class:`TokenServer` (written here) issuing JWTs signed
  with a test RSA key whose self-signed certificate is the registry's ``rootcertbundle``.
  Anonymous clients get ``pull`` on repositories under ``public/``; the test user gets
  ``pull,push`` everywhere, asking with its password (``GET``, Basic auth) or with the OAuth2
  refresh token :data:`IDENTITY_TOKEN` (``POST``, ``grant_type=refresh_token``), the
  ``identitytoken`` that ``docker login`` saves for such registries.

Images are pushed with ``skopeo copy`` (:meth:`Registry.push`).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

USER = "hpcuser"
PASSWORD = "s3cret-Pa55-word-xyz"  # distinctive, so tests can grep for leaks
SERVICE = "hpcsif-test-registry"
IDENTITY_TOKEN = "hpcsif-refresh-T0ken-4f9c2e71"  # distinctive, so tests can grep for leaks
ISSUER = "hpcsif-test-issuer"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers with any HTTP status (a 401 counts as up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {timeout} s")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A minimal Docker token server: ``GET /token?service=…&scope=…`` -> ``{"token": JWT}``, and
    the OAuth2 form ``POST /token`` (``grant_type=refresh_token``) -> ``{"access_token": JWT}``."""

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        expires_in: int = 300,
        refresh_tokens: dict[str, str] | None = None,
    ) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = users
        self.refresh_tokens = refresh_tokens or {}  # OAuth2 refresh token -> user
        self.expires_in = expires_in
        self.requests: list[dict[str, object]] = []  # one record per token request, for assertions
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hpcsif test token signer")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.cert_path = workdir / "token-signer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> TokenServer:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def sign(self, claims: dict[str, object]) -> str:
        """An RS256 JWT with the signer certificate in ``x5c``."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._cert_der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"

    def grant(self, user: str | None, scopes: list[str]) -> list[dict[str, object]]:
        """The access entries a user (None: anonymous) gets for the requested scopes."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            allowed = {"pull", "push"} if user else ({"pull"} if name.startswith("public/") else set())
            granted = [a for a in actions.split(",") if a in allowed]
            if granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        return access

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if server.users.get(u) != p:
                        self.send_error(401, "bad credentials")
                        return
                    user = u
                scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
                server.requests.append({"user": user, "scopes": scopes, "service": query.get("service")})
                self.answer(user, scopes, "token")

            def do_POST(self) -> None:
                """OAuth2: a refresh token (Docker's identity token) for an access token."""
                # the fields in the form, or (containers/image's scope and service) in the query
                query = urllib.parse.urlsplit(self.path).query
                form = urllib.parse.parse_qs(f"{query}&{self.body().decode()}", keep_blank_values=True)
                field = {k: v[-1] for k, v in form.items()}
                scopes = [s for value in form.get("scope", []) for s in value.split(" ")]
                user = server.refresh_tokens.get(field.get("refresh_token", ""))
                server.requests.append(
                    {
                        "user": user,
                        "scopes": scopes,
                        "service": form.get("service"),
                        "grant_type": field.get("grant_type"),
                        "client_id": field.get("client_id"),
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                if field.get("grant_type") != "refresh_token" or not field.get("client_id"):
                    self.send_error(400, "unsupported_grant_type")
                    return
                if user is None:
                    self.send_error(401, "invalid_grant")
                    return
                self.answer(user, scopes, "access_token")

            def body(self) -> bytes:
                """The request body, sized or chunked (Go sends a form of unknown length chunked)."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()  # the empty line after the last chunk
                return data

            def answer(self, user: str | None, scopes: list[str], name: str) -> None:
                """A signed token for ``user`` and ``scopes``, in the field ``name``."""
                now = int(time.time())
                claims = {
                    "iss": ISSUER,
                    "sub": user or "",
                    "aud": SERVICE,
                    "exp": now + server.expires_in,
                    "nbf": now - 10,
                    "iat": now,
                    "jti": uuid.uuid4().hex,
                    "access": server.grant(user, scopes),
                }
                issued = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                token = server.sign(claims)
                body = json.dumps({name: token, "expires_in": server.expires_in, "issued_at": issued})
                body = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


@dataclass
class Registry:
    """A running ``docker-registry`` on 127.0.0.1."""

    kind: str  # open | basic | token
    port: int
    root: Path
    proc: subprocess.Popen
    username: str | None = None
    password: str | None = None
    token_server: TokenServer | None = None
    pushed: dict[str, str] = field(default_factory=dict)  # "repo:tag" -> manifest digest

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` as a registry name in references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The registry's base URL."""
        return f"http://{self.host}"

    def ref(self, repo_tag: str, transport: str = "docker") -> str:
        """``docker://127.0.0.1:PORT/repo:tag``."""
        return f"{transport}://{self.host}/{repo_tag}"

    def push(self, src: str, repo_tag: str) -> str:
        """``skopeo copy`` ``src`` (``oci:DIR:TAG``) to ``repo_tag`` here; returns the manifest digest."""
        if repo_tag in self.pushed:
            return self.pushed[repo_tag]
        digest_file = self.root / f"digest-{uuid.uuid4().hex}"
        cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--digestfile", str(digest_file)]
        if self.username:
            cmd.append(f"--dest-creds={self.username}:{self.password}")
        subprocess.run([*cmd, src, f"docker://{self.host}/{repo_tag}"], check=True, capture_output=True)
        digest = digest_file.read_text().strip()
        self.pushed[repo_tag] = digest
        return digest

    def stop(self) -> None:
        """Terminate the registry process and the token server."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.token_server:
            self.token_server.stop()


def start_registry(workdir: Path, kind: str = "open") -> Registry:
    """Start a ``docker-registry`` of ``kind`` (open, basic, token) with its data under ``workdir``."""
    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip("docker-registry is not installed (Debian package docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth: dict[str, object] = {}
    token_server = None
    username = password = None
    if kind == "basic":
        if shutil.which("htpasswd") is None:
            pytest.skip("htpasswd is not installed (Debian package apache2-utils)")
        line = subprocess.run(
            ["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True
        ).stdout.strip()
        (workdir / "htpasswd").write_text(line + "\n")
        auth = {"htpasswd": {"realm": "hpcsif-test", "path": str(workdir / "htpasswd")}}
        username, password = USER, PASSWORD
    elif kind == "token":
        token_server = TokenServer(workdir, {USER: PASSWORD}, refresh_tokens={IDENTITY_TOKEN: USER}).start()
        auth = {
            "token": {
                "realm": token_server.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(token_server.cert_path),
            }
        }
        username, password = USER, PASSWORD
    elif kind != "open":
        raise ValueError(f"unknown registry kind {kind!r}")
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}, "fields": {"service": "registry"}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
    }
    if auth:
        config["auth"] = auth
    # YAML is a superset of JSON, so the config needs no YAML library
    (workdir / "config.yml").write_text(json.dumps(config))
    log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - the child process keeps it
    proc = subprocess.Popen([exe, "serve", str(workdir / "config.yml")], stdout=log, stderr=log)
    log.close()
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v2/", proc=proc)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"registry failed: {(workdir / 'registry.log').read_text()[-2000:]}") from None
    return Registry(kind, port, workdir, proc, username, password, token_server)


def _registry_fixture(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp(f"registry-{kind}"), kind)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def registry_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry without authentication."""
    yield from _registry_fixture("open", tmp_path_factory)


@pytest.fixture(scope="session")
def registry_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry with htpasswd Basic auth (user :data:`USER`, password :data:`PASSWORD`)."""
    yield from _registry_fixture("basic", tmp_path_factory)


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry with Bearer token auth served by :class:`TokenServer`."""
    yield from _registry_fixture("token", tmp_path_factory)


def clean_env() -> dict[str, str]:
    """The environment without any registry credentials or hpcsif cache settings from the caller."""
    drop = ("DOCKER_USERNAME", "DOCKER_PASSWORD", "CACHEDIR", "DISABLE_CACHE")
    return {k: v for k, v in os.environ.items() if not any(k.endswith(d) for d in drop)}


def loopback_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``hpcsif ARGS`` in ``cwd``, its cache in ``cwd/cache``, plain HTTP to the loopback registry
    (*env* added to a :func:`clean_env`)."""
    import sys

    environ = {
        **clean_env(),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "HPCSIF_CACHEDIR": str(cwd / "cache"),
        "APPTAINER_NOHTTPS": "1",
        **env,
    }
    argv = [sys.executable, "-m", "hpcsif.cli.main", *args]
    return subprocess.run(argv, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)
