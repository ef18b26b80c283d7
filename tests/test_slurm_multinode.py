"""hpcdiff on a real 2-node Slurm: every node a slurmd in its own network and UTS namespace (own hostname, own
address on a private bridge), the file system shared as NFS would be. One cluster serves the whole session.

Training across the two nodes goes through the rendered sbatch script (`srun --nodes 2 --ntasks-per-node 2`) and
is compared with a one-node run on the same number of ranks under mpirun.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dask.utils import format_bytes
from dask_jobqueue.slurm import slurm_format_bytes_ceil

from hpcdiff import checkpoint
from hpcdiff.atomic import file_sha256
from hpcdiff.launch.slurm.sbatch import JobScript, SlurmOptions, hpcdiff_argv, output_pattern, write_script
from hpcdiff.stats import backend, run_groupdiff
from hpcdiff.stats.backend import worker_memory
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, PYTHON, ROOT, assert_ok, hpcdiff, mpirun, wait_for
from tests.slurm_harness import SlurmCluster, require_namespaces
from tests.stats_data import SHAPE, write_cohort_shards

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


@functools.cache
def _final(run: Path) -> tuple[str, dict]:
    """The final checkpoint's weights digest and state, read here (no ``hpcdiff inspect`` child importing torch:
    the CLI's digest is tested elsewhere); cached, so each reference run is read once."""
    info = checkpoint.latest_valid(run / "checkpoints")  # deep-verified against its marker's checksums
    assert info is not None and info.step == STEPS, info
    state = checkpoint.load(info)
    assert checkpoint.weights_sha256(state["model"], state["ema"]) == info.weights_sha256
    return info.weights_sha256, state


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


DATA_SHAPE = ("--shape", 16, 18, 16)


@pytest.fixture(scope="module")
def one_process_data(tmp_path_factory) -> dict[str, Path]:
    """A cohort and its ingest, each written by one process: the bytes every multi-node data job must give."""
    root = tmp_path_factory.mktemp("data one process")
    bids, shards = root / "bids", root / "shards"
    assert_ok(hpcdiff("cohort", "--out", bids, "--subjects", 6, *DATA_SHAPE, "--seed", 2, timeout=300))
    assert_ok(hpcdiff("ingest", bids, "--out", shards, *DATA_SHAPE, "--subjects-per-shard", 2, timeout=300))
    return {"bids": bids, "shards": shards}


def test_data_jobs_under_srun_on_two_nodes_equal_one_process(slurm_two_nodes, two_node_run, one_process_data, tmp_path):
    srun = ["srun", "--nodes", 2, "--ntasks-per-node", 1, *HPCDIFF]

    def on_two_nodes(*args: object, out: str, one: Path | None = None) -> Path:
        """The command under srun on both nodes; asserts the bytes of ``one`` (else of one process run here)."""
        if one is None:
            one = tmp_path / f"{out} one"
            assert_ok(hpcdiff(*args, "--out", one, timeout=300))
        two = tmp_path / f"{out} two"
        assert_ok(slurm_two_nodes.run([*srun, *args, "--out", two], timeout=300))
        assert _digests(two) == _digests(one), out
        assert _digests(one)
        return one

    bids = on_two_nodes("cohort", "--subjects", 6, *DATA_SHAPE, "--seed", 2, out="bids", one=one_process_data["bids"])
    shards = on_two_nodes(
        "ingest", bids, *DATA_SHAPE, "--subjects-per-shard", 2, out="shards", one=one_process_data["shards"]
    )
    on_two_nodes("export", shards, out="export")
    run = two_node_run["run"]
    on_two_nodes(
        "sample", "--run-dir", run, "--n", 4, "--subjects-per-shard", 2, "--steps", 4, "--seed", 7, out="samples"
    )


def test_ingest_array_across_nodes_writes_one_manifest_once(slurm_two_nodes, one_process_data, tmp_path):
    # Three tasks of a whole node each (4 CPUs): two run at once, one per node; the third follows on either.
    tasks = 3
    out = tmp_path / "shards 'array'"
    argv = hpcdiff_argv("ingest", one_process_data["bids"], "--out", out, *DATA_SHAPE, "--subjects-per-shard", 2)
    options = SlurmOptions(ntasks_per_node=1, cpus_per_task=4, max_restarts=0)
    script = write_script(
        JobScript(kind="ingest", command=argv, options=options, array=tasks), tmp_path / "ingest.sbatch"
    )
    array_id = slurm_two_nodes.sbatch(script, f"--output={output_pattern(tmp_path, 'ingest', array=True)}")
    for t in range(tasks):
        assert slurm_two_nodes.wait(f"{array_id}_{t}", timeout=300) == "COMPLETED"
    logs = [(tmp_path / f"ingest-{array_id}_{t}.out").read_text() for t in range(tasks)]
    hosts = {re.search(r"starts on (\S+)", text).group(1) for text in logs}
    assert hosts == {"node1", "node2"}, logs
    finishers = [text for text in logs if re.search(r"^ingest: 6 subjects in 3 shards", text, re.M)]
    assert len(finishers) == 1, logs  # one task wrote manifest.json and quarantine.tsv; the others saw them there
    assert _digests(out) == _digests(one_process_data["shards"])


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


STATS_MAPS = ("t", "p", "d", "t_age", "mask")


@pytest.fixture(scope="module")
def stats_inputs(tmp_path_factory) -> dict[str, Path]:
    """Shards with planted effects and their groupdiff maps from the local (threaded) backend."""
    root = tmp_path_factory.mktemp("stats")
    write_cohort_shards(root / "shards", num_subjects=24, per_shard=10)
    with backend("local"):
        run_groupdiff(root / "shards", root / "local", "group", ["age", "sex"])
    return {"shards": root / "shards", "local": root / "local"}


def _assert_local_maps(out: Path, local: Path) -> None:
    for name in STATS_MAPS:
        ours = nib.load(str(out / f"{name}.nii.gz")).get_fdata()
        ref = nib.load(str(local / f"{name}.nii.gz")).get_fdata()
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9, err_msg=name)


GROUPDIFF = ("groupdiff", "--group", "group", "--covariates", "age,sex", "--block", 5)


def test_stats_mpi_backend_under_srun_on_two_nodes_gives_the_local_maps(slurm_two_nodes, stats_inputs, tmp_path):
    # Scheduler on rank 0 (node1), the statistics on rank 1, workers on ranks 2-3 (node2).
    argv = ["srun", "--nodes", 2, "--ntasks-per-node", 2, *HPCDIFF, "stats", *GROUPDIFF, stats_inputs["shards"]]
    proc = slurm_two_nodes.run([*argv, "--backend", "mpi", "--out", tmp_path / "mpi"], timeout=600)
    assert_ok(proc)
    assert "dask-mpi on interface eth0 (2 hosts)" in proc.stderr  # not loopback: the workers are on node2
    _assert_local_maps(tmp_path / "mpi", stats_inputs["local"])


def test_stats_slurm_backend_with_workers_on_the_nodes_gives_the_local_maps(slurm_two_nodes, stats_inputs, tmp_path):
    # The scheduler runs here, on the login node (the bridge's .254); the worker jobs run on node1/node2, where
    # 127.0.0.1 is the node's own loopback: a loopback scheduler would never see a worker.
    out = tmp_path / "slurm out"
    args = ("--backend", "slurm", "--workers", 2, "--out", out)
    proc = hpcdiff("stats", *GROUPDIFF, stats_inputs["shards"], *args, timeout=400, env=slurm_two_nodes.env)
    assert_ok(proc)
    _assert_local_maps(out, stats_inputs["local"])

    # Memory from the grid and the block, as the estimate says, and in the job script Slurm got.
    memory = worker_memory(math.prod(SHAPE), block=5)
    assert f"Slurm worker jobs: {memory / 1e9:.2f} GB each" in proc.stderr, proc.stderr
    assert f"#SBATCH --mem={slurm_format_bytes_ceil(memory)}" in proc.stderr
    assert f"--memory-limit {format_bytes(memory).replace(' ', '')}" in proc.stderr  # the worker's own limit
    # No pause at 80% of that limit (a paused worker with nothing to spill waits forever: a hang, not an error).
    assert "export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False" in proc.stderr, proc.stderr
    # Worker logs on the shared file system, beside the outputs: each worker started on a node's bridge address
    # and registered with the scheduler on this host's bridge address.
    logs = [p.read_text() for p in sorted((out / ".hpcdiff" / "dask-workers").glob("*.err"))]
    assert len(logs) == 2, logs
    nodes = set(slurm_two_nodes.node_addresses().values())
    bridge = next(iter(nodes)).rsplit(".", 1)[0]
    for text in logs:
        started = re.search(r"Start worker at:\s+tcp://([\d.]+):", text).group(1)
        assert started in nodes, text
        assert re.search(rf"Registered to:\s+tcp://{re.escape(bridge)}\.254:", text), text
