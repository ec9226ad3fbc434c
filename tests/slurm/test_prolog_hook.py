"""The shell hooks in slurm/: settings file, exit status policy and log lines (no cluster needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    """A copy of slurm/'s hooks, as an admin installs them."""
    dest = tmp_path / "hooks"
    dest.mkdir()
    for name in ("prolog", "epilog", "hpcsif-hook"):
        shutil.copy2(ROOT / "slurm" / name, dest / name)
    return dest


def _run(hooks: Path, which: str, settings: str, log: Path) -> subprocess.CompletedProcess:
    (hooks / "hpcsif.env").write_text(settings + f"\nHPCSIF_LOG={log}\n")
    env = {"SLURM_JOB_ID": "4242", "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(hooks / which)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("which", ["prolog", "epilog"])
def test_a_failing_hpcsif_does_not_fail_the_hook(hooks: Path, tmp_path: Path, which: str) -> None:
    log = tmp_path / "log" / "slurm.log"  # the hook makes the directory
    proc = _run(hooks, which, "HPCSIF_BIN=false", log)
    assert proc.returncode == 0
    assert f"hpcsif {which} for job 4242: failed with rc 1" in log.read_text()


def test_a_missing_hpcsif_fails_the_hook(hooks: Path, tmp_path: Path) -> None:
    log = tmp_path / "slurm.log"
    proc = _run(hooks, "prolog", f"HPCSIF_BIN={tmp_path}/no-such-hpcsif", log)
    assert proc.returncode == 127  # a broken installation is the admin's to see (Slurm drains)
    assert "cannot run" in log.read_text()


def test_settings_reach_hpcsif(hooks: Path, tmp_path: Path) -> None:
    log, seen = tmp_path / "slurm.log", tmp_path / "seen"
    fake = tmp_path / "fake-hpcsif"
    fake.write_text(f'#!/bin/sh\necho "$@|$HPCSIF_SYSTEM_CACHEDIR|$(umask)" > {seen}\n')
    fake.chmod(0o755)
    proc = _run(hooks, "prolog", f"HPCSIF_BIN={fake}\nHPCSIF_SYSTEM_CACHEDIR=/srv/cache", log)
    assert proc.returncode == 0
    assert seen.read_text().strip() == "-v slurm prolog|/srv/cache|0022"


def test_an_unwritable_log_does_not_stop_staging(hooks: Path, tmp_path: Path) -> None:
    blocker, seen = tmp_path / "not-a-dir", tmp_path / "seen"
    blocker.write_text("")
    fake = tmp_path / "fake-hpcsif"
    fake.write_text(f'#!/bin/sh\necho "$@" > {seen}\n')
    fake.chmod(0o755)
    proc = _run(hooks, "prolog", f"HPCSIF_BIN={fake}", blocker / "slurm.log")
    assert proc.returncode == 0
    assert seen.read_text().strip() == "-v slurm prolog"
