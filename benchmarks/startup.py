#!/usr/bin/env python3
"""Container start-up time: ``hpcsif exec IMAGE true`` against raw squashfuse+bwrap and Apptainer.

Measured in one run, on one machine, with the same SIF:

* ``hpcsif exec`` with a shared mount (another container of the image is running) and cold
  (every run mounts and unmounts);
* raw ``bwrap --unshare-user --ro-bind MNT / … /bin/true`` on an existing squashfuse mount
  (the floor for a shared mount) and raw ``squashfuse`` + ``bwrap`` + ``fusermount3 -u`` (cold);
* ``python3 -c pass`` (the interpreter's own start-up, part of every hpcsif number);
* ``apptainer exec IMAGE true`` when ``apptainer`` or the ``peer-apptainer`` wrapper is installed
  (the wrapper adds a chroot hop, so its number is an upper bound for Apptainer itself).

Writes ``benchmarks/results/startup.md``. Usage: ``python3 benchmarks/startup.py [--image SIF] [-n 30]``;
without ``--image`` a busybox SIF is built with the engine tests' helpers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: CPU seconds (user+sys of the waited-for process tree) of the last :func:`timed` call, per run
LAST_CPU: list[float] = []


def timed(cmd: list[str], n: int, env: dict | None = None) -> list[float]:
    """Wall-clock seconds of *n* runs of *cmd* (output discarded; a failure aborts).

    Also records the CPU time of each run in :data:`LAST_CPU`: on a loaded machine wall time
    mostly measures the other tenants, CPU time much less so. Daemons (squashfuse, the mount
    watchdog) are not waited for, so their CPU time is not included.
    """
    import resource

    times = []
    LAST_CPU.clear()
    for _ in range(n):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        LAST_CPU.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return times


def timed_shell(script: str, n: int) -> list[float]:
    """Like :func:`timed` for a shell pipeline, minus the cost of starting the shell itself."""
    base = statistics.median(timed(["sh", "-c", "true"], n))
    times = [t - base for t in timed(["sh", "-c", script], n)]
    LAST_CPU.clear()  # includes the shell's own CPU; not comparable
    return times


MEDIANS: dict[str, float] = {}


def row(name: str, times: list[float]) -> str:
    """One table row (median, min, p90 in ms); remembers the median for the summary."""
    ms = sorted(t * 1000 for t in times)
    p90 = ms[int(len(ms) * 0.9) - 1] if len(ms) >= 10 else ms[-1]
    MEDIANS[name] = statistics.median(ms)
    cpu = f"{statistics.median(LAST_CPU) * 1000:.1f}" if len(LAST_CPU) == len(times) else "-"
    return f"| {name} | {statistics.median(ms):.1f} | {ms[0]:.1f} | {p90:.1f} | {cpu} |"


def summary() -> list[str]:
    """Ratios the issue's goals are stated in, from the medians of this run."""
    shared = MEDIANS["hpcsif exec SIF true, shared mount"]
    cold = MEDIANS["hpcsif exec SIF true, cold mount"]
    raw = MEDIANS["raw bwrap on a shared mount"]
    interp = MEDIANS["python3 -c pass (interpreter start-up)"]
    lines = [
        f"- shared mount: hpcsif {shared:.0f} ms = {shared / raw:.1f}x raw bwrap ({raw:.0f} ms); "
        f"the interpreter alone takes {interp:.0f} ms, hpcsif's own work {shared - interp:.0f} ms",
    ]
    for name, value in MEDIANS.items():
        if "exec SIF true" in name and not name.startswith("hpcsif"):
            lines.append(
                f"- {name}: {value:.0f} ms; hpcsif shared/cold = {shared / value:.2f}x / {cold / value:.2f}x"
            )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, help="SIF to start (default: build a busybox SIF)")
    ap.add_argument("-n", type=int, default=30, help="runs per variant")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/startup.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpcsif-bench-", dir="/var/tmp"))
    try:
        sif = args.image
        if sif is None:
            from tests.engine.conftest import build_rootfs, make_sif

            build_rootfs(work / "root")
            sif = make_sif(work / "root", work / "busybox.sif")
        sif = sif.resolve()
        from hpcsif.engine.bwrap import squashfs_offset

        offset = squashfs_offset(sif)
        # an installed package has its bytecode compiled; without this every run would recompile
        # (PYTHONDONTWRITEBYTECODE is set in some sandboxes). A private prefix keeps the tree clean.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": str(work / "pycache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        hpcsif = [sys.executable, "-m", "hpcsif.cli.main", "exec", str(sif), "true"]
        timed(hpcsif, 2, env)  # warm-up: writes the bytecode
        rows = [
            row("python3 -c pass (interpreter start-up)", timed([sys.executable, "-c", "pass"], args.n, env))
        ]
        rows.append(
            row("python3 -S -c pass (no site-packages)", timed([sys.executable, "-S", "-c", "pass"], args.n))
        )
        rows.append(row("hpcsif exec SIF true, cold mount", timed(hpcsif, args.n, env)))
        holder = subprocess.Popen([*hpcsif[:-1], "sleep", "3600"], env=env)
        try:
            time.sleep(1.0)
            rows.append(row("hpcsif exec SIF true, shared mount", timed(hpcsif, args.n, env)))
        finally:
            holder.terminate()
            holder.wait()
        mnt = work / "mnt"
        mnt.mkdir()
        raw_bwrap = (
            f"bwrap --unshare-user --die-with-parent --ro-bind {mnt} / --proc /proc --dev /dev /bin/true"
        )
        mount = f"squashfuse -o ro,offset={offset} {sif} {mnt}"
        rows.append(
            row(
                "raw squashfuse + bwrap + fusermount3 -u (cold)",
                timed_shell(f"{mount} && {raw_bwrap}; fusermount3 -u {mnt}", args.n),
            )
        )
        subprocess.run(mount.split(), check=True)
        try:
            rows.append(row("raw bwrap on a shared mount", timed(raw_bwrap.split(), args.n)))
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        peer = shutil.which("apptainer") or shutil.which("peer-apptainer")
        if peer:
            penv = {**os.environ, "PEER_SID_BINDS": str(sif.parent)}
            rows.append(
                row(
                    f"{os.path.basename(peer)} exec SIF true",
                    timed([peer, "exec", str(sif), "true"], args.n, penv),
                )
            )
        load = os.getloadavg()
        text = "\n".join(
            [
                "# Container start-up time",
                "",
                f"`benchmarks/startup.py`, {args.n} runs each, image `{sif.name}` "
                f"({sif.stat().st_size // 1024} KiB), {os.cpu_count()} CPUs, load average at the end "
                f"{load[0]:.1f}/{load[1]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
                "",
                "| variant | median ms | min ms | p90 ms | median CPU ms |",
                "|---|---|---|---|---|",
                *rows,
                "",
                *summary(),
                "",
            ]
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(text)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
