"""``hpcsif stage``: here, on every node of an allocation (--slurm), and over SSH (--nodes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.slurm.cluster_setup import HpcsifCluster, write_os_archive


def _converts(root: Path, ref: str) -> int:
    journal = root / "journal.jsonl"
    events = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
    return sum(1 for e in events if e["event"] == "convert" and e["what"] == ref)


def test_stage_locally_converts_once(tmp_path: Path) -> None:
    ref = write_os_archive(tmp_path / "os5.tar", 5)
    first = run_cli("stage", ref).stdout
    second = run_cli("stage", ref).stdout
    assert first == second
    ref_out, path = first.strip().split("\t")
    assert ref_out == ref and Path(path).is_file() and path.endswith("os5.sif")
    assert _converts(Path(path).parents[2], ref) == 1


def test_stage_usage_errors(tmp_path: Path) -> None:
    proc = run_cli("stage", "--slurm", "docker://x/y:1", check=False, env={"SLURM_JOB_ID": ""})
    assert proc.returncode == 2 and "inside a Slurm allocation" in proc.stderr
    proc = run_cli("stage", "--from", "n1", "docker://x/y:1", check=False)
    assert proc.returncode == 2 and "--from needs --nodes" in proc.stderr


@pytest.mark.slow
def test_stage_slurm_once_on_every_node(hpcsif_cluster: HpcsifCluster, tmp_path: Path) -> None:
    cluster = hpcsif_cluster
    ref = write_os_archive(tmp_path / "os7.tar", 7)
    proc = cluster.run(
        "salloc", "-N2", "hpcsif", "stage", "--slurm", "--system", ref,
        env=cluster.job_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    lines = sorted(line for line in proc.stdout.splitlines() if "\t" in line)
    assert len(lines) == 2, proc.stdout + proc.stderr  # one srun task per node, labelled 0: and 1:
    for node in cluster.nodes:
        assert len(list(cluster.syscache(node).glob("sif/*/os7.sif"))) == 1, node
        assert _converts(cluster.syscache(node), ref) == 1
