#!/usr/bin/env python3
"""Issue 3 benchmark: ``hpcsif pull docker://…`` (pull + convert) from a local registry.

The realistic image (``/work/bench-images/oci/debian-py``, Debian minbase + python3) is pushed
to a ``docker-registry`` on loopback, then pulled to a SIF:

* cold: empty cache (download + convert);
* warm: blobs cached, SIF not (convert only, plus the manifest round trip);
* hit: the SIF is cached as well (a copy out of the cache);

by hpcsif and, in the same run, by ``apptainer pull --no-https`` (``apptainer`` or
``peer-apptainer``) when present. Each figure is the median of ``--repeat`` runs.

    python3 benchmarks/pull.py [--image DIR] [--repeat 3]

Writes benchmarks/results/pull.md. Goals: cold <= 0.7x Apptainer, warm <= 0.5x.
"""

from __future__ import annotations

import argparse
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
CASES = ("cold", "warm", "hit")
sys.path.insert(0, str(ROOT))

from tests.services.registry import start_registry  # noqa: E402 - needs ROOT on sys.path


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Run ``cmd``; its wall time in seconds (raises with its stderr on failure)."""
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return elapsed


def _keep_only(cache: Path, keep: str) -> None:
    """Empty ``cache`` except the blob cache at the relative path ``keep``."""
    aside = cache.with_name(cache.name + ".blobs")
    os.replace(cache / keep, aside)
    shutil.rmtree(cache)
    (cache / keep).parent.mkdir(parents=True)
    os.replace(aside, cache / keep)


def _bench(cmd: list[str], env: dict[str, str], sif: Path, cache: Path, blobs: str) -> dict[str, float]:
    """cold (empty cache), warm (blobs only), hit (everything cached) for one pull command."""
    times = {"cold": timed(cmd, env)}
    sif.unlink()
    _keep_only(cache, blobs)
    times["warm"] = timed(cmd, env)
    sif.unlink()
    times["hit"] = timed(cmd, env)
    sif.unlink()
    shutil.rmtree(cache)
    return times


def bench_hpcsif(ref: str, work: Path, repeat: int) -> dict[str, list[float]]:
    """Pull+convert times for hpcsif (blob cache: ``oci/`` in the cache dir)."""
    runs = []
    for i in range(repeat):
        cache = work / f"hpcsif-cache-{i}"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HPCSIF_CACHEDIR": str(cache),
            "HPCSIF_CONFIG": "/dev/null",
        }
        for k in ("HPCSIF_DISABLE_CACHE", "APPTAINER_DISABLE_CACHE", "SINGULARITY_DISABLE_CACHE"):
            env.pop(k, None)
        sif = work / "hpcsif.sif"
        cmd = [sys.executable, "-m", "hpcsif.cli.main", "-q", "pull", "--force", "--name", str(sif), ref]
        runs.append(_bench(cmd, env, sif, cache, "oci"))
    return {k: [r[k] for r in runs] for k in CASES}


def bench_apptainer(peer: str, ref: str, work: Path, repeat: int) -> dict[str, list[float]]:
    """The same for ``apptainer pull`` (blob cache: ``cache/blob/`` in its cache dir)."""
    runs = []
    for i in range(repeat):
        cache = work / f"peer-cache-{i}"
        env = {**os.environ, "APPTAINER_CACHEDIR": str(cache), "APPTAINER_TMPDIR": str(work)}
        sif = work / "peer.sif"
        cmd = [peer, "-q", "pull", "--force", "--no-https", str(sif), ref]
        runs.append(_bench(cmd, env, sif, cache, "cache/blob"))
    return {k: [r[k] for r in runs] for k in CASES}


def main() -> int:
    compile_package()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="/work/bench-images/oci/debian-py", help="OCI layout (tag latest)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pull.md"))
    args = parser.parse_args()
    image = Path(args.image)
    if not (image / "index.json").is_file():
        print(f"no OCI layout at {image}", file=sys.stderr)
        return 2
    # /tmp, because the Apptainer peer runs in a chroot that sees /tmp
    work = Path(tempfile.mkdtemp(prefix="hpcsif-bench-pull-", dir="/tmp"))
    load_before = os.getloadavg()[0]
    reg = start_registry(work / "registry", "open")
    try:
        reg.push(f"oci:{image}:latest", "bench/debian-py:latest")
        ref = reg.ref("bench/debian-py:latest")
        size = sum(p.stat().st_size for p in (image / "blobs" / "sha256").iterdir())
        ours = bench_hpcsif(ref, work, args.repeat)
        peer = shutil.which("apptainer") or shutil.which("peer-apptainer")
        theirs = bench_apptainer(peer, ref, work, args.repeat) if peer else None
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)

    load_after = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in ours.items()}
    lines = [
        "# Pull benchmark (issue 3)",
        "",
        f"Image: `{image}` ({size / 1e6:.0f} MB of blobs), pushed to a local `docker-registry`; "
        f"median of {args.repeat} runs; {platform.node()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; 1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after (other work on the machine makes absolute times noisy).",
        "",
        "| case | hpcsif (s) | Apptainer (s) | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    goals = {"cold": 0.7, "warm": 0.5, "hit": None}
    for case in CASES:
        if theirs:
            peer_med = statistics.median(theirs[case])
            ratio = med[case] / peer_med
            goal = f"<= {goals[case]}x ({'met' if ratio <= goals[case] else 'missed'})" if goals[case] else ""
            lines.append(f"| {case} | {med[case]:.2f} | {peer_med:.2f} | {ratio:.2f}x | {goal} |")
        else:
            goal = f"<= {goals[case]}x" if goals[case] else ""
            lines.append(f"| {case} | {med[case]:.2f} | (no Apptainer) | | {goal} |")
    lines += ["", "Raw runs (s):", "", f"- hpcsif: {ours}"]
    if theirs:
        lines.append(f"- Apptainer ({peer}): {theirs}")
    lines += [
        "",
        "cold: empty cache; warm: blob cache kept, everything else in the cache removed (no cached SIF); "
        "hit: the SIF is cached too (both tools copy it out).",
        "hpcsif converts with zstd (its default); Apptainer with its default mksquashfs gzip.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
