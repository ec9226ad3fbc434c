"""Request discovery (SPANK variables, #HPCSIF directives, --comment) and the job records."""

from __future__ import annotations

import os
import stat

import pytest

from hpcsif.errors import StagingError, UsageError
from hpcsif.slurm.jobrecord import AdminComment, ImageOutcome, JobRecord, job_image, load_record
from hpcsif.slurm.requests import (
    ImageRequest,
    discover,
    from_batch_script,
    from_comment,
    from_spank_env,
)

SCRIPT = """#!/bin/bash
#SBATCH -N 4
#HPCSIF --image=docker://team/app:1.2 --nv
# a plain comment
#HPCSIF -B /scratch:/scratch,/data --mpi openmpi oci:///images/tools:v1
#HPCSIFX --image=not-ours
#HPCSIF --image
srun hpcsif exec docker://team/app:1.2 ./solver
#HPCSIF --image=docker://after/the:command
"""


def test_directives_follow_sbatch_rules() -> None:
    reqs = from_batch_script(SCRIPT)
    assert [r.ref for r in reqs] == ["docker://team/app:1.2", "oci:///images/tools:v1"]
    app, tools = reqs
    assert app.nv and app.source == "directive" and app.mounts == ()
    assert tools.mounts == ("/scratch:/scratch", "/data") and tools.mpi == "openmpi" and not tools.nv


def test_malformed_directive_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert from_batch_script("#!/bin/sh\n#HPCSIF --image\n#HPCSIF --image=a.sif\n")[0].ref == "a.sif"
    assert "line 2" in caplog.text


def test_spank_variables() -> None:
    env = {
        "SPANK_HPCSIF_IMAGE": "docker://x/y:1",
        "SPANK_HPCSIF_MOUNTS": "/a:/b, /c",
        "SPANK_HPCSIF_NV": "1",
        "SPANK_HPCSIF_MPI": "mpich",
    }
    (req,) = from_spank_env(env)
    assert req == ImageRequest("docker://x/y:1", "spank", ("/a:/b", "/c"), True, "mpich", None)
    assert from_spank_env({"SPANK_HPCSIF_NV": "1"}) == []
    raw = {
        "SPANK__SLURM_SPANK_OPTION_hpcsif_sif_image": "docker://x/y:2",
        "SPANK__SLURM_SPANK_OPTION_hpcsif_sif_nv": "(null)",
    }
    assert from_spank_env(raw) == [ImageRequest("docker://x/y:2", "spank", nv=True)]


def test_comment_words() -> None:
    assert [r.ref for r in from_comment("run 7; hpcsif:docker://a/b:1 hpcsif:oci:///x:y hpcsif:")] == [
        "docker://a/b:1",
        "oci:///x:y",
    ]
    assert from_comment(None) == []


def test_discover_order_dedup_and_broken_source(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> str:
        raise OSError("slurmctld is down")

    reqs = discover(
        {"SPANK_HPCSIF_IMAGE": "docker://team/app:1.2"},
        batch_script=lambda: SCRIPT,
        comment=lambda: "hpcsif:docker://c/d:2 hpcsif:oci:///images/tools:v1",
    )
    assert [(r.ref, r.source) for r in reqs] == [
        ("docker://team/app:1.2", "spank"),
        ("oci:///images/tools:v1", "directive"),
        ("docker://c/d:2", "comment"),
    ]
    reqs = discover({}, batch_script=broken, comment=lambda: "hpcsif:a.sif")
    assert [r.ref for r in reqs] == ["a.sif"]
    assert "slurmctld is down" in caplog.text


def test_discovery_methods_can_be_limited() -> None:
    def never() -> str:
        raise AssertionError("queried a disabled source")

    env = {"SPANK_HPCSIF_IMAGE": "a.sif"}
    assert [r.ref for r in discover(env, batch_script=never, comment=never, methods=["spank"])] == ["a.sif"]
    with pytest.raises(UsageError, match="unknown discovery method"):
        discover(env, batch_script=never, comment=never, methods=["spank", "env"])


def test_admin_comment_keeps_foreign_segments() -> None:
    c = AdminComment.parse("budget=42 | hpcsif-pin docker://a/b:1 sha256:" + "0" * 64)
    assert c.pins == {"docker://a/b:1": "sha256:" + "0" * 64} and c.other == ["budget=42"]
    c.errors["docker://bad/x:1"] = "not found | really\nnot"
    again = AdminComment.parse(c.format())
    assert again.pins == c.pins and again.other == ["budget=42"]
    assert again.errors == {"docker://bad/x:1": "not found / really not"}
    # a requeued job's error names its run; a later run drops only earlier runs' errors
    again.errors["docker://h:5000/y:2"] = "timed out"
    again.error_runs["docker://h:5000/y:2"] = 2
    assert "hpcsif-error docker://h:5000/y:2 (restart 2): timed out" in again.format()
    third = AdminComment.parse(again.format())
    assert third.error_runs == {"docker://h:5000/y:2": 2}
    assert not third.drop_stale_errors(["docker://h:5000/y:2"], 2)
    assert third.drop_stale_errors(["docker://bad/x:1", "docker://h:5000/y:2"], 3)
    assert third.errors == {} and third.pins == c.pins


def test_job_record_round_trip_and_job_image(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcsif.config import set_config

    monkeypatch.setenv("HPCSIF_SYSTEM_CACHEDIR", str(tmp_path))
    set_config(None)
    record = JobRecord(
        "77",
        {
            "docker://a/b:1": ImageOutcome("docker://a/b:1", pinned="docker://a/b:1@sha256:" + "1" * 64),
            "docker://bad/x:1": ImageOutcome("docker://bad/x:1", error="manifest unknown"),
        },
    )
    path = record.save(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert load_record(tmp_path, "77").images["docker://bad/x:1"].error == "manifest unknown"
    env = {"SLURM_JOB_ID": "77"}
    assert job_image("docker://a/b:1", env) == "docker://a/b:1@sha256:" + "1" * 64
    assert job_image("docker://other/c:1", env) == "docker://other/c:1"
    assert job_image("docker://a/b:1", {}) == "docker://a/b:1"
    with pytest.raises(StagingError, match="job 77 could not stage docker://bad/x:1: manifest unknown"):
        job_image("docker://bad/x:1", env)
