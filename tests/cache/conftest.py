"""Fixtures for the cache tests: an isolated cache environment and child processes that use it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hpcsif.cache.layout import CacheRoot
from hpcsif.config import set_config
from tests.services.registry import registry_open  # noqa: F401
from tests.services.relay import relay

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CacheEnv:
    """A private cache root plus a config file that every child process reads too."""

    base: Path
    cache: Path
    config: Path

    @property
    def root(self) -> CacheRoot:
        """The user cache root."""
        return CacheRoot(self.cache)

    def configure(self, tables: dict[str, dict[str, object]] | None = None, **cache: object) -> None:
        """Write ``[cache]`` settings (and other tables) to the config file and reload it here."""

        def toml(v: object) -> str:
            return json.dumps(v) if isinstance(v, str | bool) else str(v)

        lines = []
        for name, table in {"cache": cache, **(tables or {})}.items():
            lines += [f"[{name}]", *(f"{k} = {toml(v)}" for k, v in table.items())]
        self.config.write_text("\n".join(lines) + "\n")
        set_config(None)

    def conversions(self, root: Path | None = None) -> list[dict]:
        """The conversion records in a root's journal (the user cache by default)."""
        return [r for r in CacheRoot(root or self.cache).read_journal() if r["event"] == "convert"]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a child process."""
        return {**os.environ, "PYTHONPATH": str(ROOT), **extra}

    def spawn(self, code: str, *args: str, **env: str) -> subprocess.Popen:
        """Start ``python -c CODE ARGS…`` with this cache's environment."""
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            env=self.env(**env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CacheEnv]:
    """A fresh user cache, no system cache, no shared tier, online."""
    env = CacheEnv(tmp_path, tmp_path / "cache", tmp_path / "hpcsif.toml")
    env.config.write_text("")
    monkeypatch.setenv("HPCSIF_CACHEDIR", str(env.cache))
    monkeypatch.setenv("HPCSIF_CONFIG", str(env.config))
    monkeypatch.setenv("HPCSIF_SYSTEM_CACHEDIR", str(tmp_path / "no-system-cache"))
    for var in ("HPCSIF_SHARED_CACHEDIR", "HPCSIF_OFFLINE", "HPCSIF_LOCK_MODE", "HPCSIF_TAG_TTL"):
        monkeypatch.delenv(var, raising=False)
    set_config(None)
    yield env
    set_config(None)


@pytest.fixture
def busybox_ref(busybox_oci_layout: Path) -> str:
    """``oci://`` reference to the busybox test layout."""
    return f"oci://{busybox_oci_layout}:latest"


class Gate:
    """A registry proxy that holds back the body of one blob until :meth:`open` is called: a
    conversion from it stays under way, inside its work directory, for as long as a test likes.
    (A FIFO standing in for a layer blob did this once; layers are now refused unless regular.)"""

    def __init__(self, upstream: str, digest: str) -> None:
        gate = self
        self.opened = threading.Event()
        self.waiting = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.endswith(f"/blobs/{digest}"):
                    gate.waiting.set()
                    gate.opened.wait(300)
                body = relay(self, upstream)
                with contextlib.suppress(OSError):  # the client was stopped meanwhile
                    self.wfile.write(body)

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def open(self) -> None:
        """Let the held blob through (now and from now on)."""
        self.opened.set()

    def close(self) -> None:
        self.open()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def blocking_ref(busybox_image, registry_open) -> Iterator[tuple[str, Gate]]:  # noqa: F811
    """``docker://`` reference to the busybox image behind a :class:`Gate` on its first layer:
    a conversion of it blocks downloading that layer until ``gate.open()``."""
    registry_open.push(busybox_image.oci_ref, "cache/blocking:1")
    gate = Gate(registry_open.url, busybox_image.layer_digests[0])
    try:
        yield f"docker://{gate.host}/cache/blocking:1", gate
    finally:
        gate.close()


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def reap(*procs: subprocess.Popen) -> None:
    """Kill and reap test child processes (whether or not they already ended)."""
    for proc in procs:
        proc.kill()
        proc.wait()
