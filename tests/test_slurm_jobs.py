"""hpcdiff jobs on the real local Slurm: preemption, on-demand signals, a vanished submitter, pipelines, refusals,
a sampling job array with one task killed.

Every training run is compared with an uninterrupted run of the same config on the same number of ranks: the
final weights digest must be bitwise equal. The sampling array is compared with one undisturbed process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from hpcdiff.launch.slurm.sbatch import JobScript, SlurmOptions, hpcdiff_argv, output_pattern, write_script
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, assert_ok, child_env, hpcdiff, mpirun, wait_for
from tests.slurm_harness import FINAL_STATES

pytestmark = pytest.mark.slurm

# Steps of this model take ~50 ms on an idle core and a preemption takes ~1 s to arrive: enough steps that a signal
# sent near the start lands seconds before the end (the stop is asserted mid-run). Each job's ~4 s start-up, not
# its steps, is what these tests spend their time on.
STEPS = 60
RANKS = 2


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm jobs")
    shards = blob_shards(root / "shards", num_subjects=10, per_shard=4)
    return job_yaml(
        root / "job's.yaml", shards, train={"steps": STEPS, "checkpoint_every": 4, "log_every": 2, "keep_last": 2}
    )


@pytest.fixture(scope="module")
def reference_run(job, tmp_path_factory) -> Path:
    """The uninterrupted run every Slurm training run is compared with; also the model the sampling array uses."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert_ok(mpirun(RANKS, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet"], timeout=300))
    return run


@pytest.fixture(scope="module")
def reference(reference_run) -> str:
    return _digest(reference_run)


def _digest(run: Path) -> str:
    proc = hpcdiff("inspect", run, "--json")
    assert_ok(proc)
    report = json.loads(proc.stdout)
    assert report["step"] == STEPS
    return report["weights_sha256"]


def _status(cluster, run: Path) -> dict:
    proc = hpcdiff("status", run, "--json", env=cluster.env)
    assert_ok(proc)
    return json.loads(proc.stdout)


def _submit(cluster, job: Path, run: Path, *extra: object) -> str:
    proc = hpcdiff(
        "submit", job, "--run-dir", run, "--backend", "slurm", "--ntasks-per-node", RANKS, *extra, env=cluster.env
    )
    assert_ok(proc)
    return str(json.loads((run / "status.json").read_text())["job_ids"][-1])


def _trained_steps(run: Path) -> int:
    try:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]
    except FileNotFoundError:
        return 0
    return rows[-1]["step"] if rows else 0


def _wait_completed(cluster, run: Path, job_id: str, timeout: float = 300) -> None:
    def done():
        state = cluster.job_state(job_id)
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            out = "\n".join(p.read_text() for p in (run / "slurm").glob("*.out"))
            pytest.fail(f"job {job_id} ended {state}:\n{cluster.show_job(job_id)}\n{out[-4000:]}")
        return state == "COMPLETED"

    wait_for(done, timeout, f"job {job_id} to complete", poll=0.2)


def _stop_signals(run: Path) -> list[str]:
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    return [e["reason"] for e in events if e["event"] == "signal"]


def test_preempted_by_high_partition_requeues_and_resumes_exactly(slurm_cluster, job, reference, tmp_path):
    run = tmp_path / "pre empted 'run'"
    cpus = slurm_cluster.run(["sinfo", "-h", "-o", "%c"]).stdout.split()[0]
    high_script = tmp_path / "high.sh"
    high_script.write_text("#!/bin/bash\nsleep 1\n")
    low = _submit(slurm_cluster, job, run, "--partition", "low")
    # Past the first checkpoint; preemption takes a few steps' time to arrive, so do not wait longer.
    wait_for(lambda: _trained_steps(run) >= 4, 180, "training to pass step 4")
    # The node is full, so the high job can only start by preempting the training job.
    high = slurm_cluster.sbatch(high_script, "-p", "high", "-n", "1", "-c", cpus, "-o", tmp_path / "high.out")

    assert slurm_cluster.wait(high, timeout=180) == "COMPLETED"
    _wait_completed(slurm_cluster, run, low)
    assert _digest(run) == reference
    assert int(slurm_cluster.job_field(low, "Restarts")) >= 1
    assert _stop_signals(run)[0] in ("SIGUSR1", "SIGTERM")  # checkpointed on the warning, then requeued
    stopped_at = next(json.loads(x)["step"] for x in (run / "events.jsonl").read_text().splitlines() if '"signal"' in x)
    assert 4 <= stopped_at < STEPS  # it really stopped mid-run and resumed from there
    status = _status(slurm_cluster, run)
    assert status["state"] == "completed" and status["step"] == STEPS and status["restarts"] >= 1
    assert status["job_ids"] == [low]


def test_scancel_usr1_batch_checkpoints_requeues_and_finishes_exactly(slurm_cluster, job, reference, tmp_path):
    run = tmp_path / "usr1 run"
    job_id = _submit(slurm_cluster, job, run)
    wait_for(lambda: _trained_steps(run) >= 6, 180, "training to pass step 6")
    proc = slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    assert proc.returncode == 0, proc.stderr

    _wait_completed(slurm_cluster, run, job_id)
    assert _digest(run) == reference
    assert _stop_signals(run) == ["SIGUSR1"]
    assert slurm_cluster.job_field(job_id, "Restarts") == "1"
    out = (run / "slurm" / f"train-{job_id}.out").read_text()
    assert "got SIGUSR1: passing it on to the step" in out and "step exited 75: requeueing" in out
    stopped_at = next(json.loads(x)["step"] for x in (run / "events.jsonl").read_text().splitlines() if '"signal"' in x)
    assert 6 <= stopped_at < STEPS  # it really stopped mid-run and resumed from there


def test_job_outlives_the_killed_submitter_and_status_reports_it(slurm_cluster, job, reference, tmp_path):
    run = tmp_path / "orphan run"
    # The submitting "login session": submits, then would linger; it is killed as soon as the job id is recorded.
    session = subprocess.Popen(
        [*HPCDIFF, "submit", str(job), "--run-dir", str(run), "--backend", "slurm", "--ntasks-per-node", str(RANKS)],
        env=child_env(slurm_cluster.env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (run / "status.json").exists() and "job_ids" in (run / "status.json").read_text(), 60, "id")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session.pid, signal.SIGKILL)
        session.wait(timeout=30)
    job_id = str(json.loads((run / "status.json").read_text())["job_ids"][-1])

    follow = hpcdiff("logs", run, "--follow", timeout=300, env=slurm_cluster.env)  # returns once the run ends
    assert_ok(follow)
    assert f"step {STEPS}/{STEPS}" in follow.stdout
    _wait_completed(slurm_cluster, run, job_id)
    assert _digest(run) == reference
    text = hpcdiff("status", run, env=slurm_cluster.env)
    assert_ok(text)
    for expected in ("completed", f"{STEPS}/{STEPS}", f"job ids    {job_id}", f"step-{STEPS:09d}", "COMPLETED"):
        assert expected in text.stdout, text.stdout


def test_sbatch_refusal_shows_slurms_message_and_a_hint(slurm_cluster, job, tmp_path):
    proc = hpcdiff(
        "submit", job, "--run-dir", tmp_path / "r", "--backend", "slurm", "--partition", "nosuch", env=slurm_cluster.env
    )
    assert_ok(proc, 2)
    assert "invalid partition" in proc.stderr.lower()  # Slurm's own words
    assert "hint: check --partition" in proc.stderr


def _pipeline_yaml(path: Path, root: Path, bids: Path, job: Path, strict: bool = False) -> Path:
    path.write_text(
        json.dumps(
            {
                "dir": str(root),
                "slurm": {"max_restarts": 1},
                "stages": {
                    "ingest": {
                        "bids": str(bids),
                        "shape": [12, 12, 12],
                        "subjects_per_shard": 2,
                        "strict": strict,
                        "tasks": 2,  # a job array
                    },
                    "train": {"config": str(job), "set": ["train.steps=8"], "slurm": {"ntasks_per_node": RANKS}},
                    "stats": {"action": "template", "backend": "synchronous"},
                },
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline bids") / "bids"
    assert_ok(hpcdiff("cohort", "--out", out, "--subjects", 8, "--shape", 12, 12, 12, timeout=300))
    return out


def test_pipeline_runs_its_stages_in_order_to_the_end(slurm_cluster, job, bids, tmp_path):
    root = tmp_path / "pipe line"
    spec = _pipeline_yaml(tmp_path / "pipeline.yaml", root, bids, job)
    assert_ok(hpcdiff("submit", spec, "--backend", "slurm", env=slurm_cluster.env))

    def finished():
        status = _status(slurm_cluster, root)
        assert status["failed_stage"] is None, json.dumps(status, indent=1)
        return status if all(s["state"] == "completed" for s in status["stages"]) else None

    status = wait_for(finished, 400, "every stage to complete", poll=1)
    assert [s["name"] for s in status["stages"]] == ["ingest", "train", "stats"]
    assert (root / "shards" / "manifest.json").exists()
    assert json.loads((root / "run" / "status.json").read_text())["state"] == "completed"
    assert (root / "stats" / "summary.json").exists()
    # Each stage started only after the one before it ended (both tasks of the ingest array).
    events = [json.loads(x) for x in (root / "stages.jsonl").read_text().splitlines()]
    order = [(e["stage"], e["event"]) for e in events]
    assert sorted(order[:4]) == [("ingest", "exit")] * 2 + [("ingest", "start")] * 2, order
    assert order[4:] == [(s, k) for s in ("train", "stats") for k in ("start", "exit")], order
    assert sorted((e["task"], e["event"], e["rc"]) for e in events[:4] if e["event"] == "exit") == [
        ("0", "exit", "0"),
        ("1", "exit", "0"),
    ]
    assert len(json.loads((root / "shards" / "manifest.json").read_text())["shards"]) == 4


def test_a_failing_stage_cancels_the_stages_after_it(slurm_cluster, job, tmp_path):
    bad_bids = tmp_path / "bids without participants"
    bad_bids.mkdir()  # no participants.tsv: ingest exits 3 (bad input data)
    root = tmp_path / "failing pipe"
    spec = _pipeline_yaml(tmp_path / "pipeline.yaml", root, bad_bids, job)
    assert_ok(hpcdiff("submit", spec, "--backend", "slurm", env=slurm_cluster.env))
    record = json.loads((root / "pipeline.json").read_text())
    train_id, stats_id = (s["job_id"] for s in record["stages"][1:])

    for later in (train_id, stats_id):  # cancelled, not left pending forever
        assert slurm_cluster.wait(later, {"CANCELLED"}, timeout=120) == "CANCELLED"
    status = _status(slurm_cluster, root)
    assert status["failed_stage"] == "ingest"
    states = {s["name"]: s["state"] for s in status["stages"]}
    assert states["ingest"] == "failed (exit 3)"
    assert states["train"].startswith("cancelled") and states["stats"].startswith("cancelled")
    text = hpcdiff("status", root, env=slurm_cluster.env).stdout
    assert "failed stage: ingest" in text
    assert not (root / "run").exists()


def test_python_api_submitit_checkpoints_requeues_and_resumes_exactly(slurm_cluster, job, tmp_path, monkeypatch):
    from hpcdiff.launch.slurm.submitit_api import submit_training

    reference = tmp_path / "reference 1 rank"
    assert_ok(hpcdiff("train", job, "--run-dir", reference, "--quiet", timeout=300))
    for key, value in child_env(slurm_cluster.env).items():
        monkeypatch.setenv(key, value)  # submitit runs sbatch and scontrol from this process
    run_dir = tmp_path / "submitit 'run'"
    run = submit_training(job, run_dir, timeout_min=30, cpus_per_task=1)
    wait_for(lambda: _trained_steps(run_dir) >= 6, 180, "training to pass step 6")
    # submitit's preemption signal, sent to the job's processes as Slurm would.
    proc = slurm_cluster.run(["scancel", "--signal=USR2", run.job_id])
    assert proc.returncode == 0, proc.stderr

    status = run.wait(timeout=300, poll_s=0.5)
    assert status["state"] == "completed", status
    assert run.result()["weights_sha256"] == _digest(reference)
    assert _stop_signals(run_dir) == ["SIGUSR2"]
    assert slurm_cluster.job_field(run.job_id, "Restarts") == "1"
    assert status["job_ids"] == [run.job_id] and status["restarts"] == 1


# Six shards of one subject over three array tasks of one rank: task t writes shards t and t + 3.
# 40 sampler steps make a shard take ~1 s on an idle core: time to SIGKILL a task between its two shards' writes.
SAMPLE_ARGS = ("--n", 6, "--subjects-per-shard", 1, "--batch-size", 1, "--steps", 40, "--seed", 3)
TASKS = 3


def _task_pid(array_id: str, task: int, marker: str) -> int | None:
    """PID of the ``python -m hpcdiff`` of array task ``task`` of job ``array_id`` (``marker`` is one of its arguments).

    srun's own command line holds the same words, so the program is told apart by ``-m hpcdiff`` right after argv[0].
    """
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue  # gone, or not ours to read
        if (
            argv[1:3] == [b"-m", b"hpcdiff"]
            and marker.encode() in argv
            and f"SLURM_ARRAY_JOB_ID={array_id}".encode() in env
            and f"SLURM_ARRAY_TASK_ID={task}".encode() in env
        ):
            return int(proc.name)
    return None


def _files(out: Path) -> dict[str, tuple[int, int, str]]:
    """Shard name -> (inode, mtime in ns, sha256): a rewritten shard (atomic rename) gets a new inode and mtime."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(out.glob("shard-*.h5"))
    }


def test_sampling_array_with_a_killed_task_reruns_only_that_task_and_equals_an_undisturbed_run(
    slurm_cluster, reference_run, tmp_path
):
    out = tmp_path / "synth 'array'"
    job = JobScript(
        kind="sample",
        command=hpcdiff_argv("sample", "--run-dir", reference_run, "--out", out, *SAMPLE_ARGS),
        options=SlurmOptions(ntasks_per_node=1, max_restarts=2),
        array=TASKS,
    )
    script = write_script(job, tmp_path / "slurm" / "sample.sbatch")
    array_id = slurm_cluster.sbatch(script, f"--output={output_pattern(tmp_path / 'slurm', 'sample', array=True)}")
    tasks = [f"{array_id}_{t}" for t in range(TASKS)]

    # Task 1 has written its first shard (1) and is sampling its second (4): SIGKILL it, a crash mid-shard.
    pid = wait_for(lambda: _task_pid(array_id, 1, str(out)), 180, "the process of task 1", poll=0.1)
    # A shard counts once its record is written, right after the shard itself.
    record = out / ".hpcdiff" / "records" / "000001.json"
    wait_for(record.exists, 180, "task 1 to write and record its first shard", poll=0.02)
    os.kill(pid, signal.SIGKILL)
    assert not (out / "shard-00004.h5").exists(), "task 1 finished before the kill: raise --steps"
    first = _files(out)["shard-00001.h5"]

    # Each task's shards as they were when it completed: nothing may write them again afterwards.
    when_done: dict[str, tuple] = {}

    def all_final():
        for t, task in enumerate(tasks):
            state = slurm_cluster.job_state(task)
            if state in FINAL_STATES and state != "COMPLETED":
                pytest.fail(f"task {task} ended {state}:\n{slurm_cluster.show_job(task)}")
            if state == "COMPLETED" and task not in when_done:
                files = _files(out)
                when_done[task] = (files[f"shard-{t:05d}.h5"], files[f"shard-{t + TASKS:05d}.h5"])
        return len(when_done) == TASKS

    wait_for(all_final, 300, "every array task to complete", poll=0.2)
    after = _files(out)
    assert sorted(after) == [f"shard-{i:05d}.h5" for i in range(6)]
    for t, task in enumerate(tasks):
        assert (after[f"shard-{t:05d}.h5"], after[f"shard-{t + TASKS:05d}.h5"]) == when_done[task], f"task {t}"
    # Only the killed task ran again (its runner requeued it: same job id, one restart), and it redid only the shard
    # it had not finished: the one it completed before the kill is the same file.
    assert after["shard-00001.h5"] == first
    assert [slurm_cluster.job_field(t, "Restarts") for t in tasks] == ["0", "1", "0"]
    logs = [(tmp_path / "slurm" / f"sample-{array_id}_{t}.out").read_text() for t in range(TASKS)]
    assert [text.count("starts on") for text in logs] == [1, 2, 1], logs
    assert "requeueing (restart 1 of at most 2)" in logs[1]
    assert "1 shard(s) written, 1 already complete" in logs[1], logs[1]

    undisturbed = tmp_path / "undisturbed"
    assert_ok(hpcdiff("sample", "--run-dir", reference_run, "--out", undisturbed, *SAMPLE_ARGS, timeout=300))
    assert {k: v[2] for k, v in after.items()} == {k: v[2] for k, v in _files(undisturbed).items()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads((undisturbed / "manifest.json").read_text())
    assert manifest["num_subjects"] == 6
