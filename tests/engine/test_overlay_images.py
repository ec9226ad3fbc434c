"""Writable ext3 overlay images (hpcsif/engine/overlay_images.py), as Apptainer's persistent
overlays: ``overlay create``, ``--overlay IMG`` written into, ``--writable`` on a SIF with an
overlay partition, one writer at a time (Apptainer's locks), and what Apptainer reads there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import peer_apptainer
from tests.engine.conftest import fuse_mounts, hpcsif_cmd, left_behind

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("fuse2fs", "fuse-overlayfs", "mkfs.ext3", "debugfs")),
        reason="fuse2fs, fuse-overlayfs or e2fsprogs is not installed",
    ),
]

APPTAINER = peer_apptainer()
#: deletions and a directory made anew (opaque), then what a later container sees of them
CHANGE = "echo new > /new; rm /bin/vi; rm -r /opt; mkdir /opt; touch /opt/o; mkdir -p /opt/n/m"
LOOK = "cat /new; ls /opt; ls /bin/vi 2>&1"
LOOKED = "new\nn\no\nls: /bin/vi: No such file or directory\n"


def hpcsif(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(hpcsif_cmd(*args), capture_output=True, text=True, timeout=120, **kw)


def fatal(proc: subprocess.CompletedProcess) -> str:
    """The one FATAL line of a run that failed with status 255."""
    assert proc.returncode == 255, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("FATAL:   "), proc.stderr
    return lines[0].removeprefix("FATAL:   ")


def listing(image: Path, path: str) -> dict[str, int]:
    """name -> mode of the entries of *path* in the ext3 file system *image* (debugfs)."""
    out = subprocess.run(["debugfs", "-R", f"ls -p {path}", str(image)], capture_output=True, text=True)
    entries = {}
    for line in out.stdout.splitlines():  # /inode/mode/uid/gid/name/size/
        fields = line.split("/")
        if len(fields) > 5 and fields[5] not in (".", ".."):
            entries[fields[5]] = int(fields[2], 8)
    return entries


def _write_locked(path: Path) -> bool:
    """Whether some process holds a write lock on *path* (/proc/locks)."""
    st = path.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    with open("/proc/locks") as f:
        return any(" WRITE " in line and inode in line for line in f)


def test_overlay_create_makes_apptainers_layout(tmp_path, images):
    img = tmp_path / "ov.img"
    assert hpcsif("overlay", "create", "--create-dir", "/data/in,rel", str(img)).returncode == 0
    st = img.stat()
    assert (st.st_size, st.st_mode & 0o777) == (64 << 20, 0o600)
    assert set(listing(img, "/")) == {"lost+found", "upper", "work"}
    assert set(listing(img, "/upper")) == {"data", "rel"} and set(listing(img, "/upper/data")) == {"in"}
    assert fatal(hpcsif("overlay", "create", str(img))) == f"EXT3 overlay image {img} already exists"
    small = tmp_path / "small.img"
    assert (
        fatal(hpcsif("overlay", "create", "-s", "32", str(small)))
        == "image size must be equal or greater than 64 MiB"
    )
    missing = tmp_path / "no" / "x.img"
    assert fatal(hpcsif("overlay", "create", str(missing))).startswith(
        f"cannot create the overlay image {missing}:"
    )
    assert sorted(os.listdir(tmp_path)) == ["ov.img"]  # nothing half-made beside it
    # a SIF gets an overlay partition, in the primary partition's group; one only
    sif = Path(shutil.copy(images.sif, tmp_path / "with-overlay.sif"))
    assert hpcsif("overlay", "create", "--sparse", str(sif)).returncode == 0
    listed = hpcsif("sif", "list", str(sif)).stdout
    assert "FS (Ext3/Overlay/" in listed, listed
    assert fatal(hpcsif("overlay", "create", str(sif))).startswith(
        f"a writable overlay partition already exists in {sif} (ID: "
    )


def test_a_writable_overlay_image_keeps_what_containers_write(run, pub_tmp, images):
    img = pub_tmp / "ov.img"
    assert run("overlay", "create", str(img)).returncode == 0
    res = run("exec", "--overlay", str(img), str(images.sif), "sh", "-c", CHANGE)
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    for spec in (str(img), f"{img}:ro"):
        res = run("exec", "--overlay", spec, str(images.sif), "sh", "-c", LOOK)
        assert (res.stdout, res.stderr) == (LOOKED, ""), res.stderr
    res = run("exec", "--overlay", f"{img}:ro", str(images.sif), "touch", "/x")
    assert res.returncode != 0 and "Read-only file system" in res.stderr
    upper = listing(img, "/upper/bin")
    if run.user is None:
        # as Apptainer's kernel overlay writes them: a 0/0 character device, an opaque attribute
        assert upper == {"vi": 0o20600}, upper
        assert listing(img, "/upper/opt") == {"o": 0o100644, "n": 0o40755}
        assert listing(img, "/upper/opt/n") == {"m": 0o40755}
        attrs = subprocess.run(
            ["debugfs", "-R", "ea_list /upper/opt", str(img)], capture_output=True, text=True
        )
        assert 'trusted.overlay.opaque (1) = "y"' in attrs.stdout, attrs.stdout
    else:
        assert ".wh.vi" in upper  # (a user may not make device nodes: fuse-overlayfs's own form)


def test_one_writer_at_a_time(img_dir, images):
    img = img_dir / "ov.img"
    assert hpcsif("overlay", "create", str(img)).returncode == 0
    writer = subprocess.Popen(hpcsif_cmd("exec", "--overlay", str(img), str(images.sif), "sleep", "30"))
    try:
        deadline = time.monotonic() + 30
        while not any("fuse-overlayfs" in m for m in fuse_mounts()):
            assert time.monotonic() < deadline and writer.poll() is None, "the writer never started"
            time.sleep(0.05)
        why = (
            f"while loading overlay images: failed to open overlay image {img}: "
            f"while locking ext3 partition from {img}: can't open {img} for "
        )
        res = hpcsif("exec", "--overlay", str(img), str(images.sif), "true")
        assert fatal(res) == why + "writing, currently in use by another process"
        res = hpcsif("exec", "--overlay", f"{img}:ro", str(images.sif), "true")
        assert fatal(res) == why + "reading, currently in use for writing by another process"
    finally:
        writer.kill()
        writer.wait()
    # the lock lives as long as the writable mount, which the killed writer's watchdog ends;
    # then readers and a writer are let in again
    assert not left_behind()
    assert hpcsif("exec", "--overlay", f"{img}:ro", str(images.sif), "true").returncode == 0
    assert hpcsif("exec", "--overlay", str(img), str(images.sif), "true").returncode == 0


def test_writable_writes_into_the_sifs_overlay_partition(img_dir, images):
    sif = Path(shutil.copy(images.sif, img_dir / "rw.sif"))
    assert (
        fatal(hpcsif("exec", "--writable", str(sif), "true"))
        == f"no SIF writable overlay partition found in {sif}"
    )
    assert hpcsif("overlay", "create", str(sif)).returncode == 0
    res = hpcsif("exec", "--writable", str(sif), "sh", "-c", CHANGE)
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    res = hpcsif("exec", str(sif), "sh", "-c", LOOK)
    assert (res.stdout, res.stderr) == (LOOKED, ""), res.stderr
    # one writable overlay at a time
    other = img_dir / "other.img"
    assert hpcsif("overlay", "create", str(other)).returncode == 0
    res = hpcsif("exec", "--writable", "--overlay", str(other), str(sif), "true")
    assert res.returncode != 0 and "only one writable overlay" in res.stderr


@pytest.mark.peer
@pytest.mark.skipif(APPTAINER is None, reason="neither apptainer nor peer-apptainer on PATH")
def test_apptainer_reads_what_we_wrote_and_shares_the_lock(images):
    work = Path(tempfile.mkdtemp(dir="/tmp"))  # the peer sees /tmp
    try:
        sif = Path(shutil.copy(images.sif, work / "img.sif"))
        img = work / "ov.img"
        assert hpcsif("overlay", "create", str(img)).returncode == 0
        assert hpcsif("exec", "--overlay", str(img), str(sif), "sh", "-c", CHANGE).returncode == 0
        theirs = subprocess.run(
            [APPTAINER, "exec", "--overlay", str(img), str(sif), "sh", "-c", LOOK],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert theirs.stdout == LOOKED, theirs.stderr
        # Apptainer writing: we are kept out, in its words
        holder = subprocess.Popen([APPTAINER, "exec", "--overlay", str(img), str(sif), "sleep", "10"])
        try:
            deadline = time.monotonic() + 60
            while not _write_locked(img):  # (until Apptainer holds its lock)
                assert time.monotonic() < deadline and holder.poll() is None, "Apptainer never locked it"
                time.sleep(0.05)
            res = hpcsif("exec", "--overlay", str(img), str(sif), "true")
            assert fatal(res).endswith(f"can't open {img} for writing, currently in use by another process")
        finally:
            holder.wait(timeout=120)  # (killing the peer's wrapper would leave Apptainer running)
    finally:
        shutil.rmtree(work)
