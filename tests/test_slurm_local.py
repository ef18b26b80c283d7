"""The real local Slurm: an MPI job under srun, the two partitions, and preemption with requeue."""

import json
import shlex
import time

import pytest

from tests.harness import PYTHON, ROOT

pytestmark = pytest.mark.slurm

WORKER = ROOT / "tests" / "workers" / "allreduce_ddp.py"

# Runs as the batch shell itself (exec), so Slurm's signals reach it: records each start and signal, exits 75
# ("requeue me") on TERM, and finishes at once when it runs again after a requeue.
SIGNAL_RECORDER = """\
import os, signal, sys, time

log = sys.argv[1]
restart = os.environ.get("SLURM_RESTART_COUNT", "0")

def note(text):
    with open(log, "a") as f:
        f.write(text + "\\n")

def on_signal(signum, frame):
    note(signal.Signals(signum).name)
    if signum == signal.SIGTERM:
        sys.exit(75)

signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
note(f"start {restart}")
if restart != "0":
    sys.exit(0)
for _ in range(1200):
    time.sleep(0.1)
note("never preempted")
"""


def _wait_for_line(path, line, timeout):
    deadline = time.monotonic() + timeout
    while not (path.exists() and line in path.read_text().splitlines()):
        if time.monotonic() > deadline:
            pytest.fail(f"no line {line!r} in {path} after {timeout}s")
        time.sleep(0.1)


def _batch_script(path, *lines):
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + "\n".join(lines) + "\n")
    return path


def test_sbatch_runs_srun_pmix_allreduce(slurm_cluster, tmp_path):
    work = tmp_path / "job dir"  # a space: every path below must be quoted to work
    work.mkdir()
    script = _batch_script(
        work / "allreduce job.sh",
        f"srun -n 2 --mpi=pmix {shlex.quote(PYTHON)} {shlex.quote(str(WORKER))}",
    )
    out = work / "out %j.txt"
    job = slurm_cluster.sbatch(script, "-n", "2", "-J", "allreduce", "-o", out, "-D", work)

    state = slurm_cluster.wait(job, states={"COMPLETED", "FAILED"}, timeout=180)
    output = next(work.glob("out *.txt")).read_text() if list(work.glob("out *.txt")) else "(no output file)"
    assert state == "COMPLETED", f"{slurm_cluster.show_job(job)}\n--- job output\n{output}"
    assert slurm_cluster.job_field(job, "ExitCode") == "0:0"
    text = (work / f"out {job}.txt").read_text()
    result = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    assert result["launcher"] == "srun"
    assert result["world_size"] == 2
    assert result["sum"] == 3.0  # 1 + 2
    assert result["identical_across_ranks"]


def test_partitions_low_default_and_high(slurm_cluster):
    proc = slurm_cluster.run(["sinfo", "-h", "-o", "%P %a"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["low*", "up", "high", "up"]  # '*' marks the default partition
    conf = slurm_cluster.run(["scontrol", "show", "partition", "-o"]).stdout
    low, high = (line for line in conf.splitlines() if line.startswith(("PartitionName=low", "PartitionName=high")))
    assert "PriorityTier=1 " in low and "PreemptMode=REQUEUE" in low and "GraceTime=10 " in low
    assert "PriorityTier=10 " in high


def test_high_partition_preempts_and_requeues_low_job(slurm_cluster, tmp_path):
    work = tmp_path / "pre empt"
    work.mkdir()
    recorder = work / "recorder.py"
    recorder.write_text(SIGNAL_RECORDER)
    log = work / "signals log.txt"
    cpus = slurm_cluster.run(["sinfo", "-h", "-o", "%c"]).stdout.strip()
    low_script = _batch_script(
        work / "low job.sh", f"exec {shlex.quote(PYTHON)} {shlex.quote(str(recorder))} {shlex.quote(str(log))}"
    )
    low = slurm_cluster.sbatch(
        low_script, "-p", "low", "-n", "1", "-c", cpus, "--requeue", "--open-mode=append",
        "--signal=B:USR1@60", "-o", work / "low.out", "-D", work,
    )  # fmt: skip
    slurm_cluster.wait(low, {"RUNNING"}, timeout=60)
    _wait_for_line(log, "start 0", timeout=60)  # its signal handlers are installed from here on

    # The whole node is taken, so the high job can only start by preempting the low one.
    high_script = _batch_script(work / "high job.sh", "sleep 1")
    high = slurm_cluster.sbatch(high_script, "-p", "high", "-n", "1", "-c", cpus, "-o", work / "high.out")

    assert slurm_cluster.wait(high, timeout=120) == "COMPLETED"
    assert slurm_cluster.wait(low, timeout=120) == "COMPLETED"
    events = log.read_text().splitlines()
    assert events[0] == "start 0" and events[-1] == "start 1", events
    # Slurm's own warning (USR1, from preempt_send_user_signal) and/or TERM reached the job before the requeue.
    assert {"SIGUSR1", "SIGTERM"} & set(events[1:-1]), events
    assert "never preempted" not in events
    assert slurm_cluster.job_field(low, "Restarts") == "1"
