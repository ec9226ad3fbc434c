"""Image files other than a plain SIF, run as Apptainer 1.4 runs them (hpcsif.engine.image_files).

* a SIF with an ext3 overlay partition: what ``exec --writable`` wrote there is seen on every
  start (read-only, through fuse2fs and fuse-overlayfs);
* a bare squashfs file and a bare ext3 image file;
* a SIF built for an architecture this host cannot run: Apptainer's one line, before any mount.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from hpcsif.image.model import host_arch
from tests.conftest import peer_apptainer
from tests.engine.conftest import RUNTIME, catch_child, ext3_image, hpcsif_cmd

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("fuse2fs"), reason="fuse2fs is not installed"),
]


def _fatal(proc: subprocess.CompletedProcess) -> str:
    """The one FATAL line of a failed run (and nothing else on stderr)."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("FATAL:   "), proc.stderr
    return lines[0].removeprefix("FATAL:   ")


def _overlay_sif(images, dest: Path) -> Path:
    """The test SIF plus an ext3 overlay partition laid out as ``apptainer overlay create`` and
    ``exec --writable`` leave it: upper/ holds a new file, a changed runscript and whiteouts."""
    from hpcsif.sif.format import DataType, FSType, PartType
    from hpcsif.sif.writer import ObjectSpec, add_objects

    tree = dest.parent / f"{dest.stem}-tree"
    (tree / "upper/.singularity.d").mkdir(parents=True)
    (tree / "upper/bin").mkdir()
    (tree / "work/work").mkdir(parents=True)
    (tree / "upper/new").write_text("written with --writable\n")
    runscript = tree / "upper/.singularity.d/runscript"
    runscript.write_text("#!/bin/sh\necho changed runscript\n")
    runscript.chmod(0o755)
    for gone in ("bin/vi", "opt"):  # overlayfs whiteouts: a file and a directory deleted
        os.mknod(tree / "upper" / gone, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    shutil.copy(images.sif, dest)
    spec = ObjectSpec(
        DataType.PARTITION,
        path=ext3_image(tree, dest.with_suffix(".ext3")),
        fstype=FSType.EXT3,
        parttype=PartType.OVERLAY,
    )
    add_objects(dest, [spec])
    dest.chmod(0o644)
    return dest


def _our_mounts() -> list[str]:
    """FUSE mounts under this session's runtime directories, fuse2fs's included."""
    with open("/proc/mounts") as f:
        return [ln for ln in f if any(f" {d}/" in ln for d in RUNTIME.values())]


def _our_daemons() -> list[str]:
    """Live fuse2fs, fuse-overlayfs, squashfuse and watchdog processes of this session."""
    out = subprocess.run(["ps", "-ww", "-eo", "stat,args"], capture_output=True, text=True).stdout
    return [
        ln
        for ln in out.splitlines()[1:]
        if "Z" not in ln.split()[0]
        and any(str(d) in ln for d in RUNTIME.values())
        and any(p in ln for p in ("fuse2fs", "fuse-overlayfs", "squashfuse", "hpcsif.engine.mounts"))
    ]


def _wait_clean(seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while (_our_mounts() or _our_daemons()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _our_mounts() and not _our_daemons(), (_our_mounts(), _our_daemons())


def test_sif_overlay_partition_is_the_top_read_only_layer(run, images, img_dir):
    sif = _overlay_sif(images, img_dir / "overlay.sif")
    script = "cat /new; ls /bin/vi /opt 2>&1; touch /x 2>&1; ls /bin/sh"
    res = run("exec", str(sif), "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "written with --writable"
    assert "No such file or directory" in lines[1] and "No such file or directory" in lines[2]
    assert "Read-only file system" in lines[3] and lines[4] == "/bin/sh"
    assert res.stderr == ""
    assert run("run", str(sif)).stdout == "changed runscript\n"
    # a writable tmpfs stacks over it; what is written there goes with the container
    res = run("exec", "--writable-tmpfs", str(sif), "sh", "-c", "echo more >> /new && cat /new")
    assert res.stdout == "written with --writable\nmore\n", res.stderr
    assert run("exec", str(sif), "cat", "/new").stdout == "written with --writable\n"
    # --writable writes into the partition, for every later start; a user needs write access
    res = run("exec", "--writable", str(sif), "sh", "-c", "echo y > /y; rm /new")
    if run.user is not None:
        assert (
            _fatal(res)
            == f"while loading overlay images: failed to open overlay image {sif}: permission denied"
        )
        return
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    assert run("exec", str(sif), "sh", "-c", "cat /y; ls /new 2>&1").stdout.startswith("y\nls: /new: No such")
    _wait_clean()


def test_overlay_partition_without_fuse2fs_is_ignored_with_one_warning(images, img_dir):
    sif = _overlay_sif(images, img_dir / "nofuse2fs.sif")
    bindir = img_dir / "bin"
    bindir.mkdir()
    for tool in ("bwrap", "squashfuse_ll", "squashfuse", "fusermount3", "fusermount", "fuse-overlayfs"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    res = subprocess.run(
        hpcsif_cmd("exec", str(sif), "sh", "-c", "cat /new 2>/dev/null || echo missing"),
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(bindir)},
        timeout=60,
    )
    assert (res.returncode, res.stdout.splitlines()[-1]) == (0, "missing"), res.stderr
    (warning,) = res.stderr.splitlines()
    assert warning.startswith(f"WARNING: ignoring the overlay partition of {sif}")
    assert "fuse2fs not found, install the Debian package 'fuse2fs'" in warning
    _wait_clean()


def test_overlay_partition_that_is_no_ext3_file_system_is_ignored_with_one_warning(images, img_dir):
    from hpcsif.sif.reader import SIFImage

    sif = _overlay_sif(images, img_dir / "damaged.sif")
    with SIFImage.open(sif) as img:
        superblock = img.overlay_partition().offset + 1024
    with open(sif, "r+b") as f:
        os.pwrite(f.fileno(), bytes(1024), superblock)
    res = subprocess.run(
        hpcsif_cmd("exec", str(sif), "sh", "-c", "cat /new 2>/dev/null || echo missing"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (res.returncode, res.stdout) == (0, "missing\n"), res.stderr
    assert res.stderr == f"WARNING: ignoring the overlay partition of {sif}: not a valid ext3 file system\n"
    _wait_clean()


def test_overlay_mounts_are_shared_by_8_execs_and_go_after_sigkill(images, img_dir):
    sif = _overlay_sif(images, img_dir / "shared.sif")
    gate = img_dir / "go"
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done; cat /new"
    procs = [
        subprocess.Popen(hpcsif_cmd("exec", str(sif), "sh", "-c", script), stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(_our_mounts()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # all eight are up (or would have added mounts)
        kinds = sorted(ln.split()[0] for ln in _our_mounts())
    finally:
        gate.touch()
    assert kinds == [str(sif), "fuse-overlayfs", "squashfuse_ll"], kinds  # (fuse2fs names the image)
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8
    assert outs == ["written with --writable\n"] * 8
    _wait_clean()
    # a launcher killed outright: the watchdogs unmount all three
    victim = subprocess.Popen(hpcsif_cmd("exec", str(sif), "sleep", "600"))
    deadline = time.monotonic() + 60
    while len(_our_mounts()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _wait_clean()


def test_a_launcher_killed_while_it_mounts_leaves_no_mount(images, img_dir):
    """SIGKILL while fuse-overlayfs mounts (the command held stopped until then): its mount
    is there after the launcher is gone, and its watchdog unmounts it, the lower mounts too."""
    sif = _overlay_sif(images, img_dir / "killed.sif")
    for _ in range(10):  # (a command that ends before it is seen cannot be held)
        victim = subprocess.Popen(hpcsif_cmd("exec", str(sif), "true"))
        mounter = catch_child(victim.pid, "fuse-overlayfs")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        if mounter:
            os.kill(mounter, signal.SIGCONT)
        _wait_clean()
        if mounter:
            return
    pytest.fail("fuse-overlayfs was never seen mounting")


def test_bare_squashfs_file(run, images, img_dir):
    sqfs = img_dir / "root.sqfs"
    subprocess.run(["mksquashfs", str(images.sandbox), str(sqfs), "-quiet", "-no-progress"], check=True)
    sqfs.chmod(0o644)
    res = run("exec", str(sqfs), "cat", "/etc/group")
    assert (res.returncode, res.stdout.splitlines()[0]) == (0, "root:x:0:"), res.stderr
    assert run("run", str(sqfs)).stdout == "<default cmd>\n"
    res = run("test", str(sqfs))
    assert (res.returncode, res.stdout) == (3, "image test ran\n")
    assert run("shell", str(sqfs), stdin="echo from shell\n").stdout == "from shell\n"
    res = run("exec", "--writable-tmpfs", str(sqfs), "sh", "-c", "touch /x && ls /x")
    assert res.stdout == "/x\n", res.stderr
    assert _fatal(run("exec", "--writable", str(sqfs), "true")) == (
        f"could not set {sqfs} image writable: squashfs is a read-only filesystem"
    )
    damaged = img_dir / "damaged.sqfs"
    damaged.write_bytes(sqfs.read_bytes()[:4096])
    damaged.chmod(0o644)
    assert "not a valid squashfs file system" in _fatal(run("exec", str(damaged), "true"))


def test_bare_ext3_image_is_read_only(run, images, img_dir):
    ext3 = ext3_image(images.sandbox, img_dir / "root.ext3", size_mb=16)
    before = ext3.read_bytes()
    res = run("exec", str(ext3), "sh", "-c", "cat /etc/group; touch /x 2>&1")
    assert res.returncode == 1 and res.stdout.splitlines()[0] == "root:x:0:", res.stderr
    assert "Read-only file system" in res.stdout
    assert run("run", str(ext3)).stdout == "<default cmd>\n"
    assert _fatal(run("exec", "--writable", str(ext3), "true")).startswith(
        "--writable with an ext3 image file is not supported by hpcsif: use it as --overlay IMG"
    )
    assert ext3.read_bytes() == before
    # a journal left to replay (apptainer --writable killed) is ignored: the image is read only
    subprocess.run(
        ["debugfs", "-w", "-R", "feature needs_recovery", str(ext3)], capture_output=True, check=True
    )
    assert run("exec", str(ext3), "cat", "/etc/group").stdout.startswith("root:x:0:\n")
    damaged = img_dir / "damaged.ext3"
    damaged.write_bytes(before[:2048] + b"\xff" * (64 << 10) + before[2048 + (64 << 10) :])
    damaged.chmod(0o644)
    assert (
        _fatal(run("exec", str(damaged), "true"))
        == f"{damaged}: its ext3 file system cannot be read (Input/output error)"
    )
    # as Apptainer: only ext3's features (an ext4 or a journal-less ext2 file system is refused)
    for kind in ("ext4", "ext2"):
        other = ext3_image(images.sandbox, img_dir / f"root.{kind}", size_mb=16, kind=kind)
        assert (
            _fatal(run("exec", str(other), "true"))
            == f"could not open image {other}: file is not a valid ext3 image"
        )


@pytest.mark.skipif(host_arch() != "amd64", reason="arm64 must be foreign here")
def test_foreign_architecture_sif_is_refused_before_mounting(run, images, img_dir):
    from hpcsif.sif.arch import can_run
    from hpcsif.sif.format import DataType, FSType, PartType
    from hpcsif.sif.reader import SIFImage
    from hpcsif.sif.writer import ObjectSpec, write_sif

    if can_run("arm64"):
        pytest.skip("this host runs arm64 binaries (binfmt_misc)")
    part = img_dir / "part.sqfs"
    with SIFImage.open(images.sif) as img, open(part, "wb") as out:
        img.copy_object(img.primary_partition(), out)
    sif = img_dir / "arm64.sif"
    write_sif(
        sif,
        [ObjectSpec(DataType.PARTITION, path=part, fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS)],
        arch="arm64",
    )
    sif.chmod(0o644)
    for action in ("exec", "run"):
        proc = run(action, str(sif), "true")
        assert _fatal(proc) == f"{sif}: the image's architecture (arm64) could not run on the host's (amd64)"
        assert proc.returncode == 255


APPTAINER = peer_apptainer()


@pytest.mark.peer
@pytest.mark.skipif(APPTAINER is None, reason="neither apptainer nor peer-apptainer on PATH")
def test_what_apptainer_writes_into_its_overlay_partition(images, tmp_path):
    """``apptainer overlay create`` + ``exec --writable``: new files, deletions and a directory made
    anew (opaque) are seen by our plain exec as by Apptainer's."""
    work = Path(shutil.copy(images.sif, Path("/tmp") / f"{tmp_path.name}-peer.sif"))  # the peer sees /tmp
    try:

        def peer(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([APPTAINER, *args], capture_output=True, text=True, timeout=120, check=True)

        peer("overlay", "create", "--size", "64", str(work))
        peer(
            "exec",
            "--writable",
            str(work),
            "sh",
            "-c",
            "touch /new; rm /bin/vi; rm -r /opt; mkdir /opt; touch /opt/o",
        )
        script = "ls /new /opt; ls /bin/vi 2>&1"
        ours = subprocess.run(
            hpcsif_cmd("exec", str(work), "sh", "-c", script), capture_output=True, text=True
        )
        theirs = subprocess.run(
            [APPTAINER, "exec", str(work), "sh", "-c", script], capture_output=True, text=True
        )
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), ours.stderr
        assert ours.stdout.startswith("/new\n\n/opt:\no\n")
    finally:
        work.unlink()
    _wait_clean()


@pytest.mark.peer
@pytest.mark.skipif(APPTAINER is None, reason="neither apptainer nor peer-apptainer on PATH")
def test_inspect_bare_files_as_apptainer(images):
    """inspect and run-help of a bare squashfs and ext3 file print what Apptainer prints, and
    leave no mount behind."""
    work = Path(tempfile.mkdtemp(dir="/tmp"))  # the peer sees /tmp
    try:
        sqfs = work / "root.sqfs"
        subprocess.run(["mksquashfs", str(images.sandbox), str(sqfs), "-quiet", "-no-progress"], check=True)
        for image in (sqfs, ext3_image(images.sandbox, work / "root.ext3", size_mb=16)):
            for args in (["inspect"], ["inspect", "--json", "--all"], ["inspect", "-r", "-e"], ["run-help"]):
                ours = subprocess.run(hpcsif_cmd(*args, str(image)), capture_output=True, text=True)
                theirs = subprocess.run([APPTAINER, *args, str(image)], capture_output=True, text=True)
                assert (ours.returncode, ours.stdout, ours.stderr) == (0, theirs.stdout, ""), (image, args)
                if args == ["inspect"]:
                    assert "org.label-schema.schema-version: 1.0\n" in ours.stdout
    finally:
        shutil.rmtree(work)
    _wait_clean()
