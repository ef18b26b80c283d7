import json

import pytest

from hpcdiff.dist import Topology, detect_topology, parse_tasks_per_node, rendezvous_host
from tests.harness import PYTHON, ROOT, assert_ok, mpirun, run

WORKER = ROOT / "tests" / "workers" / "allreduce_ddp.py"


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _srun(rank: int, size: int, local: int, node: int, per_node: str, **extra: str) -> dict[str, str]:
    """The variables srun gives one task of a step (Slurm 22.05)."""
    env = {
        "SLURM_PROCID": str(rank),
        "SLURM_STEP_NUM_TASKS": str(size),
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node),
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_TASKS_PER_NODE": per_node,
        "SLURM_JOB_ID": "77",
    }
    return {**env, **extra}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Topology(0, 1, 0, 1, "single", num_nodes=1)),
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
                "OMPI_COMM_WORLD_RANK": "1",
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            Topology(1, 2, 1, 2, "mpirun", num_nodes=1),
        ),
        # An MPI that does not say where ranks are: never taken for one node.
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, Topology(1, 2, 1, 2, "mpirun")),
        (_srun(3, 4, 1, 0, "4"), Topology(3, 4, 1, 4, "srun", "77", num_nodes=1)),
        # The forms Slurm writes for several nodes (srun --nodes 2 --ntasks-per-node 4, and uneven layouts).
        (_srun(5, 8, 1, 1, "4(x2)"), Topology(5, 8, 1, 4, "srun", "77", num_nodes=2)),
        (_srun(2, 3, 0, 1, "2,1"), Topology(2, 3, 0, 1, "srun", "77", num_nodes=2)),
        (_srun(1, 3, 1, 0, "2,1"), Topology(1, 3, 1, 2, "srun", "77", num_nodes=2)),
        (_srun(6, 7, 0, 2, "3(x2),1"), Topology(6, 7, 0, 1, "srun", "77", num_nodes=3)),
        (_srun(4, 7, 1, 1, "3(x2),1"), Topology(4, 7, 1, 3, "srun", "77", num_nodes=3)),
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
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "5"},
            Topology(0, 1, 0, 1, "single", "5", num_nodes=1),
        ),
    ],
)
def test_topology_is_read_from_the_launcher_table(env, expected):
    assert detect_topology(env) == expected


@pytest.mark.parametrize(
    ("value", "counts"),
    [("4", [4]), ("4(x2)", [4, 4]), ("2,1", [2, 1]), ("3(x2),1", [3, 3, 1]), ("1,2(x3)", [1, 2, 2, 2])],
)
def test_tasks_per_node_lists_expand(value, counts):
    assert parse_tasks_per_node(value) == counts


def test_two_node_step_is_never_single_node():
    ranks = [detect_topology(_srun(r, 8, r % 4, r // 4, "4(x2)")) for r in range(8)]
    assert not any(t.single_node for t in ranks)
    assert [t.local_rank for t in ranks] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert {t.local_world_size for t in ranks} == {4}


@pytest.mark.parametrize(
    "env",
    [
        _srun(1, 2, 0, 1, "2(y2)"),  # not a Slurm form
        _srun(1, 2, 0, 3, "1(x2)"),  # a node the list does not have
        _srun(1, 3, 0, 1, "1(x2)"),  # counts disagree with the step size
    ],
)
def test_unreadable_srun_layout_is_an_error_naming_the_variables(env):
    with pytest.raises(ValueError, match="SLURM_STEP_TASKS_PER_NODE"):
        detect_topology(env)


def test_rendezvous_is_loopback_only_when_every_rank_is_here():
    one_node = Topology(0, 2, 0, 2, "mpirun", num_nodes=1)
    assert rendezvous_host(one_node, ["a", "a"]) == "127.0.0.1"
    # A launcher that does not say, or ranks on other hosts, and nothing but loopback reaches them: refused with
    # the fix, never a loopback address that would leave the peers dialling themselves. (IP literals: no DNS.)
    for topo, hosts in ((Topology(0, 2, 0, 2, "mpirun"), ["127.0.0.2"] * 2), (one_node, ["127.0.0.2", "127.0.0.3"])):
        with pytest.raises(RuntimeError, match="resolves"):
            rendezvous_host(topo, hosts)


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
