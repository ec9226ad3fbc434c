"""Prolog benchmark (issue 6): how long ``slurm/prolog`` takes to stage a job's image on a node.

Starts the test Slurm cluster (tests/services/slurm.py, one node), submits a held job asking
for the ``debian-py`` image (``--comment=hpcsif:oci://…``: an OCI layout, whose digest is read
from its index as a registry tag's pinned digest would be; a docker-archive would add hashing
the whole archive on every cold node), and runs the real prolog
hook as slurmd would (``SLURM_JOB_ID``, ``SLURM_CONF``, ``SLURM_JOB_COMMENT`` … in its
environment; it asks slurmctld for the job's batch script) in three situations:

* **cold**: empty node cache, no shared tier: one conversion;
* **cold node, warm shared tier**: the node copies the SIF from ``cache.shared_dir``
  (goal: within 1.2x of a plain ``cp`` of the SIF), once with the SIF in the page cache and once
  dropped from it (``posix_fadvise(DONTNEED)``, root only), as on a node that never read it;
* **warm**: the image is in the node cache (goal: < 0.5 s).

With Apptainer installed, its ``build`` of the same image (oci-archive) is shown for scale (what each job
would pay without pre-staging). Writes ``results/prolog.md``.

``--data-mb N`` adds a layer holding one file of N MB of incompressible bytes (model weights, a
CUDA toolkit: the size of the images HPC sites stage) and writes ``results/prolog-<N>mb.md``.

    python benchmarks/prolog.py [--image debian-py] [--repeat 3] [--data-mb 2048]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _common import BENCH_IMAGES, compile_package, median_run, peer, write_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.services.slurm import SlurmCluster  # noqa: E402


def install_hooks(work: Path) -> Path:
    """Copy the hooks from slurm/ into ``work/hooks``; returns the prolog."""
    hooks = work / "hooks"
    hooks.mkdir()
    for name in ("prolog", "epilog", "hpcsif-hook"):
        shutil.copy2(ROOT / "slurm" / name, hooks / name)
    return hooks / "prolog"


def configure(hooks: Path, work: Path, system: Path, shared: Path | None) -> None:
    """Write the hooks' hpcsif.env for one situation."""
    lines = [
        f'HPCSIF_BIN="{sys.executable} -m hpcsif.cli.main"',
        f"PYTHONPATH={ROOT}",
        f"HPCSIF_SYSTEM_CACHEDIR={system}",
        f"HPCSIF_LOG={work}/prolog.log",
        f"HPCSIF_SHARED_CACHEDIR={shared or ''}",
    ]
    (hooks / "hpcsif.env").write_text("\n".join(lines) + "\n")


class _RandomBytes:
    """A file-like source of incompressible bytes, for :func:`tarfile.TarFile.addfile`."""

    def read(self, size: int) -> bytes:
        return os.urandom(size)


def _put_blob(layout: Path, data: bytes) -> dict:
    """Store ``data`` as a blob of ``layout``; returns its digest and size."""
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def add_data_layer(layout: Path, megabytes: int) -> None:
    """Append an uncompressed layer with ``/opt/data/weights.bin`` of ``megabytes`` MB to the image."""
    blobs = layout / "blobs" / "sha256"
    tmp = blobs / ".data-layer.tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("opt/data/weights.bin")
        info.size, info.mode = megabytes << 20, 0o644
        tar.addfile(info, _RandomBytes())
    with open(tmp, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    size = tmp.stat().st_size
    tmp.rename(blobs / digest)
    index = json.loads((layout / "index.json").read_text())
    entry = index["manifests"][0]
    manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    config["rootfs"]["diff_ids"].append(f"sha256:{digest}")
    manifest["config"].update(_put_blob(layout, json.dumps(config).encode()))
    layer = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": f"sha256:{digest}",
        "size": size,
    }
    manifest["layers"].append(layer)
    entry.update(_put_blob(layout, json.dumps(manifest).encode()))
    (layout / "index.json").write_text(json.dumps(index))


# stage from the shared tier into fresh node caches, in one process whose modules are loaded
_IN_PROCESS = """
import os, shutil, statistics, sys, time
from hpcsif.cache.api import ensure_image
from hpcsif.config import set_config
ref, base, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = []
for i in range(runs + 1):
    os.environ["HPCSIF_CACHEDIR"] = f"{base}/node{i}"
    set_config(None)
    os.sync()
    t = time.monotonic()
    ensure_image(ref)
    times.append(time.monotonic() - t)
    shutil.rmtree(f"{base}/node{i}")
print(statistics.median(times[1:]))  # the first run loads the modules
"""


def in_process_seconds(ref: str, shared: Path, work: Path, runs: int) -> float:
    """Median seconds of ``ensure_image`` copying from the shared tier, modules already loaded."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HPCSIF_CONFIG": "/dev/null"}
    env.update(HPCSIF_SHARED_CACHEDIR=str(shared), HPCSIF_SYSTEM_CACHEDIR=str(work / "none"))
    cmd = [sys.executable, "-c", _IN_PROCESS, ref, str(work), str(runs)]
    return float(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)


def prolog_seconds(prolog: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run the hook once: (wall seconds of the hook, seconds its staging step took)."""
    size = log.stat().st_size if log.exists() else 0
    start = time.monotonic()
    subprocess.run([str(prolog)], env=env, check=True)
    seconds = time.monotonic() - start
    text = log.read_text()[size:]
    # the hook logs "job N: REF (S s): staged PATH"
    m = re.search(r"\(([0-9.]+) s\): staged ", text)
    if m is None:
        raise SystemExit(f"the prolog did not stage the image:\n{text}")
    return seconds, float(m.group(1))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The run with the median wall time."""
    return sorted(runs)[len(runs) // 2]


def main() -> None:
    compile_package()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default="debian-py")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-mb", type=int, default=0, help="add a layer of this many MB of random bytes")
    args = ap.parse_args()
    src = BENCH_IMAGES / "oci" / args.image
    if not (src / "index.json").exists():
        raise SystemExit(f"{src} missing: run shared/bench/make-images.sh first")
    work = Path(tempfile.mkdtemp(prefix="hpcsif-bench-prolog-", dir="/tmp"))
    work.chmod(0o755)
    layout = work / args.image
    shutil.copytree(src, layout)
    if args.data_mb:
        add_data_layer(layout, args.data_mb)
    ref = f"oci://{layout}:latest"
    prolog = install_hooks(work)
    hooks, log = prolog.parent, work / "prolog.log"
    system, shared = work / "system", work / "shared"
    rows = []
    with SlurmCluster(nodes=1) as cluster:
        job = cluster.run(
            ["sbatch", "--parsable", "--hold", f"--comment=hpcsif:{ref}", "--wrap", "true"], cwd=work
        ).stdout.strip()
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "SLURM_CONF": str(cluster.conf),
            "SLURM_JOB_ID": job,
            "SLURM_JOB_USER": "root",
            "SLURM_JOB_UID": "0",
            "SLURMD_NODENAME": cluster.nodes[0],
            "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
            "SLURM_JOB_COMMENT": f"hpcsif:{ref}",  # slurmd passes the job's comment
        }

        def fresh(path: Path) -> None:
            shutil.rmtree(path, ignore_errors=True)
            # every copy starts with no dirty pages left by the one before (writeback throttling)
            os.sync()

        # cold: one conversion per run, into an empty node cache
        configure(hooks, work, system, None)
        cold = []
        for _ in range(args.repeat):
            fresh(system)
            cold.append(prolog_seconds(prolog, env, log))
        cold_s = median(cold)

        # fill the shared tier once, then stage from it into empty node caches
        configure(hooks, work, system, shared)
        fresh(system)
        prolog_seconds(prolog, env, log)
        sif = next(shared.glob("sif/*/*.sif"))
        copy_dest = work / "copy.sif"

        def no_copy() -> None:
            copy_dest.unlink(missing_ok=True)
            os.sync()

        def cp_seconds(script: str, repeat: int = args.repeat) -> float:
            return median_run(
                ["sh", "-c", script, "sh", str(sif), str(copy_dest)], repeat, prepare=no_copy
            ).seconds

        # the hook and cp take turns, so a drift in the page cache or writeback hits both alike
        from_shared, cps = [], []
        for _ in range(args.repeat):
            fresh(system)
            from_shared.append(prolog_seconds(prolog, env, log))
            cps.append(cp_seconds('cp "$1" "$2"', 1))
        shared_s = median(from_shared)
        cp_s = sorted(cps)[len(cps) // 2]

        def uncached() -> None:
            """Drop the shared SIF from the page cache: a node that never read it (needs root)."""
            no_copy()
            fd = os.open(sif, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

        # a cold node has not read the SIF before: it comes from the disk for the hook and for cp
        from_disk, cps_disk = [], []
        for _ in range(args.repeat):
            fresh(system)
            uncached()
            from_disk.append(prolog_seconds(prolog, env, log))
            cps_disk.append(median_run(["cp", str(sif), str(copy_dest)], 1, prepare=uncached).seconds)
        disk_s = median(from_disk)
        cp_disk_s = sorted(cps_disk)[len(cps_disk) // 2]
        # what a durable copy would cost (copies from the shared tier are not synced: see README)
        cp_sync_s = cp_seconds('cp "$1" "$2" && sync "$2"')
        staged_s = in_process_seconds(ref, shared, work, max(args.repeat, 7))
        # warm: the node cache has it
        warm_s = median([prolog_seconds(prolog, env, log) for _ in range(max(args.repeat, 5))])

        def ratio(seconds: float) -> str:
            return f"{seconds / cp_s:.2f}x"

        size = f"{sif.stat().st_size / 1e6:.0f} MB"
        rows += [
            ["cold (one conversion)", _ms(cold_s[0]), _ms(cold_s[1]), "-", "-"],
            [
                "cold node, warm shared tier",
                _ms(shared_s[0]),
                _ms(shared_s[1]),
                ratio(shared_s[1]),
                ratio(shared_s[0]),
            ],
            [
                "the staging step in a process that has loaded hpcsif",
                "-",
                _ms(staged_s),
                ratio(staged_s),
                "-",
            ],
            [f"plain cp of the SIF ({size})", "-", _ms(cp_s), "1.00x", "1.00x"],
            [
                "cold node, warm shared tier, SIF not in the page cache",
                _ms(disk_s[0]),
                _ms(disk_s[1]),
                f"{disk_s[1] / cp_disk_s:.2f}x",
                f"{disk_s[0] / cp_disk_s:.2f}x",
            ],
            [f"plain cp of the SIF, not in the page cache ({size})", "-", _ms(cp_disk_s), "1.00x", "1.00x"],
            [f"cp + sync of the SIF ({size})", "-", _ms(cp_sync_s), ratio(cp_sync_s), "-"],
            ["warm node cache", _ms(warm_s[0]), _ms(warm_s[1]), "-", "-"],
        ]
        cluster.run(["scancel", job])

    app = peer()
    if app and not args.data_mb:
        out = work / "apptainer.sif"
        # Apptainer refuses oci:DIR:TAG, and the peer sees only /tmp: build from a copy of the archive
        archive = work / f"{args.image}.oci-archive.tar"
        shutil.copy(BENCH_IMAGES / archive.name, archive)
        zstd = "-comp zstd -Xcompression-level 3"
        acmd = [app, "-q", "build", "-F", "--mksquashfs-args", zstd, str(out), f"oci-archive://{archive}"]
        ar = median_run(acmd, args.repeat, env={**os.environ, "APPTAINER_CACHEDIR": str(work / "acache")})
        rows.append(["apptainer build of the same image (per job, unstaged)", _ms(ar.seconds), "-", "-", "-"])
    layout_mb = sum(f.stat().st_size for f in layout.rglob("*") if f.is_file()) / 1e6
    extra = f" plus a {args.data_mb} MB layer of random bytes" if args.data_mb else ""
    notes = [
        f"Image: `{args.image}`{extra} (OCI layout, {layout_mb:.0f} MB); median of {args.repeat} "
        f"runs on {os.cpu_count()} cores. Each time is the whole `slurm/prolog` hook as slurmd runs it: "
        "Python start, a slurmctld query (batch script), staging, lease, job record; "
        "'staging ms' is the staging step alone (as the prolog logs it).",
        f"Load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine inflates wall times).",
        f"- warm: {warm_s[0]:.2f} s for the whole hook (goal < 0.5 s)",
        f"- cold node with a warm shared tier: staging step {shared_s[1] / cp_s:.2f}x of cp (goal <= 1.2x), "
        "including the first use of the cache's modules in the hook's process; the whole hook "
        f"{shared_s[0] / cp_s:.2f}x; what the hook costs beyond a warm node (hook minus warm hook: "
        f"{_ms(shared_s[0] - warm_s[0])} ms) {(shared_s[0] - warm_s[0]) / cp_s:.2f}x of cp; the staging "
        f"step itself, in a process that has loaded hpcsif: {staged_s / cp_s:.2f}x of cp",
        f"- the same with the SIF dropped from the page cache before each run (a node that never read "
        f"it, as a real cold node): whole hook {disk_s[0] / cp_disk_s:.2f}x of a cp from the disk "
        f"({_ms(cp_disk_s)} ms), staging step {disk_s[1] / cp_disk_s:.2f}x",
    ]
    if not app:
        notes.append("- Apptainer not installed: no peer figure (see shared/peer/).")
    columns = ["situation", "hook wall ms", "staging ms", "staging vs cp", "hook vs cp"]
    name = f"prolog-{args.data_mb}mb" if args.data_mb else "prolog"
    write_table(name, f"Prolog benchmark{extra}", columns, rows, notes)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
