#!/usr/bin/env python3
"""Container start-up time: ``hpcsif exec IMAGE true`` against raw squashfuse+bwrap and Apptainer.

Measured in one run, on one machine, with the same SIF:

* ``hpcsif exec`` through the native front (``hpcsif/native/front.c``, what ``make native``
  installs as ``hpcsif``; built here with ``cc``) and through the Python CLI alone (pip's
  script), with a shared mount (another container of the image is running) and cold (every
  run mounts and unmounts);
* raw ``bwrap [--unshare-user] --ro-bind MNT / … /bin/true`` on an existing squashfuse mount
  (the floor for a shared mount), and the very ``bwrap`` command line hpcsif's engine makes for
  this start (the same binds, ``/etc/passwd`` and environment set-up, run directly: what the
  engine itself costs on top), the same command with ``/bin/true`` in place of the launcher shell
  that sources the image's ``/.singularity.d/env`` scripts (what the mounts alone cost), and raw
  ``squashfuse`` + ``bwrap`` + ``fusermount3 -u`` (cold);
* ``python3 -c pass`` (the interpreter's own start-up, part of every Python CLI number);
* ``apptainer exec IMAGE true`` when ``apptainer`` or the ``peer-apptainer`` wrapper is installed
  (the wrapper adds a chroot hop, so its number is an upper bound for Apptainer itself).

The variants of a phase run round-robin (one run of each, in a random order, *n* times), so a
change in the machine's load hits all of them alike; CPU time (user+sys of the waited-for processes) is
reported beside wall time because it depends much less on other tenants.

Writes ``benchmarks/results/startup.md``. Usage: ``python3 benchmarks/startup.py [--image SIF] [-n 30]``;
without ``--image`` a busybox SIF is built with the engine tests' helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _common import compile_package

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Variant = tuple[list[str], dict[str, str] | None]


def run_once(cmd: list[str], env: dict[str, str] | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of *cmd*; output discarded, a failure aborts.

    Daemons (squashfuse, the mount watchdog) are not waited for: their CPU time is not counted.
    """
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # (not the terminal: on one, the engine hands it to the container, a start it does not repeat)
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime


def interleaved(variants: dict[str, Variant], n: int) -> dict[str, list[tuple[float, float]]]:
    """*n* rounds, each running every variant once; per variant the (wall, cpu) samples.

    Each round takes the variants in a new random order: a variant that always followed the
    same other one would find that one's binaries (bwrap, the interpreter) hot, or evicted.
    """
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    rng = random.Random(0)
    names = list(variants)
    for _ in range(n):
        rng.shuffle(names)
        for name in names:
            cmd, env = variants[name]
            samples[name].append(run_once(cmd, env))
    return samples


def table(samples: dict[str, list[tuple[float, float]]]) -> tuple[list[str], dict[str, float]]:
    """Markdown rows (median, min, p90 wall ms; median CPU ms) and the wall medians by name."""
    rows, medians = [], {}
    for name, pairs in samples.items():
        ms = sorted(w * 1000 for w, _ in pairs)
        cpu = statistics.median(c * 1000 for _, c in pairs)
        p90 = ms[max(0, int(len(ms) * 0.9) - 1)]
        medians[name] = statistics.median(ms)
        rows.append(f"| {name} | {medians[name]:.1f} | {ms[0]:.1f} | {p90:.1f} | {cpu:.1f} |")
    return rows, medians


#: runs the engine for ``exec SIF true`` with its last step replaced: prints the bwrap command
#: line, environment and --ro-bind-data contents as JSON instead of starting bwrap
_DUMP = textwrap.dedent(
    """
    import json, os, sys
    import hpcsif.engine.bwrap as engine
    def dump(bwrap, argv, env, fds, signals, **kw):
        data = {str(fd): os.pread(fd, 1 << 20, 0).decode() for fd in fds}
        json.dump({"argv": [bwrap, *argv[1:]], "env": env, "data": data}, sys.stdout)
        return 0
    engine.run_bwrap = dump
    from hpcsif.cli.main import main
    main(["exec", sys.argv[1], "true"])
    """
)


def engine_command(sif: Path, env: dict[str, str], work: Path) -> tuple[list[str], dict[str, str]]:
    """The bwrap command hpcsif's engine makes for ``exec SIF true``, runnable directly."""
    out = subprocess.run([sys.executable, "-c", _DUMP, str(sif)], env=env, capture_output=True, text=True)
    made = json.loads(out.stdout)
    argv, cmd, mode = made["argv"], [], 0o600
    while argv:
        arg = argv.pop(0)
        if arg == "--perms" and argv[1:2] == ["--ro-bind-data"]:
            mode = int(argv.pop(0), 8)  # (bwrap takes --perms before a file it makes only)
        elif arg == "--ro-bind-data":  # the same content from a file instead of a descriptor
            fd, dest = argv.pop(0), argv.pop(0)
            path = work / f"data-{fd}"
            path.write_text(made["data"][fd])
            path.chmod(mode)
            cmd += ["--ro-bind", str(path), dest]
            mode = 0o600
        else:
            cmd.append(arg)
    return cmd, made["env"]


def build_front(work: Path) -> Path:
    """``make native``'s front, compiled for this interpreter."""
    out = work / "hpcsif"
    src = ROOT / "hpcsif/native/front.c"
    subprocess.run(["cc", "-O2", f'-DHPCSIF_PYTHON="{sys.executable}"', "-o", str(out), str(src)], check=True)
    return out


FRONT, PY = "hpcsif exec SIF true (native front)", "hpcsif exec SIF true (Python CLI only)"
FRONT_COLD = "hpcsif exec SIF true, cold mount (native front: mounts, runs, unmounts)"
RAW, SAME = "raw bwrap on a shared mount", "bwrap as hpcsif's engine runs it (same binds and environment)"
BINDS = "the same bwrap, /bin/true in place of the launcher shell (binds only)"


def without_launcher(cmd: list[str]) -> list[str]:
    """``cmd`` (the engine's bwrap command) running ``/bin/true`` instead of its launcher shell."""
    at = next(i for i in range(len(cmd) - 1) if cmd[i] == "/bin/sh" and cmd[i + 1] == "-c")
    return [*cmd[:at], "/bin/true"]


def main() -> int:
    compile_package()
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
        front = [str(build_front(work)), "exec", str(sif), "true"]
        run_once(hpcsif, env)  # warm-up: writes the bytecode
        run_once(front, env)  # the Python CLI behind the front saves the plan
        mnt = work / "mnt"
        mnt.mkdir()
        mount = ["squashfuse", "-o", f"ro,offset={offset}", str(sif), str(mnt)]
        # (root runs in no user namespace, as hpcsif's engine and Apptainer run it)
        userns = ["--unshare-user"] if os.getuid() else []
        bwrap = ["bwrap", *userns, "--die-with-parent", "--ro-bind", str(mnt), "/"]
        bwrap += ["--proc", "/proc", "--dev", "/dev", "/bin/true"]
        raw_cold = " ".join([*mount, "&&", *bwrap, ";", "fusermount3", "-u", str(mnt)])

        # phase 1: nothing mounted between runs
        samples = interleaved(
            {
                FRONT_COLD: (front, env),
                "hpcsif exec SIF true, cold mount (Python CLI only)": (hpcsif, env),
                "raw squashfuse + bwrap + fusermount3 -u, cold (incl. sh)": (["sh", "-c", raw_cold], None),
                "sh -c true (to subtract from the line above)": (["sh", "-c", "true"], None),
            },
            args.n,
        )
        # phase 2: a long-running container holds hpcsif's mount; a raw mount for bwrap alone
        holder = subprocess.Popen([*hpcsif[:-1], "sleep", "3600"], env=env)
        subprocess.run(mount, check=True)
        try:
            time.sleep(1.0)
            same, same_env = engine_command(sif, env, work)
            shared: dict[str, Variant] = {
                "python3 -c pass (interpreter start-up)": ([sys.executable, "-c", "pass"], env),
                "python3 -S -c pass (no site-packages)": ([sys.executable, "-S", "-c", "pass"], env),
                FRONT: (front, env),
                PY: (hpcsif, env),
                RAW: (bwrap, None),
                SAME: (same, same_env),
                BINDS: (without_launcher(same), same_env),
            }
            peer = shutil.which("apptainer") or shutil.which("peer-apptainer")
            if peer:
                penv = {**os.environ, "PEER_SID_BINDS": str(sif.parent)}
                shared[f"{os.path.basename(peer)} exec SIF true"] = ([peer, "exec", str(sif), "true"], penv)
            samples.update(interleaved(shared, args.n))
        finally:
            holder.terminate()
            holder.wait()
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        rows, med = table(samples)
        front_ms, py_ms = med[FRONT], med[PY]
        raw_ms, same_ms, binds_ms = med[RAW], med[SAME], med[BINDS]
        cold_ms = med["hpcsif exec SIF true, cold mount (Python CLI only)"]
        interp = med["python3 -c pass (interpreter start-up)"]
        raw_cold_ms = med["raw squashfuse + bwrap + fusermount3 -u, cold (incl. sh)"]
        raw_cold_ms -= med["sh -c true (to subtract from the line above)"]
        notes = [
            f"- shared mount, native front: {front_ms:.1f} ms = {front_ms / same_ms:.2f}x the engine's "
            f"own bwrap command run directly ({same_ms:.1f} ms), {front_ms / raw_ms:.2f}x the bare "
            f"bwrap ({raw_ms:.1f} ms)",
            f"- where the gap to the bare bwrap goes: the engine's mounts (Apptainer's default binds and "
            f"the underlay for bind destinations the image lacks) {binds_ms - raw_ms:.1f} ms, the launcher "
            f"shell and the image's env scripts {same_ms - binds_ms:.1f} ms, the front itself "
            f"{front_ms - same_ms:.1f} ms",
            f"- shared mount, Python CLI only: {py_ms:.0f} ms = {py_ms / same_ms:.1f}x the engine's "
            f"bwrap command, {py_ms / raw_ms:.1f}x the bare bwrap; the interpreter alone takes "
            f"{interp:.0f} ms of it",
            f"- cold mount: native front {med[FRONT_COLD]:.0f} ms = {med[FRONT_COLD] / raw_cold_ms:.2f}x raw "
            f"squashfuse+bwrap+unmount ({raw_cold_ms:.0f} ms); Python CLI only {cold_ms:.0f} ms",
        ]
        for name, value in med.items():
            if "exec SIF true" in name and not name.startswith("hpcsif"):
                notes.append(
                    f"- {name}: {value:.0f} ms; hpcsif native front shared / cold = "
                    f"{front_ms / value:.2f}x / {med[FRONT_COLD] / value:.2f}x; "
                    f"Python CLI only shared / cold = {py_ms / value:.2f}x / {cold_ms / value:.2f}x"
                )
        load = os.getloadavg()
        text = "\n".join(
            [
                "# Container start-up time",
                "",
                f"`benchmarks/startup.py`, {args.n} interleaved runs each, image `{sif.name}` "
                f"({sif.stat().st_size // 1024} KiB), {os.cpu_count()} CPUs, load average at the end "
                f"{load[0]:.1f}/{load[1]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
                "",
                "| variant | median ms | min ms | p90 ms | median CPU ms |",
                "|---|---|---|---|---|",
                *rows,
                "",
                *notes,
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
