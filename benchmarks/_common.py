"""Helpers shared by the benchmark scripts: timing commands with their peak memory, tables."""

from __future__ import annotations

import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_IMAGES = Path(os.environ.get("HPCSIF_BENCH_IMAGES", "/work/bench-images"))
RESULTS = Path(__file__).resolve().parent / "results"


def compile_package() -> None:
    """Write fresh bytecode for the package, so it is measured as an install runs it.

    pip compiles at install time; a checkout under PYTHONDONTWRITEBYTECODE would otherwise
    compile every module edited since its .pyc was written anew at each start.
    """
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "hpcsif", quiet=1)


@dataclass
class Run:
    """One measured command: wall seconds and the largest resident set of any process in it."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    stderr: str


def measure(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> Run:
    """Run ``cmd`` in a fresh child and report wall time and peak RSS over its process tree.

    A small Python shim runs the command so that ``RUSAGE_CHILDREN`` covers exactly that
    command's descendants (the maximum over every process that ran in it).
    """
    shim = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.monotonic()\n"
        "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
        "dt = time.monotonic() - t\n"
        "print(json.dumps([dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode,"
        " p.stderr.decode(errors='replace')[-2000:]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", shim, *cmd], capture_output=True, text=True, env=env, cwd=cwd, check=True
    ).stdout
    seconds, rss_kb, rc, err = json.loads(out)
    return Run(seconds, rss_kb / 1024, rc, err)


def median_run(cmd: list[str], repeat: int, prepare=None, **kw) -> Run:
    """The run with the median wall time of ``repeat`` runs (``prepare()`` before each)."""
    runs = []
    for _ in range(repeat):
        if prepare:
            prepare()
        r = measure(cmd, **kw)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
        runs.append(r)
    runs.sort(key=lambda r: r.seconds)
    return runs[len(runs) // 2]


def timeit(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t = time.monotonic()
        fn()
        times.append(time.monotonic() - t)
    return statistics.median(times)


def peer() -> str | None:
    """The Apptainer command to compare against, if installed."""
    return shutil.which("apptainer") or shutil.which("peer-apptainer")


def hpcsif_cmd() -> list[str]:
    """How to start the hpcsif CLI from this checkout."""
    return [sys.executable, "-m", "hpcsif.cli.main"]


def write_table(name: str, title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> Path:
    """Write ``results/<name>.md`` and echo it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *notes, ""]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    return path
