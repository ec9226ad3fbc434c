"""Running a SIF from a temporary sandbox, as Apptainer 1.4 does: ``--unsquash``, and by itself
where squashfuse is not installed (expectations are ``peer-apptainer``'s lines)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.engine.conftest import (
    Images,
    as_user,
    build_rootfs,
    catch_child,
    ext3_image,
    hpcsif_cmd,
    make_sif,
)
from tests.services.users import open_dev_fuse

pytestmark = pytest.mark.slow

CONVERTING = "INFO:    Converting SIF file to temporary sandbox...\n"
CLEANING = "INFO:    Cleaning up image...\n"
NO_SQUASHFUSE = "INFO:    squashfuse not found, will not be able to mount SIF or other squashfs files\n"


def test_unsquash_runs_from_a_temporary_sandbox_and_removes_it(run, images: Images, pub_tmp: Path) -> None:
    """``--unsquash``: the image is unpacked below the temporary directory, the container is that
    directory (``$APPTAINER_CONTAINER`` names it), and it is gone when the container ends; no
    FUSE mount is made (the ``run`` fixture checks). The exit status is the payload's."""
    script = 'echo "$APPTAINER_CONTAINER"; cat /etc/group; exit 42'
    env = {"APPTAINER_TMPDIR": str(pub_tmp)}
    res = run("exec", "--unsquash", str(images.sif), "sh", "-c", script, env=env)
    assert res.returncode == 42, res.stderr
    assert res.stderr == CONVERTING + CLEANING
    where, group = res.stdout.split("\n", 1)
    assert re.fullmatch(rf"{pub_tmp}/rootfs-[^/]+/root", where)
    assert group.startswith("root:x:0:\n")
    assert not os.listdir(pub_tmp)
    res = run("-q", "run", "--unsquash", str(images.sif), "a b", env=env)
    assert (res.returncode, res.stderr) == (0, "")
    assert not os.listdir(pub_tmp)


def test_without_squashfuse_the_sif_is_unpacked(images: Images, pub_tmp: Path, tmp_path: Path) -> None:
    """squashfuse not installed: Apptainer's note, then a temporary sandbox (hpcsif failed); with
    ``unsquashfs`` missing too, the error names squashfuse's Debian package."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bwrap", "unsquashfs"):
        (bindir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bindir), "HPCSIF_TMPDIR": str(pub_tmp)}
    cmd = hpcsif_cmd("exec", str(images.sif), "cat", "/etc/passwd")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("root:x:0:0:root:/root:/bin/sh\n")
    assert res.stderr == NO_SQUASHFUSE + CONVERTING + CLEANING
    assert not os.listdir(pub_tmp)
    (bindir / "unsquashfs").unlink()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 255
    assert "install the Debian package 'squashfuse'" in res.stderr
    assert not os.listdir(pub_tmp)


def test_locked_directories_and_device_nodes(run, img_dir: Path, pub_tmp: Path) -> None:
    """An image with a directory its owner may not write (0500) and a device node: a user's
    sandbox lacks the node (one warning; only root may make one), and both are removed."""
    tree = img_dir / "tree"
    build_rootfs(tree)
    (tree / "opt/locked").mkdir()
    (tree / "opt/locked/file").write_text("inside\n")
    (tree / "opt/locked").chmod(0o500)
    os.mknod(tree / "opt/null", 0o666 | 0o020000, os.makedev(1, 3))
    sif = make_sif(tree, img_dir / "locked.sif")
    script = "cat /opt/locked/file; test -c /opt/null && echo node"
    res = run("exec", "--unsquash", str(sif), "sh", "-c", script)
    user = run.user is not None
    assert res.returncode == (1 if user else 0), res.stderr
    assert res.stdout == ("inside\n" if user else "inside\nnode\n")
    warning = f"WARNING: {sif}: device nodes in the image were not created (only root can make them)\n"
    assert res.stderr == CONVERTING + (warning if user else "") + CLEANING
    env = {"HPCSIF_TMPDIR": str(pub_tmp)}
    assert run("exec", "--unsquash", str(sif), "true", env=env).returncode == 0
    assert not os.listdir(pub_tmp)


def test_sigterm_still_removes_the_sandbox(images: Images, pub_tmp: Path) -> None:
    """scancel's SIGTERM reaches the payload, and the sandbox is removed after it ends."""
    env = {**os.environ, "HPCSIF_TMPDIR": str(pub_tmp)}
    cmd = hpcsif_cmd("exec", "--unsquash", str(images.sif), "sleep", "60")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert catch_child(proc.pid, "bwrap", stop=False)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.endswith(CLEANING)
    assert not os.listdir(pub_tmp)


def test_what_cannot_be_unpacked(images: Images, img_dir: Path, pub_tmp: Path) -> None:
    """An ext3 image cannot be unpacked (Apptainer's lines); ``--writable`` writes into the
    sandbox, thrown away at the end, as Apptainer's. Nothing is left."""
    env = {**os.environ, "HPCSIF_TMPDIR": str(pub_tmp)}
    ext3 = ext3_image(images.sandbox, img_dir / "root.img")
    res = subprocess.run(
        hpcsif_cmd("exec", "--unsquash", str(ext3), "true"),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 255
    assert res.stderr == (
        f"{CONVERTING}"
        f'ERROR:   File "{ext3}" is an ext3 format container image.\n'
        "ERROR:   Only SIF and squashfs images can be extracted in unprivileged mode.\n"
        "ERROR:   Use `apptainer build` to convert this image to a SIF file"
        " using a setuid install of Apptainer.\n"
        f"FATAL:   while extracting {ext3}: not a squashfs root filesystem\n"
    )
    script = "echo new > /opt/new; cat /opt/new"
    cmd = hpcsif_cmd("exec", "--unsquash", "-w", str(images.sif), "sh", "-c", script)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert (res.returncode, res.stdout) == (0, "new\n"), res.stderr
    assert res.stderr.startswith(CONVERTING) and res.stderr.endswith(CLEANING)
    assert not os.listdir(pub_tmp)


def test_user_without_dev_fuse(unpriv_user, images: Images, pub_tmp: Path) -> None:
    """/dev/fuse closed to users (mode 0600, as on some nodes): the mount's error says what an
    admin can do and that ``--unsquash`` runs the SIF without it, which it then does."""
    cmd, env = as_user(unpriv_user, hpcsif_cmd("exec", str(images.sif), "id", "-u"))
    env["HPCSIF_TMPDIR"] = str(pub_tmp)
    os.chmod("/dev/fuse", 0o600)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=unpriv_user.home)
        assert res.returncode == 255
        assert res.stderr.endswith(
            "(/dev/fuse is not usable by this user: an admin must make it mode 0666,"
            " or run a SIF with --unsquash)\n"
        )
        cmd.insert(cmd.index("exec") + 1, "--unsquash")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=unpriv_user.home)
        assert (res.returncode, res.stdout, res.stderr) == (0, f"{unpriv_user.uid}\n", CONVERTING + CLEANING)
    finally:
        open_dev_fuse()
    assert not os.listdir(pub_tmp)
