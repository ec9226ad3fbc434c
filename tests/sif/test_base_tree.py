"""Apptainer's base tree (/dev, /proc, /var/tmp, /.exec …) goes under every image.

It fills only what the image lacks: the image's own /tmp, /etc/hosts or /var symlink win.
Without /var/tmp, ``apptainer exec`` of a busybox-style image warns on every run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hpcsif.convert import convert_ref
from hpcsif.sif.metadata import BASE_TREE
from tests.image.tarbuild import d, file, layer, oci_layout, squash_and_unpack, sym
from tests.sif.test_interop_format import APPTAINER, BUSYBOX


def test_base_tree_fills_only_what_the_image_lacks(tmp_path: Path):
    lay = layer(
        tmp_path, [d("tmp", 0o1777), file("etc/hosts", "mine"), sym("var", "private/var"), file("a", "1")]
    )
    root, _ = squash_and_unpack([lay], tmp_path, extra=BASE_TREE)
    for p in ("dev", "proc", "sys", "home", "root"):
        assert (root / p).is_dir() and not (root / p).is_symlink(), p
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (root / "etc/hosts").read_text() == "mine"
    # the image's /etc/hosts is kept; the resolv.conf it lacks is added empty, as Apptainer adds it
    assert (root / "etc/resolv.conf").read_text() == ""
    assert os.readlink(root / "var") == "private/var"  # not replaced by the base /var/tmp
    assert os.readlink(root / ".exec") == ".singularity.d/actions/exec"
    assert os.readlink(root / "singularity") == ".singularity.d/runscript"


@pytest.mark.peer
@pytest.mark.slow
@pytest.mark.skipif(APPTAINER is None, reason="neither apptainer nor peer-apptainer on PATH")
def test_apptainer_runs_our_sif_without_mount_warnings(tmp_path: Path):
    if not os.path.exists(BUSYBOX):
        pytest.skip("needs busybox-static")
    blob = tmp_path / "blobs"
    blob.mkdir()
    lay = layer(blob, [file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755), sym("bin/sh", "busybox")])
    sif = convert_ref(f"oci://{oci_layout(tmp_path / 'img', [lay])}", tmp_path / "bb.sif")
    run = subprocess.run(
        [APPTAINER, "exec", sif, "/bin/sh", "-c", "echo ok"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout == "ok\n", run.stderr
    assert "Skipping mount" not in run.stderr, run.stderr
