"""The launcher's ELF loader check is skipped for the program hpcsif found runnable in the image
beforehand (``__HPCSIF_RUNS``, hpcsif/engine/bwrap_command.py ``_runs_as_is``), and only for it: a host
file bound over that path is still checked, and the hint never reaches the payload."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.engine.conftest import Images

pytestmark = pytest.mark.slow


def _without_loader(dest: Path) -> Path:
    """A copy of the host's ``true`` whose ELF loader does not exist anywhere."""
    true = Path(os.path.realpath(shutil.which("true"))).read_bytes()
    loader = b"/lib64/ld-linux-x86-64.so.2\0"
    if loader not in true:
        pytest.skip("the host's programs have another loader")
    dest.write_bytes(true.replace(loader, b"/lib64/ld-nothere-x86-6.so.2\0"))
    dest.chmod(0o755)
    return dest


def test_the_hint_covers_the_image_program_only(run, images: Images, pub_tmp: Path) -> None:
    res = run("exec", str(images.sif), "sh", "-c", "env | grep -c __HPCSIF || true")
    assert (res.returncode, res.stdout, res.stderr) == (0, "0\n", "")
    assert run("exec", str(images.sif), "true").returncode == 0  # (static busybox: hinted)
    # the same path, a host program without its loader bound over it: checked, and refused
    broken = _without_loader(pub_tmp / "broken")
    missing = "FATAL:   exec /bin/true failed: a shared library is likely missing in the image\n"
    for command in ("true", "/bin/true"):
        res = run("exec", "-B", f"{broken}:/bin/true", str(images.sif), command)
        assert (res.returncode, res.stdout, res.stderr) == (255, "", missing)
