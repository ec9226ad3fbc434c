"""Apptainer 1.4's flags and subcommands of run-help, sif, cache, key, sign and verify, through the CLI.

Each test runs ``hpcsif`` as a user would (a separate process) on real SIFs, squashfs and gpg;
where Apptainer (or the sid peer) is installed the same command runs there and the outputs
are compared.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hpcsif.sif.format import DataType, FSType, PartType
from hpcsif.sif.writer import ObjectSpec, write_sif
from tests.conftest import peer_apptainer, run_cli

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
HELP = '    Some help for this container\n  with "quotes" and a\ttab\n\n\n'
APP_HELP = "    Help for app foo\n"


def peer(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the Apptainer peer with *args* (the caller skips when there is none)."""
    return subprocess.run(
        [str(peer_apptainer()), *map(str, args)], capture_output=True, text=True, timeout=120
    )


needs_peer = pytest.mark.skipif(
    peer_apptainer() is None, reason="neither apptainer nor peer-apptainer on PATH"
)


@pytest.fixture(scope="module")
def help_sif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SIF with a busybox, a %help text, an app with %apphelp and an app without."""
    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs (squashfs-tools) is not installed")
    work = tmp_path_factory.mktemp("run-help")
    root = work / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    for d in ("dev", "proc", "sys", "tmp", "etc", "root", "home"):  # what Apptainer mounts over
        (root / d).mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / ".singularity.d").mkdir()
    (root / ".singularity.d" / "runscript.help").write_text(HELP)
    (root / "scif" / "apps" / "foo" / "scif").mkdir(parents=True)
    (root / "scif" / "apps" / "foo" / "scif" / "runscript.help").write_text(APP_HELP)
    (root / "scif" / "apps" / "bar" / "scif").mkdir(parents=True)
    fs = work / "rootfs.sqfs"
    cmd = ["mksquashfs", str(root), str(fs), "-noappend", "-quiet", "-no-progress", "-all-root"]
    subprocess.run(cmd, check=True)
    return write_sif(
        work / "help.sif",
        [ObjectSpec(DataType.PARTITION, path=fs, fstype=FSType.SQUASHFS, parttype=PartType.PRIMSYS)],
    )


NO_HELP = "No help sections were defined for this image\n"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], HELP.rstrip("\n") + "\n"),
        (["--app", "foo"], APP_HELP),
        (["--app", "bar"], NO_HELP),  # an app without %apphelp
        (["--app", "nope"], NO_HELP),  # no such app: Apptainer says the same
    ],
)
def test_run_help_prints_the_help_text(help_sif: Path, flags: list[str], expected: str) -> None:
    out = run_cli("run-help", *flags, str(help_sif))
    assert out.stdout == expected
    if peer_apptainer():
        theirs = peer("run-help", *flags, help_sif)
        assert (theirs.returncode, theirs.stdout) == (0, out.stdout)


def test_run_help_without_help_and_without_image(tmp_path: Path, help_sif: Path) -> None:
    bare = tmp_path / "bare"
    (bare / "bin").mkdir(parents=True)  # a sandbox without /.singularity.d/runscript.help
    assert run_cli("run-help", str(bare)).stdout == NO_HELP
    missing = run_cli("run-help", str(tmp_path / "nope.sif"), check=False)
    assert missing.returncode == 255
    assert (
        missing.stderr
        == f"FATAL:   container not found: stat {tmp_path / 'nope.sif'}: no such file or directory\n"
    )
