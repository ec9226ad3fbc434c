"""``srun -n 2 hpcsif exec --mpi …``: every rank runs in its own container and sees its Slurm/PMI env."""

from __future__ import annotations

import os
import sys

import pytest

from tests.engine.conftest import ROOT, fuse_mounts, hpcsif_cmd
from tests.services.slurm import slurm_cluster  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("plugin", "rank_var"), [("pmi2", "PMI_RANK"), ("pmix", "PMIX_RANK")])
def test_srun_ranks_see_their_environment(images, slurm_cluster, plugin, rank_var):  # noqa: F811
    script = f'echo "rank=$SLURM_PROCID pmi=${{{rank_var}:-}} ntasks=$SLURM_NTASKS leaked=${{NOT_PASSED:-}}"'
    cmd = [
        "srun",
        "-n",
        "2",
        f"--mpi={plugin}",
        *hpcsif_cmd("exec", "--cleanenv", "--mpi", "openmpi", str(images.sif), "sh", "-c", script),
    ]
    res = slurm_cluster.run(cmd, env={"PYTHONPATH": str(ROOT), "NOT_PASSED": "x"}, timeout=120)
    lines = sorted(res.stdout.splitlines())
    assert lines == [f"rank={r} pmi={r} ntasks=2 leaked=" for r in (0, 1)], res.stderr
    assert not fuse_mounts()


def test_open_mpi_hello_world_two_ranks(openmpi_sif, slurm_cluster):  # noqa: F811
    """A real 2-rank Open MPI job: the container's Open MPI wired up by srun's PMIx (hybrid model)."""
    code = (
        "from mpi4py import MPI; c = MPI.COMM_WORLD; r = c.Get_rank(); "
        "print(r, c.Get_size(), c.allreduce(r + 1), MPI.Get_library_version().split(',')[0])"
    )
    cmd = [
        "srun",
        "-n",
        "2",
        "--mpi=pmix",
        *hpcsif_cmd("exec", "--mpi", "openmpi", str(openmpi_sif), "python3", "-c", code),
    ]
    res = slurm_cluster.run(cmd, env={"PYTHONPATH": str(ROOT)}, timeout=300)
    lines = sorted(res.stdout.splitlines())
    assert [ln.split()[:3] for ln in lines] == [["0", "2", "3"], ["1", "2", "3"]], res.stderr
    assert "Open MPI" in lines[0]
    assert "not ABI-compatible" not in res.stderr  # host and container PMIx are both 4.2 (libpmix.so.2.6)
    assert not fuse_mounts()


def test_srun_ranks_repeat_through_the_native_front(images, slurm_cluster, tmp_path):  # noqa: F811
    """The ranks of a second step start without Python: Slurm's per-task variables are not in the key."""
    from tests.engine.test_native_front import build_front

    front = build_front(tmp_path / "front", sys.executable)
    script = 'echo "rank=$SLURM_PROCID step=$SLURM_STEP_ID pmix=${PMIX_RANK:-}"'
    cmd = ["srun", "-n", "2", "--mpi=pmix", str(front.binary), "exec", str(images.sif), "sh", "-c", script]
    env = {"PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"]}
    for step in range(3):
        before = len(front.python_starts())
        res = slurm_cluster.run(cmd, env=env, timeout=120)
        assert sorted(line.split()[0] for line in res.stdout.splitlines()) == ["rank=0", "rank=1"], res.stderr
        started = front.python_starts()[before:]
        # the first step's ranks go through Python and save one plan between them
        assert (started == []) == (step > 0), started
    assert not fuse_mounts()
