import json

import pytest

from hpcdiff.dist import Topology, detect_topology
from tests.harness import PYTHON, ROOT, assert_ok, mpirun, run

WORKER = ROOT / "tests" / "workers" / "allreduce_ddp.py"


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Topology(0, 1, 0, 1, "single")),
        (
            {
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            Topology(1, 4, 1, 2, "mpirun"),
        ),
        (
            {
                "SLURM_PROCID": "3",
                "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_LOCALID": "1",
                "SLURM_STEP_ID": "0",
                "SLURM_STEP_TASKS_PER_NODE": "2",
                "SLURM_JOB_ID": "77",
            },
            Topology(3, 4, 1, 2, "srun", "77"),
        ),
        (
            {
                "RANK": "2",
                "WORLD_SIZE": "3",
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
                "SLURM_PROCID": "0",
                "SLURM_STEP_NUM_TASKS": "1",
                "SLURM_STEP_ID": "0",
            },
            Topology(2, 3, 0, 1, "torchrun"),
        ),
        # A batch script carries SLURM_PROCID/SLURM_NTASKS but is one process: a world of one.
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "5"}, Topology(0, 1, 0, 1, "single", "5")),
    ],
)
def test_topology_is_read_from_the_launcher_table(env, expected):
    assert detect_topology(env) == expected


def test_topology_rejects_impossible_ranks():
    with pytest.raises(ValueError, match="outside world"):
        Topology(2, 2, 0, 1, "mpirun")


def test_allreduce_and_ddp_step_single_process():
    proc = run([PYTHON, WORKER], timeout=120)
    assert_ok(proc)
    out = _last_json(proc.stdout)
    assert out["world_size"] == 1 and out["sum"] == 1.0


@pytest.mark.mpi
def test_allreduce_and_ddp_step_under_mpirun_matches_one_rank():
    single = _last_json(run([PYTHON, WORKER], timeout=120).stdout)
    proc = mpirun(2, [PYTHON, WORKER], timeout=90)
    assert_ok(proc)
    out = _last_json(proc.stdout)
    assert out["world_size"] == 2 and out["launcher"] == "mpirun"
    assert out["sum"] == 3.0  # 1 + 2
    assert out["identical_across_ranks"]
    # 2 ranks x 4 rows == 1 rank x 8 rows, to floating-point tolerance (the reduction order differs).
    assert out["params"] == pytest.approx(single["params"], abs=1e-6)


@pytest.mark.mpi
def test_bad_input_found_by_rank_0_ends_every_rank_with_its_exit_code(tmp_path):
    bids = tmp_path / "bids without participants"
    bids.mkdir()
    proc = mpirun(2, [PYTHON, "-m", "hpcdiff", "ingest", bids, "--out", tmp_path / "shards"], timeout=90)
    assert proc.returncode == 3, proc.stderr
    assert "MPI_ABORT" not in proc.stderr
    assert proc.stderr.count("participants.tsv") >= 2  # every rank reports the same error


@pytest.mark.mpi
@pytest.mark.parametrize("code", [0, 75])
def test_exit_after_ddp_keeps_code_output_and_threads(tmp_path, code):
    """The exit that skips finalization (a leaked gloo thread can abort it) still flushes and joins everything."""
    proc = mpirun(2, [PYTHON, ROOT / "tests" / "workers" / "exit_after_ddp.py", tmp_path, code], timeout=90)
    assert_ok(proc, code)
    for rank in (0, 1):
        assert f"rank {rank} printed before exit" in proc.stdout
        assert f"rank {rank} logged before exit" in (tmp_path / f"rank{rank}.log").read_text()
        assert (tmp_path / f"thread{rank}.done").read_text() == "done"
    assert "terminate called" not in proc.stderr
    assert "finalize" not in proc.stderr.lower()  # mpirun names ranks that exit without MPI_Finalize
