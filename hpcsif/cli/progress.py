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
    finished: list[str | None] = [None]  # the stage whose last line was written

    def update(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        complete = bool(total) and done >= total
        if complete:
            # callers keep reporting after the end (one call per tar member once the compressed
            # bytes are all read): the bar's final line is written once
            if finished[0] == stage:
                return
            finished[0] = stage
        else:
            finished[0] = None
            if now - last[0] < 0.1:
                return
        last[0] = now
        width = 30
        frac = min(1.0, done / total) if total else 0.0
        bar = "=" * int(frac * width)
        end = "\n" if complete else ""
        sys.stderr.write(f"\r{stage:<8} [{bar:<{width}}] {_human(done)} / {_human(total)}\x1b[K{end}")
        sys.stderr.flush()

    return update
