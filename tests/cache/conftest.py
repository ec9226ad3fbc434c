"""Fixtures for the cache tests: an isolated cache environment and child processes that use it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcsif.cache.layout import CacheRoot
from hpcsif.config import set_config
from tests.services.registry import registry_open  # noqa: F401

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


@pytest.fixture
def blocking_layout(busybox_oci_layout: Path, tmp_path: Path) -> Iterator[tuple[Path, Path, bytes]]:
    """A copy of the busybox layout whose first layer blob is a FIFO: a conversion blocks there.

    Yields (layout, fifo path, the real blob bytes); ``unblock`` by replacing the FIFO.
    """
    layout = tmp_path / "blocking"
    shutil.copytree(busybox_oci_layout, layout)
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest[7:]).read_text())
    blob = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
    data = blob.read_bytes()
    blob.unlink()
    os.mkfifo(blob)
    yield layout, blob, data


def unblock(fifo: Path, data: bytes) -> None:
    """Replace the FIFO with the real blob, atomically."""
    tmp = fifo.with_name(fifo.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, fifo)


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
