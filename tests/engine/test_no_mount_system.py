"""``--no-mount sys`` and ``--no-mount dev`` leave the image's own directories there, as in
Apptainer 1.4 (the guide's ``--no-mount tmp,sys,dev``), and the container still starts."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_no_mount_sys_and_dev(run, images):
    probe = "ls /sys | wc -l; ls /dev | wc -l"
    res = run("exec", "--no-mount", "tmp,sys,dev", str(images.sif), "sh", "-c", probe)
    # (the image's /sys and /dev are empty: no /dev/null either, in Apptainer's container too)
    assert (res.returncode, res.stdout, res.stderr) == (0, "0\n0\n", "")
    res = run("exec", "--no-mount", "sys", str(images.sif), "sh", "-c", "ls /sys | wc -l; ls /dev/null")
    assert (res.returncode, res.stdout, res.stderr) == (0, "0\n/dev/null\n", "")
