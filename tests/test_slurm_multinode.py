"""hpcdiff on a real 2-node Slurm: every node a slurmd in its own network and UTS namespace (own hostname, own
address on a private bridge), the file system shared as NFS would be. One cluster serves the whole session.

Training across the two nodes goes through the rendered sbatch script (`srun --nodes 2 --ntasks-per-node 2`) and
is compared with a one-node run on the same number of ranks under mpirun.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hpcdiff import checkpoint
from hpcdiff.atomic import file_sha256
from hpcdiff.stats import backend, run_groupdiff
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, PYTHON, ROOT, assert_ok, hpcdiff, mpirun, wait_for
from tests.slurm_harness import SlurmCluster, require_namespaces
from tests.stats_data import write_cohort_shards

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 16
PER_NODE = 2
WORLD = 2 * PER_NODE

# Runs on every node of a step: who and where it is, and whether anything outside the bridge is reachable.
WHERE_AM_I = """\
import json, os, socket
here = socket.gethostname()
out = {"host": here, "node_id": os.environ["SLURM_NODEID"], "address": socket.gethostbyname(here),
       "peers": {h: socket.gethostbyname(h) for h in ("node1", "node2")}}
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1; a UDP connect sends nothing, it only looks up the route
        out["route_out"] = probe.getsockname()[0]
    except OSError as e:
        out["route_out"] = None
        out["route_error"] = e.strerror
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode job")
    shards = blob_shards(root / "shards", num_subjects=12, per_shard=4)
    return job_yaml(root / "job.yaml", shards, train={"steps": STEPS, "checkpoint_every": 4, "log_every": 4})


@pytest.fixture(scope="module")
def one_node_run(job, tmp_path_factory) -> Path:
    """The same job on one node with the same number of ranks (mpirun on this host)."""
    run = tmp_path_factory.mktemp("one node") / "run"
    assert_ok(mpirun(WORLD, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet"], timeout=600))
    return run


def _shims(directory: Path, calls: Path) -> str:
    """A PATH whose squeue and scontrol log each call (host, rank, step, arguments), then run the real one."""
    directory.mkdir()
    for name in ("squeue", "scontrol"):
        real = shutil.which(name)
        shim = directory / name
        shim.write_text(
            "#!/bin/sh\n"
            f'printf "%s %s %s {name} %s\\n" "$(hostname)" "${{SLURM_PROCID:--}}" "${{SLURM_STEP_ID:-batch}}" "$*"'
            f" >> {shlex.quote(str(calls))}\n"
            f'exec {shlex.quote(real)} "$@"\n'
        )
        shim.chmod(0o755)
    return f"{directory}{os.pathsep}{os.environ['PATH']}"


def _submit(cluster, job: Path, run: Path, path: str | None = None) -> str:
    env = {**cluster.env, "PATH": path} if path else cluster.env
    args = ("--nodes", 2, "--ntasks-per-node", PER_NODE, "--max-restarts", 2)
    assert_ok(hpcdiff("submit", job, "--run-dir", run, "--backend", "slurm", *args, env=env))
    return str(json.loads((run / "status.json").read_text())["job_ids"][-1])


def _wait_completed(cluster, run: Path, job_id: str, timeout: float = 600) -> None:
    def done() -> bool:
        state = cluster.job_state(job_id)
        if state in ("FAILED", "CANCELLED", "TIMEOUT"):
            out = "\n".join(p.read_text() for p in (run / "slurm").glob("*.out"))
            pytest.fail(f"job {job_id} ended {state}:\n{cluster.show_job(job_id)}\n{out[-4000:]}")
        return state == "COMPLETED"

    wait_for(done, timeout, f"job {job_id} to complete", poll=0.5)


def _final(run: Path) -> tuple[str, dict]:
    proc = hpcdiff("inspect", run, "--json")
    assert_ok(proc)
    report = json.loads(proc.stdout)
    assert report["step"] == STEPS
    return report["weights_sha256"], checkpoint.load(checkpoint.latest_valid(run / "checkpoints"))


@pytest.fixture(scope="module")
def two_node_run(slurm_two_nodes, job, tmp_path_factory) -> dict:
    """The job submitted as a 2-node Slurm job, with squeue and scontrol counted through PATH shims."""
    root = tmp_path_factory.mktemp("two nodes run")
    calls = root / "slurm calls.txt"
    run = root / "run"
    job_id = _submit(slurm_two_nodes, job, run, path=_shims(root / "shims", calls))
    _wait_completed(slurm_two_nodes, run, job_id)
    return {"run": run, "job_id": job_id, "calls": calls.read_text().splitlines() if calls.exists() else []}


def test_each_node_has_its_hostname_and_address_and_no_route_out(slurm_two_nodes, tmp_path):
    script = tmp_path / "where.py"
    script.write_text(WHERE_AM_I)
    proc = slurm_two_nodes.run(["srun", "--nodes", 2, "--ntasks-per-node", 1, PYTHON, script], timeout=120)
    assert_ok(proc)
    seen = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["node_id"])
    addresses = slurm_two_nodes.node_addresses()
    assert [r["host"] for r in seen] == ["node1", "node2"]
    assert [r["address"] for r in seen] == [addresses["node1"], addresses["node2"]]
    assert not any(a.startswith("127.") for a in addresses.values())
    for r in seen:
        assert r["peers"] == addresses  # every node resolves every node's name
        assert r["route_out"] is None, r  # nothing beyond the bridge can be reached from a node


def test_training_across_two_nodes_matches_one_node(two_node_run, one_node_run):
    run = two_node_run["run"]
    hosts = {}
    for rank in range(WORLD):
        text = (run / "logs" / f"rank-{rank:03d}.log").read_text()
        hosts[rank] = next(w for line in text.splitlines() if "on host" in line for w in [line.split("on host ")[1]])
    assert {r: h.split()[0] for r, h in hosts.items()} == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}
    rank0 = (run / "logs" / "rank-000.log").read_text()
    assert "rendezvous at 10.213." in rank0 and "(2 hosts)" in rank0, rank0  # the bridge address, not loopback

    digest, state = _final(run)
    ref_digest, ref = _final(one_node_run)
    # Every checkpoint of the 2-node run was taken after all 4 ranks reported the same weights digest (train
    # refuses to save otherwise), so its final weights are those of every rank.
    for part in ("model", "ema"):
        for name, tensor in state[part].items():
            torch.testing.assert_close(tensor, ref[part][name], rtol=1e-5, atol=1e-6, msg=f"{part}.{name}")
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["world_size"] for e in events if e["event"] == "start"] == [WORLD]
    print(f"2-node vs 1-node digest: {digest} vs {ref_digest} (bitwise equal: {digest == ref_digest})")


def test_startup_asks_slurm_once_per_job(two_node_run):
    # Slurm 22.05 sets no SLURM_JOB_END_TIME, so the time limit must be asked for: by rank 0 only, once.
    calls = two_node_run["calls"]
    squeue = [c for c in calls if " squeue " in c]
    assert len(squeue) == 1, calls
    host, rank, _step, _name, *_ = squeue[0].split()
    assert (host, rank) == ("node1", "0")
    assert not [c for c in calls if " scontrol " in c], calls  # an undisturbed job never requeues itself


def test_sigkill_of_a_rank_on_node2_resumes_exactly(slurm_two_nodes, job, two_node_run, tmp_path):
    run = tmp_path / "killed run"
    job_id = _submit(slurm_two_nodes, job, run)

    def rank_on_node2() -> int | None:
        if not list((run / "checkpoints").glob("step-*[0-9]")):
            return None  # past the first checkpoint, so the resume has something to start from
        for pid in slurm_two_nodes.node_pids("node2"):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"SLURM_PROCID=3" in environ and b"hpcdiff\0train" in cmdline:
                return pid
        return None

    pid = wait_for(rank_on_node2, 300, "rank 3 on node2 after the first checkpoint", poll=0.2)
    os.kill(pid, signal.SIGKILL)

    _wait_completed(slurm_two_nodes, run, job_id)
    assert _final(run)[0] == _final(two_node_run["run"])[0]
    assert slurm_two_nodes.job_field(job_id, "Restarts") == "1"
    out = (run / "slurm" / f"train-{job_id}.out").read_text()
    assert "requeueing (restart 1" in out


def _digests(out: Path) -> dict[str, str]:
    """Every file below ``out``, by relative path, with its checksum."""
    return {p.relative_to(out).as_posix(): file_sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}


def test_data_jobs_under_srun_on_two_nodes_equal_one_process(slurm_two_nodes, two_node_run, tmp_path):
    srun = ["srun", "--nodes", 2, "--ntasks-per-node", 1, *HPCDIFF]

    def both(*args: object, out: str) -> Path:
        """The command as one process and under srun on both nodes; asserts the same bytes; the one-process out."""
        assert_ok(hpcdiff(*args, "--out", tmp_path / f"{out} one", timeout=300))
        assert_ok(slurm_two_nodes.run([*srun, *args, "--out", tmp_path / f"{out} two"], timeout=300))
        one = tmp_path / f"{out} one"
        assert _digests(tmp_path / f"{out} two") == _digests(one), out
        assert _digests(one)
        return one

    bids = both("cohort", "--subjects", 6, "--shape", 16, 18, 16, "--seed", 2, out="bids")
    shards = both("ingest", bids, "--shape", 16, 18, 16, "--subjects-per-shard", 2, out="shards")
    both("export", shards, out="export")
    run = two_node_run["run"]
    both("sample", "--run-dir", run, "--n", 4, "--subjects-per-shard", 2, "--steps", 4, "--seed", 7, out="samples")


def test_node_failure_requeues_onto_the_other_node_and_resumes_exactly(slurm_two_nodes, job, one_node_run, tmp_path):
    run = tmp_path / "node lost"
    args = ("--nodes", 1, "--ntasks-per-node", WORLD, "--max-restarts", 2)
    assert_ok(hpcdiff("submit", job, "--run-dir", run, "--backend", "slurm", *args, env=slurm_two_nodes.env))
    job_id = str(json.loads((run / "status.json").read_text())["job_ids"][-1])
    wait_for(lambda: list((run / "checkpoints").glob("step-*[0-9]")), 300, "the first checkpoint", poll=0.2)
    first = slurm_two_nodes.job_field(job_id, "NodeList")
    assert first in ("node1", "node2")
    slurm_two_nodes.fail_node(first)
    try:
        _wait_completed(slurm_two_nodes, run, job_id)
        second = slurm_two_nodes.job_field(job_id, "NodeList")
        assert second != first and int(slurm_two_nodes.job_field(job_id, "Restarts")) >= 1
        # Same number of ranks on one node: bitwise the one-node run's weights.
        assert _final(run)[0] == _final(one_node_run)[0]
        # The killed instance never released its lease; the requeued one took it over, saying why.
        takeovers = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if "lock_takeover" in x]
        assert takeovers and f"same Slurm job {job_id}" in takeovers[0]["reason"], takeovers
        assert f"on host {second}" in (run / "logs" / "rank-000.log").read_text()
    finally:
        slurm_two_nodes.up()  # the failed node's slurmd comes back; ReturnToService=2 makes it idle again
    assert slurm_two_nodes.node_state(first) == "idle"


def test_mpirun_inside_a_two_node_allocation(slurm_two_nodes, tmp_path):
    # Open MPI's mpirun starts its daemons through Slurm on every node of the allocation; the ranks then find
    # each other (MPI over TCP on the bridge, torch's rendezvous on rank 0's bridge address).
    worker = ROOT / "tests" / "workers" / "allreduce_ddp.py"
    mpirun_argv = "mpirun --bind-to none -n 4"
    script = tmp_path / "mpirun job.sh"
    script.write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        f"{mpirun_argv} bash -c 'echo \"host $(hostname) rank $OMPI_COMM_WORLD_RANK\"'\n"
        f"{mpirun_argv} {shlex.quote(PYTHON)} {shlex.quote(str(worker))}\n"
    )
    out = tmp_path / "out.txt"
    job_id = slurm_two_nodes.sbatch(script, "--nodes", 2, "--ntasks-per-node", PER_NODE, "-o", out)
    state = slurm_two_nodes.wait(job_id, timeout=300)
    text = out.read_text() if out.exists() else "(no output)"
    assert state == "COMPLETED", text
    placed = [line.split() for line in text.splitlines() if line.startswith("host ")]
    assert {rank: host for _, host, _, rank in placed} == {"0": "node1", "1": "node1", "2": "node2", "3": "node2"}
    result = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    assert result["world_size"] == 4 and result["launcher"] == "mpirun"
    assert result["sum"] == 10.0 and result["identical_across_ranks"]


def test_next_start_cleans_up_a_killed_cluster_and_stop_leaves_nothing(tmp_path):
    require_namespaces()
    crashed = SlurmCluster.start(tmp_path / "crashed", nodes=2)
    assert len(crashed.network_leftovers()) == 3  # node1, node2 and the bridge
    for pidfile in (crashed.dir / "run").glob("*.pid"):  # a crash: every daemon gone, nothing cleaned up
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    wait_for(lambda: not crashed.node_pids("node1"), 30, "node1's slurmd to die")
    fresh = SlurmCluster.start(tmp_path / "fresh", nodes=2)
    try:
        assert crashed.network_leftovers() == []
        assert len(fresh.network_leftovers()) == 3
    finally:
        fresh.stop()
    assert fresh.network_leftovers() == []


def test_stats_mpi_backend_under_srun_on_two_nodes_gives_the_local_maps(slurm_two_nodes, tmp_path):
    shards = tmp_path / "shards"
    write_cohort_shards(shards, num_subjects=24, per_shard=10)
    with backend("local"):
        run_groupdiff(shards, tmp_path / "local", "group", ["age", "sex"])
    # Scheduler on rank 0 (node1), the statistics on rank 1, workers on ranks 2-3 (node2).
    argv = ["srun", "--nodes", 2, "--ntasks-per-node", 2, *HPCDIFF, "stats", "groupdiff", shards, "--group", "group"]
    args = ("--covariates", "age,sex", "--block", 5, "--backend", "mpi", "--out", tmp_path / "mpi")
    proc = slurm_two_nodes.run([*argv, *args], timeout=600)
    assert_ok(proc)
    assert "dask-mpi on interface eth0 (2 hosts)" in proc.stderr  # not loopback: the workers are on node2
    for name in ("t", "p", "d", "t_age", "mask"):
        ours = nib.load(str(tmp_path / "mpi" / f"{name}.nii.gz")).get_fdata()
        ref = nib.load(str(tmp_path / "local" / f"{name}.nii.gz")).get_fdata()
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9, err_msg=name)
