"""A SIF packed from a sandbox, or repacked from a SIF, records what Apptainer records.

``apptainer inspect -e/-H/-t`` and ``apptainer run-help`` read only the SIF's
``inspect-metadata.json`` object, so it must hold the image's environment, help, test,
startscript and apps, not just its labels and runscript.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hpcsif.sif.format import DataType
from hpcsif.sif.reader import SIFImage
from tests.conftest import run_cli
from tests.engine.conftest import build_rootfs

APPTAINER = shutil.which("apptainer") or shutil.which("peer-apptainer")
SD = "/.singularity.d"


def inspect_object(sif: Path) -> dict:
    """The attributes of the SIF's inspect-metadata.json object."""
    with SIFImage.open(sif) as img:
        found = img.find(DataType.GENERIC_JSON, "inspect-metadata.json")
        return json.loads(img.read_object(found[0]))["data"]["attributes"]


@pytest.fixture(scope="module")
def sandbox() -> Path:
    """A busybox tree (with an app and image environment) plus help, test and startscript."""
    work = Path(tempfile.mkdtemp(dir="/tmp", prefix="hpcsif-repack-"))  # the peer sees /tmp
    root = work / "sandbox"
    build_rootfs(root)
    sd = root / SD.lstrip("/")
    (sd / "runscript.help").write_text("How to use it.\n")
    (sd / "test").write_text("#!/bin/sh\necho tested\n")
    (sd / "startscript").write_text("#!/bin/sh\necho started\n")
    (sd / "env" / "90-environment.sh").write_text("#!/bin/sh\nexport FROM_SANDBOX=1\n")
    for path in (sd / "test", sd / "startscript"):
        path.chmod(0o755)
    yield root
    shutil.rmtree(work, ignore_errors=True)


def test_sandbox_and_repacked_sifs_record_every_attribute(sandbox: Path, tmp_path: Path) -> None:
    packed, repacked = tmp_path / "packed.sif", tmp_path / "repacked.sif"
    run_cli("build", str(packed), str(sandbox))
    run_cli("build", str(repacked), str(packed))
    for sif, origin in ((packed, sandbox), (repacked, packed)):
        attrs = inspect_object(sif)
        assert list(attrs) == [
            "apps",
            "environment",
            "labels",
            "runscript",
            "test",
            "helpfile",
            "deffile",
            "startscript",
        ]
        assert attrs["environment"][f"{SD}/env/90-environment.sh"] == "#!/bin/sh\nexport FROM_SANDBOX=1"
        assert attrs["helpfile"] == "How to use it."
        assert attrs["test"] == "#!/bin/sh\necho tested"
        assert attrs["startscript"] == "#!/bin/sh\necho started"
        assert "hello" in attrs["apps"] and "runscript" in attrs["apps"]["hello"]
        assert attrs["deffile"] == f"bootstrap: localimage\nfrom: {origin}"


@pytest.mark.peer
@pytest.mark.skipif(APPTAINER is None, reason="neither apptainer nor peer-apptainer on PATH")
def test_apptainer_reads_the_environment_and_help_of_a_packed_sandbox(sandbox: Path) -> None:
    """What Apptainer shows of our SIF is what it shows of its own SIF of the same sandbox."""
    out = sandbox.parent
    ours, theirs = out / "ours.sif", out / "theirs.sif"
    run_cli("build", "-F", str(ours), str(sandbox))
    subprocess.run([APPTAINER, "-q", "build", "-F", str(theirs), str(sandbox)], check=True, timeout=300)
    for args in (
        ["inspect", "-e"],
        ["inspect", "-H"],
        ["inspect", "-t"],
        ["inspect", "--list-apps"],
        ["run-help"],
    ):
        seen = [
            subprocess.run([APPTAINER, *args, str(sif)], capture_output=True, text=True, timeout=60).stdout
            for sif in (ours, theirs)
        ]
        assert seen[0] == seen[1] and seen[0].strip(), args
