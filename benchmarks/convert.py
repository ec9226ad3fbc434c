"""Conversion benchmark (issue 2): hpcsif build vs Apptainer build vs umoci unpack + mksquashfs.

Converts the realistic ``debian-py`` image (bookworm minbase + python3, 3 layers, 68 MB
compressed; ``shared/bench/make-images.sh`` builds it) as an oci-archive and reports wall
time, peak RSS (largest process) and SIF size for each tool with the same codec, plus the time
merely decompressing the input layers takes. Writes ``results/convert.md``.

    python benchmarks/convert.py [--image debian-py] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import BENCH_IMAGES, compile_package, hpcsif_cmd, median_run, peer, write_table


def _layer_paths(layout: Path) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    return [layout / "blobs/sha256" / layer["digest"][7:] for layer in manifest["layers"]]


def decompress_seconds(layout: Path) -> float:
    """Seconds to only decompress every layer with Python's zlib (the floor any converter pays)."""
    start = time.monotonic()
    for path in _layer_paths(layout):
        with gzip.open(path) as f:
            while f.read(1 << 20):
                pass
    return time.monotonic() - start


def gzip_cli_seconds(layout: Path) -> float:
    """Seconds for ``gzip -dc`` to decompress every layer (the command-line way)."""
    start = time.monotonic()
    for path in _layer_paths(layout):
        subprocess.run(["gzip", "-dc", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


def main() -> None:
    compile_package()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default="debian-py")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    archive_src = BENCH_IMAGES / f"{args.image}.oci-archive.tar"
    layout = BENCH_IMAGES / "oci" / args.image
    if not archive_src.exists():
        raise SystemExit(f"{archive_src} missing: run shared/bench/make-images.sh first")
    # the Apptainer peer sees /tmp, so everything lives there
    work = Path(tempfile.mkdtemp(prefix="hpcsif-bench-convert-", dir="/tmp"))
    archive = work / archive_src.name
    shutil.copy(archive_src, archive)
    env = {**os.environ, "HPCSIF_CACHEDIR": str(work / "cache"), "APPTAINER_CACHEDIR": str(work / "acache")}
    rows, results = [], {}

    def clean(*paths: Path):
        return lambda: [
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True) for p in paths
        ]

    decomp = min(decompress_seconds(layout) for _ in range(args.repeat))
    rows.append(["decompress input layers only (Python zlib)", f"{decomp:.2f}", "-", "-"])
    decomp_cli = min(gzip_cli_seconds(layout) for _ in range(args.repeat))
    rows.append(["decompress input layers only (`gzip -dc`)", f"{decomp_cli:.2f}", "-", "-"])
    app = peer()
    for codec in ("zstd", "gzip"):
        out = work / f"hpcsif-{codec}.sif"
        cmd = [
            *hpcsif_cmd(),
            "-q",
            "build",
            "--force",
            "--disable-cache",
            "--compression",
            codec,
            str(out),
            f"oci-archive://{archive}",
        ]
        r = median_run(cmd, args.repeat, env=env, cwd=work)
        results[("hpcsif", codec)] = (r, out.stat().st_size)
        rows.append(
            [
                f"hpcsif build ({codec}{' 3' if codec == 'zstd' else ''})",
                f"{r.seconds:.2f}",
                f"{r.peak_rss_mb:.0f}",
                f"{out.stat().st_size / 1e6:.1f}",
            ]
        )
        if app:
            aout = work / f"apptainer-{codec}.sif"
            acmd = [app, "-q", "build", "-F"]
            if codec == "zstd":
                acmd += ["--mksquashfs-args", "-comp zstd -Xcompression-level 3"]
            acmd += [str(aout), f"oci-archive://{archive}"]
            ar = median_run(acmd, args.repeat, prepare=clean(work / "acache"), env=env, cwd=work)
            results[("apptainer", codec)] = (ar, aout.stat().st_size)
            rows.append(
                [
                    f"apptainer build ({codec}{' 3' if codec == 'zstd' else ', its default'})",
                    f"{ar.seconds:.2f}",
                    f"{ar.peak_rss_mb:.0f}",
                    f"{aout.stat().st_size / 1e6:.1f}",
                ]
            )
    # the naive pipeline: unpack a root tree to disk, then mksquashfs it
    bundle, sq = work / "bundle", work / "umoci.sqfs"
    script = (
        f"umoci unpack --rootless --image {layout}:latest {bundle} >/dev/null && "
        f"mksquashfs {bundle}/rootfs {sq} -noappend -quiet -no-progress -comp zstd -Xcompression-level 3"
    )
    ur = median_run(["sh", "-c", script], args.repeat, prepare=clean(bundle, sq), cwd=work)
    rows.append(
        [
            "umoci unpack + mksquashfs (zstd 3)",
            f"{ur.seconds:.2f}",
            f"{ur.peak_rss_mb:.0f}",
            f"{sq.stat().st_size / 1e6:.1f}",
        ]
    )

    notes = [
        f"Image: `{args.image}` ({archive_src.stat().st_size / 1e6:.0f} MB oci-archive); "
        f"median of {args.repeat} runs on {os.cpu_count()} cores; blob cache disabled for hpcsif, "
        "Apptainer's cache emptied before each run. Peak RSS is the largest single process."
    ]
    hz = results[("hpcsif", "zstd")][0].seconds
    notes.append(
        f"- hpcsif zstd / input decompression: {hz / decomp:.2f}x with Python's zlib, "
        f"{hz / decomp_cli:.2f}x with `gzip -dc` (goal <= 1.5x)"
    )
    if app:
        az, ag = results[("apptainer", "zstd")], results[("apptainer", "gzip")]
        hg = results[("hpcsif", "gzip")]
        notes += [
            f"- hpcsif zstd / Apptainer zstd: {hz / az[0].seconds:.2f}x (goal <= 0.6x)",
            f"- hpcsif zstd / Apptainer default gzip: {hz / ag[0].seconds:.2f}x (goal <= 0.2x)",
            f"- hpcsif gzip / Apptainer gzip: {hg[0].seconds / ag[0].seconds:.2f}x (goal <= 0.8x)",
            f"- SIF size hpcsif / Apptainer: zstd {results[('hpcsif', 'zstd')][1] / az[1]:.3f}, "
            f"gzip {hg[1] / ag[1]:.3f} (goal within 5%)",
        ]
    else:
        notes.append("- Apptainer not installed: no peer figures (see shared/peer/).")
    write_table("convert", "Conversion benchmark", ["tool", "wall s", "peak RSS MB", "SIF MB"], rows, notes)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
