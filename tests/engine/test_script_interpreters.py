"""The runscript, the test script and exec'd scripts run by their own ``#!`` line, and one whose
interpreter the image lacks fails with Apptainer 1.4's line (status 255), as root and as a user."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.engine.conftest import hpcsif_cmd

pytestmark = pytest.mark.slow

MISSING = "FATAL:   exec {} failed: a shared library is likely missing in the image\n"


@pytest.fixture(scope="module")
def scripted(images) -> Path:
    """The busybox image with a runscript for a missing interpreter and a ``#!/bin/cat`` test
    (in the test images' directory, which the test user can read)."""
    work = Path(tempfile.mkdtemp(dir=images.base))
    work.chmod(0o755)
    deffile = work / "img.def"
    deffile.write_text(
        f"Bootstrap: localimage\nFrom: {images.sif}\n\n"
        "%runscript\n#!/bin/no-such-shell\necho never\n\n"
        "%test\n#!/bin/cat\nthis file is the output\n"
    )
    sif = work / "img.sif"
    subprocess.run(hpcsif_cmd("build", str(sif), str(deffile)), check=True, capture_output=True)
    sif.chmod(0o644)
    return sif


def test_scripts_run_by_their_own_interpreter(run, scripted):
    res = run("test", str(scripted))  # (cat prints the script: the section as Apptainer writes it)
    assert (res.returncode, res.stdout, res.stderr) == (0, "#!/bin/cat\n\nthis file is the output\n\n", "")
    for args, path in (
        (["run", str(scripted)], "/.singularity.d/runscript"),
        (["exec", str(scripted), "/.singularity.d/runscript"], "/.singularity.d/runscript"),
    ):
        res = run(*args)
        assert (res.returncode, res.stdout, res.stderr) == (255, "", MISSING.format(path)), args
