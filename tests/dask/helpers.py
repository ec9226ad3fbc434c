"""Helpers shared by the Dask tests and the startup benchmark."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path


def hpcsif_wrapper(bindir: Path) -> Path:
    """The ``hpcsif`` command the jobs run (this interpreter, so the jobs use this checkout)."""
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / "hpcsif"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m hpcsif.cli.main "$@"\n')
    path.chmod(0o755)
    return path


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.2 s; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
