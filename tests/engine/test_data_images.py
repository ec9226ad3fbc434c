"""Image binds (``-B img:/dst:image-src=/p,id=N``, ``--mount …,image-src=``) and overlay image
files (``--overlay x.sqfs``, ``--overlay x.img:ro``), as Apptainer 1.4 mounts them
(hpcsif.engine.data_images): squashfs read-only, ext3 writable by whoever may write the file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.engine.conftest import ext3_image, hpcsif_cmd

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("fuse2fs"), reason="fuse2fs is not installed"),
]

LS = "ls /mnt/d; touch /mnt/d/new 2>/dev/null && echo written || echo read-only"


@pytest.fixture
def data(img_dir: Path) -> dict[str, Path]:
    """The same tree (``sub/f.txt``) as a squashfs file, an ext3 file and a SIF's data partition,
    and an ext3 overlay image whose ``upper/`` holds ``ovdir/o.txt``."""
    tree = img_dir / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/f.txt").write_text("hello\n")
    sqfs = img_dir / "data.sqfs"
    subprocess.run(["mksquashfs", str(tree), str(sqfs), "-quiet", "-no-progress"], check=True)
    sqfs.chmod(0o644)
    sif = img_dir / "data.sif"
    for args in (["new", str(sif)], ["add", "--datatype", "4", "--parttype", "3", "--partfs", "1"]):
        if args[0] == "add":
            args += ["--partarch", "2", str(sif), str(sqfs)]
        subprocess.run(hpcsif_cmd("sif", *args), check=True, capture_output=True)
    sif.chmod(0o644)
    over = img_dir / "over"
    (over / "upper/ovdir").mkdir(parents=True)
    (over / "work").mkdir()
    (over / "upper/ovdir/o.txt").write_text("from the overlay\n")
    return {
        "sqfs": sqfs,
        "ext3": ext3_image(tree, img_dir / "data.ext3"),
        "sif": sif,
        "overlay": ext3_image(over, img_dir / "over.ext3"),
    }


def test_image_binds(run, images, data, request):
    sqfs, ext3, sif = data["sqfs"], data["ext3"], data["sif"]
    res = run("exec", "-B", f"{sqfs}:/mnt/d:image-src=/sub", str(images.sif), "sh", "-c", LS)
    assert (res.returncode, res.stdout) == (0, "f.txt\nread-only\n"), res.stderr
    assert res.stderr == f"WARNING: Data image {sqfs} is not writable, proceeding with read-only\n"
    # a SIF's data partition (the first one, or id=N): read-only without a warning
    res = run("exec", "-B", f"{sif}:/mnt/d:image-src=sub", str(images.sif), "sh", "-c", LS)
    assert (res.returncode, res.stdout, res.stderr) == (0, "f.txt\nread-only\n", "")
    res = run("exec", "-B", f"{sif}:/mnt/d:id=1", str(images.sif), "ls", "/mnt/d")
    assert (res.returncode, res.stdout) == (0, "sub\n"), res.stderr
    res = run("exec", "-B", f"{sif}:/mnt/d:id=9", str(images.sif), "true")
    assert (res.returncode, res.stderr) == (
        255,
        f"FATAL:   container creation failed: no data partition found in {sif}\n",
    )
    # ext3: writable by root (the file is root's), read-only with the warning for another user
    spec = f"type=bind,src={ext3},dst=/mnt/d,image-src=/sub"
    res = run("exec", "--mount", spec, str(images.sif), "sh", "-c", LS)
    if request.node.callspec.params["run"] == "root":
        assert (res.returncode, res.stdout, res.stderr) == (0, "f.txt\nwritten\n", "")
        res = run("exec", "-B", f"{ext3}:/mnt/d:image-src=/sub,ro", str(images.sif), "sh", "-c", LS)
        assert (res.returncode, res.stdout) == (0, "f.txt\nnew\nread-only\n"), res.stderr  # kept in the file
    else:
        assert (res.returncode, res.stdout) == (0, "f.txt\nread-only\n"), res.stderr
        assert "WARNING: Data image" in res.stderr
    # what is not there, or not an image, is one line
    res = run("exec", "-B", f"{sqfs}:/mnt/d:image-src=/nope,ro", str(images.sif), "true")
    assert res.returncode == 255
    assert res.stderr.endswith(f"returns error: /nope doesn't exist in image {sqfs}\n")
    for src, why in (
        (images.sif, "no data partition found in"),
        (data["sqfs"].parent, "not supported image format"),
    ):
        res = run("exec", "-B", f"{src}:/mnt/d:image-src=/", str(images.sif), "true")
        assert res.returncode == 255 and why in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr


def test_overlay_image_files_are_read_only_layers(run, images, data):
    probe = "cat /sub/f.txt /ovdir/o.txt 2>/dev/null; touch /x 2>/dev/null && echo written || echo read-only"
    res = run(
        "exec",
        "--overlay",
        f"{data['sqfs']}:ro",
        "--overlay",
        f"{data['overlay']}:ro",
        str(images.sif),
        "sh",
        "-c",
        probe,
    )
    assert (res.returncode, res.stdout, res.stderr) == (0, "hello\nfrom the overlay\nread-only\n", "")
    # squashfs cannot be written: Apptainer's warning; with --writable-tmpfs the top is writable
    res = run("exec", "--writable-tmpfs", "--overlay", str(data["sqfs"]), str(images.sif), "sh", "-c", probe)
    assert (res.returncode, res.stdout) == (0, "hello\nwritten\n"), res.stderr
    assert res.stderr == f"WARNING: Overlay image {data['sqfs']} is not writable, proceeding with read-only\n"
    # an ext3 overlay image without :ro is the writable top (for who may write the file): what
    # is written there stays
    res = run("exec", "--overlay", str(data["overlay"]), str(images.sif), "sh", "-c", "echo w > /ovdir/w")
    if run.user is not None:
        assert res.returncode == 255 and res.stderr.endswith(": permission denied\n"), res.stderr
        return
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    ro = f"{data['overlay']}:ro"
    res = run("exec", "--overlay", ro, str(images.sif), "cat", "/ovdir/o.txt", "/ovdir/w")
    assert (res.returncode, res.stdout) == (0, "from the overlay\nw\n"), res.stderr


@pytest.mark.peer
def test_image_binds_and_overlays_as_apptainer(apptainer, images, data, tmp_path):
    """The same binds and overlays, in Apptainer and in hpcsif: the same listing, the same errors
    on writing (the files copied to /tmp, which the peer sees)."""
    files = {k: Path(shutil.copy(v, tmp_path / v.name)) for k, v in data.items()}
    sif = shutil.copy(images.sif, tmp_path / "busybox.sif")
    for args in (
        ["-B", f"{files['sqfs']}:/mnt/d:image-src=/sub"],
        ["-B", f"{files['sif']}:/mnt/d:image-src=/,id=1"],
        ["--mount", f"src={files['ext3']},dst=/mnt/d,image-src=/sub,ro"],
        ["--overlay", f"{files['overlay']}:ro"],
    ):
        cmd = [*args, str(sif), "sh", "-c", "ls /mnt/d /ovdir 2>&1; touch /mnt/d/x 2>&1"]
        ours = subprocess.run(hpcsif_cmd("exec", *cmd), capture_output=True, text=True, cwd=tmp_path)
        theirs = subprocess.run([apptainer, "exec", *cmd], capture_output=True, text=True, cwd=tmp_path)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), args
