"""A one-line progress bar on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def progress_bar(enabled: bool) -> Progress | None:
    """A progress callback ``(stage, done, total)``; None unless enabled and stderr is a tty."""
    if not enabled or not sys.stderr.isatty():
        return None
    last = [0.0]

    def update(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        width = 30
        frac = min(1.0, done / total) if total else 0.0
        bar = "=" * int(frac * width)
        end = "\n" if total and done >= total else ""
        sys.stderr.write(f"\r{stage:<8} [{bar:<{width}}] {_human(done)} / {_human(total)}\x1b[K{end}")
        sys.stderr.flush()

    return update
