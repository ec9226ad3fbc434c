#!/usr/bin/env python3
"""Issue 4 benchmark: many concurrent cold requests for one image share one conversion.

For N concurrent cold requests (N = 1, 8, 32, 64 by default), each in its own Python process
started and imported before a common gate opens, it reports the conversions performed, the
failures and the wall time relative to N = 1. Then the warm-hit latency of ``ensure_image``
in-process (p50/p99). When Apptainer (``apptainer`` or ``peer-apptainer``) is present and a
registry can be started, the same N concurrent ``apptainer pull docker://…`` into one shared
cache directory, with their failures and duplicate conversions, and the same N concurrent
hpcsif requests for the same ``docker://`` reference.

    python3 benchmarks/concurrency.py [--ns 1,8,32,64] [--peer-ns 1,8] [--image DIR]

Writes benchmarks/results/concurrency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import compile_package

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each child blocks reading the gate pipe (closing its write end wakes them all at once),
# then, once served, blocks on the hold pipe until every request is served: the interpreter
# shutdown of the first ones served must not delay the service of the others (a job's rank
# would go on to its payload instead; 'all exited' shows that shutdown separately)
CHILD = """
import os, sys, time
from hpcsif.cache.api import ensure_image
ref, ready, gate, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
open(ready, "w").close()
os.read(gate, 1)
print(ensure_image(ref))
print(time.monotonic(), flush=True)  # served: the moment this request had its SIF
os.read(hold, 1)
"""


def hpcsif_stampede(ref: str, n: int, work: Path) -> dict:
    """N processes request ``ref`` from one cold cache at once; returns timings and counts."""
    cache = Path(tempfile.mkdtemp(prefix=f"hpcsif-cache-{n}-", dir=work))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HPCSIF_CACHEDIR": str(cache), "HPCSIF_CONFIG": "/dev/null"}
    env.pop("HPCSIF_SHARED_CACHEDIR", None)
    gate, opener = os.pipe()
    hold, releaser = os.pipe()
    ready = [cache / f"ready-{i}" for i in range(n)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, ref, str(r), str(gate), str(hold)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=(gate, hold),
        )
        for r in ready
    ]
    os.close(gate)
    os.close(hold)
    while not all(r.exists() for r in ready):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.01)
    time.sleep(0.2)  # let the last ones reach their read
    started = time.monotonic()
    os.close(opener)
    firsts = [p.stdout.readline() + p.stdout.readline() if p.stdout else "" for p in procs]
    os.close(releaser)
    rests = [p.communicate() for p in procs]
    outs = [(first + out, err) for first, (out, err) in zip(firsts, rests, strict=True)]
    wall = time.monotonic() - started
    journal = [json.loads(line) for line in (cache / "journal.jsonl").read_text().splitlines()]
    served = [float(o.split()[1]) - started for o, _ in outs if len(o.split()) == 2]
    paths = {o.split()[0] for o, _ in outs if o.strip()}
    errors = [e.strip().splitlines()[-1] for (o, e), p in zip(outs, procs, strict=True) if p.returncode != 0]
    return {
        "n": n,
        "wall": wall,
        "served": max(served, default=wall),
        "conversions": sum(1 for r in journal if r["event"] == "convert"),
        "failures": len(errors),
        "first_error": errors[0] if errors else "",
        "distinct_paths": len(paths),
        "cache": cache,
    }


def repeated(run, ref: str, n: int, work: Path, times: int) -> dict:
    """Run a stampede ``times`` times; the median times, the worst counts."""
    runs = [run(ref, n, work) for _ in range(times)]
    out = dict(runs[0])
    for key in ("served", "wall"):
        out[key] = statistics.median(r.get(key, r["wall"]) for r in runs)
    out["conversions"] = max(r["conversions"] for r in runs)
    out["failures"] = max(r["failures"] for r in runs)
    out["runs"] = [round(r.get("served", r["wall"]), 2) for r in runs]
    return out


def stampedes(ref: str, ns: list[int], work: Path, times: int) -> list[dict]:
    """One row per N: hpcsif stampedes for ``ref`` (printed as they come)."""
    rows = []
    for n in ns:
        rows.append(repeated(hpcsif_stampede, ref, n, work, times))
        print(rows[-1], flush=True)
    return rows


def warm_latency(ref: str, cache: Path, iterations: int) -> tuple[float, float]:
    """p50 and p99 in milliseconds of an in-process warm ``ensure_image``."""
    os.environ["HPCSIF_CACHEDIR"] = str(cache)
    os.environ["HPCSIF_CONFIG"] = "/dev/null"
    from hpcsif.cache.api import ensure_image
    from hpcsif.config import set_config

    set_config(None)
    ensure_image(ref)
    samples = []
    for _ in range(iterations):
        t = time.perf_counter()
        ensure_image(ref)
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def exec_latency(cmd: list[str], env: dict[str, str], runs: int) -> tuple[float, int]:
    """Median wall milliseconds of ``cmd`` after one warm-up run, and the failures."""
    subprocess.run(cmd, env=env, capture_output=True)
    samples, failures = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        failures += subprocess.run(cmd, env=env, capture_output=True).returncode != 0
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples), failures


def apptainer_stampede(exe: str, ref: str, n: int, work: Path) -> dict:
    """N concurrent ``apptainer pull`` of ``ref`` into one cache directory."""
    base = Path(tempfile.mkdtemp(prefix=f"peer-{n}-", dir="/tmp"))  # the peer sees /tmp
    env = {**os.environ, "APPTAINER_CACHEDIR": str(base / "cache"), "APPTAINER_NOHTTPS": "1"}
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [exe, "pull", "--force", str(base / f"out{i}.sif"), ref],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    outs = [p.communicate()[0] for p in procs]
    wall = time.monotonic() - started
    errors = [
        o.strip().splitlines()[-1] if o.strip() else "?"
        for o, p in zip(outs, procs, strict=True)
        if p.returncode
    ]
    shutil.rmtree(base, ignore_errors=True)
    return {
        "n": n,
        "wall": wall,
        "conversions": sum(o.count("Creating SIF file") for o in outs),
        "failures": len(errors),
        "first_error": errors[0] if errors else "",
    }


def start_registry_with(layout: Path, work: Path):
    """A loopback docker-registry holding ``layout`` as bench/debian-py:latest (None if unavailable)."""
    if not shutil.which("docker-registry") or not shutil.which("skopeo"):
        return None, None
    from tests.services.registry import start_registry

    reg = start_registry(work / "registry", "open")
    reg.push(f"oci:{layout}:latest", "bench/debian-py:latest")
    return reg, reg.ref("bench/debian-py:latest")


def table(rows: list[dict], title: str) -> list[str]:
    """A markdown table; 'served' is when the last request had its SIF, 'exited' its process's end."""
    first = rows[0] if rows and rows[0]["n"] == 1 else None
    out = [
        f"### {title}",
        "",
        "| N | all served (s) | ratio to N=1 | all exited (s) | ratio to N=1 | conversions | failures "
        "| runs, served (s) | first error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        served, wall = r.get("served", r["wall"]), r["wall"]
        ratios = [
            f"{v / first.get(k, first['wall']):.2f}" if first else "-"
            for k, v in (("served", served), ("wall", wall))
        ]
        err = r["first_error"].replace("|", "/")[:80]
        runs = ", ".join(f"{w:.2f}" for w in r.get("runs", [served]))
        cells = [r["n"], f"{served:.2f}", ratios[0], f"{wall:.2f}", ratios[1]]
        cells += [r["conversions"], r["failures"], runs, err]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return [*out, ""]


def main() -> int:
    """Run the benchmark and write the report."""
    compile_package()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="1,8,32,64", help="concurrency levels for hpcsif")
    ap.add_argument("--peer-ns", default="1,8,32,64", help="concurrency levels for Apptainer ('' to skip)")
    ap.add_argument("--image", default="/work/bench-images/oci/debian-py", help="OCI layout (tag latest)")
    ap.add_argument("--warm-iterations", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="hpcsif runs per N (the median is reported)")
    ap.add_argument("--no-registry", action="store_true", help="skip the docker:// runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "concurrency.md"))
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",") if x]
    peer_ns = [int(x) for x in args.peer_ns.split(",") if x]
    layout = Path(args.image)
    work = Path(tempfile.mkdtemp(prefix="hpcsif-bench-conc-"))
    lines = [
        "# Concurrent cold requests for one image (issue 4)",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Image: `{layout}` "
        f"({sum(f.stat().st_size for f in layout.rglob('*') if f.is_file()) / 2**20:.0f} MiB of blobs).",
        "Each hpcsif request is a separate Python process that has imported hpcsif before the common "
        "start. 'All served' runs from the start until the last request had its SIF path (the goal's "
        "measure); 'all exited' until the last of those processes had ended, which adds Python's "
        "interpreter shutdown in N processes at once (median of --repeat runs; served times listed). "
        "Apptainer runs are whole `pull` processes, run once. The machine is shared with other work: "
        f"load average at the start {os.getloadavg()[0]:.1f}.",
        "",
    ]
    reg = None
    try:
        oci_ref = f"oci://{layout}:latest"
        rows = stampedes(oci_ref, ns, work, args.repeat)
        lines += table(rows, f"hpcsif `ensure_image('{oci_ref}')`")
        p50, p99 = warm_latency(oci_ref, rows[0]["cache"], args.warm_iterations)
        lines += [
            f"Warm hit, in-process `ensure_image` over {args.warm_iterations} calls: "
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms.",
            "",
        ]
        print(f"warm p50 {p50:.2f} ms p99 {p99:.2f} ms", flush=True)
        peer = shutil.which("apptainer") or shutil.which("peer-apptainer")
        if not args.no_registry:
            reg, docker_ref = start_registry_with(layout, work)
        if reg is not None:
            rows = stampedes(docker_ref, ns, work, args.repeat)
            lines += table(rows, f"hpcsif `ensure_image('{docker_ref}')` (cold blob cache too)")
            p50, p99 = warm_latency(docker_ref, rows[0]["cache"], args.warm_iterations)
            lines += [
                f"Warm hit of the docker:// reference (tag record within cache.tag_ttl, no network): "
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms.",
                "",
            ]
            env = {**os.environ, "HPCSIF_CACHEDIR": str(rows[0]["cache"]), "HPCSIF_CONFIG": "/dev/null"}
            ms, bad = exec_latency(
                [sys.executable, "-m", "hpcsif.cli.main", "exec", docker_ref, "true"], env, 10
            )
            lines += [
                f"Warm `hpcsif exec {docker_ref} true`, end to end: median {ms:.0f} ms ({bad} failed).",
                "",
            ]
            if peer:
                peer_cache = Path(tempfile.mkdtemp(prefix="peer-exec-", dir="/tmp"))
                penv = {**os.environ, "APPTAINER_CACHEDIR": str(peer_cache), "APPTAINER_NOHTTPS": "1"}
                ms, bad = exec_latency([peer, "exec", docker_ref, "true"], penv, 10)
                shutil.rmtree(peer_cache, ignore_errors=True)
                lines += [
                    f"Warm `{os.path.basename(peer)} exec {docker_ref} true` (asks the registry): "
                    f"median {ms:.0f} ms ({bad} failed).",
                    "",
                ]
            if peer and peer_ns:
                rows = []
                for n in peer_ns:
                    rows.append(apptainer_stampede(peer, docker_ref, n, work))
                    print(rows[-1], flush=True)
                lines += table(
                    rows, f"`{os.path.basename(peer)} pull docker://…` into one APPTAINER_CACHEDIR"
                )
        elif peer:
            lines += ["Apptainer comparison skipped: no docker-registry/skopeo to serve the image.", ""]
        if not peer:
            lines += ["Apptainer comparison skipped: neither apptainer nor peer-apptainer is installed.", ""]
    finally:
        if reg is not None:
            reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
