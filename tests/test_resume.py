"""Fault tolerance with real processes and real signals: SIGKILL chaos, SIGUSR1, corrupt checkpoints, supervisor.

Every test compares against an uninterrupted run of the same config: final weights digest and every logged loss.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, PYTHON, assert_ok, child_env, hpcdiff, mpirun, require_mpi, wait_for
from tests.harness import run as run_cmd

pytestmark = pytest.mark.mpi

STEPS = 24


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume data")  # a space in the path: quoting is tested, not hoped for
    shards = blob_shards(root / "shards", num_subjects=10, per_shard=4)
    return job_yaml(root / "job.yaml", shards, train={"steps": STEPS, "checkpoint_every": 3, "keep_last": 2})


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory) -> dict:
    """The uninterrupted 2-rank run everything else must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert_ok(mpirun(2, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet"], timeout=240))
    return _outcome(run)


def _outcome(run: Path) -> dict:
    proc = hpcdiff("inspect", run, "--json")
    assert_ok(proc)
    report = json.loads(proc.stdout)
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["step"] not in losses, f"step {row['step']} logged twice"
        losses[row["step"]] = row["loss"]
    return {"digest": report["weights_sha256"], "step": report["step"], "losses": losses}


def _train_cmd(job: Path, run: Path, n: int = 2) -> list[str]:
    return [
        "mpirun",
        "-n",
        str(n),
        "--bind-to",
        "none",
        *map(str, HPCDIFF),
        "train",
        str(job),
        "--run-dir",
        str(run),
        "--quiet",
    ]


def _logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}")]
    return steps[-1] if steps else 0


def _rank_pids(mpirun_pid: int) -> dict[int, int]:
    """rank -> pid of the processes mpirun started, read from /proc."""
    out = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            environ = (child / "environ").read_bytes().split(b"\0")
            stat = (child / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != mpirun_pid:
            continue
        for item in environ:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(item.split(b"=", 1)[1])] = int(child.name)
    return out


def test_chaos_sigkill_random_ranks_then_resume_is_bitwise_exact(job, reference, tmp_path):
    require_mpi()
    rng = random.Random(int(os.environ.get("HPCDIFF_CHAOS_SEED", "0")) or None)
    run = tmp_path / "run"
    kills = []
    for attempt in range(4):
        proc = subprocess.Popen(_train_cmd(job, run), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            start = _logged_step(run)
            if attempt == 3 or start >= STEPS - 2:
                out, _ = proc.communicate(timeout=240)
                assert proc.returncode == 0, out.decode()[-3000:]
                break
            pids = wait_for(lambda: len(_rank_pids(proc.pid)) == 2 and _rank_pids(proc.pid), 60, "2 ranks")
            rank = rng.randrange(2)
            if attempt == 1:
                # Aim for the middle of a checkpoint write: kill rank 0 as soon as a temporary folder appears.
                ck = run / "checkpoints"
                wait_for(
                    lambda: (
                        ck.is_dir()
                        and any(p.name.startswith(".step-") for p in ck.iterdir())
                        or _logged_step(run) >= STEPS - 3
                    ),
                    120,
                    "a checkpoint being written",
                    poll=0.0005,
                )
                rank = 0
            else:
                # The first kill lands before the first checkpoint (step 3): nothing to resume from.
                target = 1 if attempt == 0 else rng.randint(start + 1, min(start + 8, STEPS - 3))
                wait_for(lambda: _logged_step(run) >= target or proc.poll() is not None, 120, f"step {target}")
            os.kill(pids[rank], signal.SIGKILL)
            kills.append((rank, _logged_step(run)))
            proc.communicate(timeout=60)
            assert proc.returncode != 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(kills) >= 2, f"the run finished before the kills landed: {kills}"
    got = _outcome(run)
    assert got["step"] == STEPS
    assert got["digest"] == reference["digest"], f"kills at (rank, step) {kills}"
    assert got["losses"] == reference["losses"]
    events = [json.loads(x)["event"] for x in (run / "events.jsonl").read_text().splitlines()]
    # A kill before the first checkpoint leaves nothing to resume: that attempt starts afresh ("start").
    assert events.count("start") + events.count("restart") == len(kills) + 1


def test_sigusr1_checkpoints_exits_75_within_a_step_and_resumes_exactly(job, reference, tmp_path):
    require_mpi()
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(job, run), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        pids = wait_for(lambda: len(_rank_pids(proc.pid)) == 2 and _rank_pids(proc.pid), 60, "2 ranks")
        wait_for(lambda: _logged_step(run) >= 4, 120, "step 4")
        seen = _logged_step(run)
        os.kill(pids[1], signal.SIGUSR1)  # one rank only: the others must agree to stop with it
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out.decode()[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["stop_reason"] == "SIGUSR1"
    assert seen <= status["step"] <= seen + 2
    assert json.loads(hpcdiff("inspect", run, "--json").stdout)["step"] == status["step"]
    assert_ok(mpirun(2, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet"], timeout=240))
    got = _outcome(run)
    assert got["digest"] == reference["digest"] and got["losses"] == reference["losses"]


def test_corrupt_newest_checkpoint_resumes_from_the_one_before_with_a_warning(job, reference, tmp_path):
    run = tmp_path / "run"
    short = ["--set", "train.steps=9"]
    # Train 9 steps (checkpoints 6 and 9 kept), break the newest, then finish the full run.
    assert_ok(mpirun(2, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet", *short], timeout=240))
    newest = run / "checkpoints" / "step-000000009" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    proc = mpirun(2, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet", "--allow-config-change"], timeout=240)
    assert_ok(proc)
    assert "skipping checkpoint" in proc.stderr and "step-000000009" in proc.stderr
    log0 = (run / "logs" / "rank-000.log").read_text()
    assert "resumed from" in log0 and "step-000000006" in log0
    got = _outcome(run)
    # The LR schedule depends on train.steps, so only the run to the full length matches the reference.
    assert got["step"] == STEPS and got["losses"][6] == reference["losses"][6]


def test_resume_on_another_number_of_ranks_covers_each_stream_position_once(job, tmp_path):
    run = tmp_path / "run"
    assert_ok(mpirun(2, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet", "--set", "train.steps=7"], timeout=240))
    assert_ok(hpcdiff("train", job, "--run-dir", run, "--quiet", "--allow-config-change", "--set", "train.steps=13"))
    assert_ok(mpirun(3, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet", "--allow-config-change"], timeout=240))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in rows} == {1, 2, 3}
    batch = 2
    covered = []
    for r in rows:
        covered += range(r["position"], r["position"] + r["world_size"] * batch)
    # Positions are contiguous and each taken once; the loader maps each epoch's positions onto a permutation
    # of all subjects (tested in test_loader), so every subject is seen exactly once per epoch.
    assert covered == list(range(len(covered)))


def test_changed_config_is_refused_unless_allowed(job, tmp_path):
    run = tmp_path / "run"
    assert_ok(hpcdiff("train", job, "--run-dir", run, "--quiet", "--set", "train.steps=2"))
    proc = hpcdiff("train", job, "--run-dir", run, "--quiet", "--set", "train.steps=3", "--set", "optim.lr=0.1")
    assert proc.returncode == 2
    assert "train.steps: 2 -> 3" in proc.stderr and "optim.lr" in proc.stderr and "--allow-config-change" in proc.stderr


def test_second_writer_on_a_live_run_is_refused(job, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [*map(str, HPCDIFF), "train", str(job), "--run-dir", str(run), "--quiet", "--set", "train.steps=100000"],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _logged_step(run) >= 1, 60, "the first writer to start")
        second = hpcdiff("train", job, "--run-dir", run, "--quiet", "--set", "train.steps=100000")
        assert second.returncode == 2 and "in use by another live process" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 75


def _events(run: Path) -> set[str]:
    try:
        return {json.loads(x)["event"] for x in (run / "events.jsonl").read_text().splitlines()}
    except FileNotFoundError:
        return set()


def test_supervisor_restarts_a_killed_rank_and_outlives_its_submitter(job, reference, tmp_path):
    require_mpi()
    run = tmp_path / "run"
    # The submitting shell and its whole process group are killed right after submit returns.
    shell = subprocess.Popen(
        [
            "bash",
            "-c",
            '"$@"; sleep 300',
            "submitter",
            *map(str, HPCDIFF),
            "submit",
            str(job),
            "--run-dir",
            str(run),
            "--backend",
            "local",
            "--ranks",
            "2",
            "--max-restarts",
            "3",
        ],
        env=child_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert "supervisor" in shell.stdout.readline().decode()
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
    status = wait_for(lambda: json.loads((run / "status.json").read_text()), 30, "status.json")
    sup = status["supervisor_pid"]
    wait_for(lambda: _logged_step(run) >= 5, 120, "step 5")
    mpirun_pid = wait_for(lambda: _child_named(sup, "mpirun"), 30, "mpirun under the supervisor")
    ranks = wait_for(lambda: len(_rank_pids(mpirun_pid)) == 2 and _rank_pids(mpirun_pid), 30, "ranks")
    os.kill(ranks[1], signal.SIGKILL)
    wait_for(lambda: "supervisor_done" in _events(run), 240, "the supervisor to finish", poll=0.2)
    got = _outcome(run)
    assert got["digest"] == reference["digest"] and got["losses"] == reference["losses"]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["supervisor_restarts"] >= 1
    text = hpcdiff("status", run)
    assert_ok(text)
    assert "completed" in text.stdout and f"{STEPS}/{STEPS}" in text.stdout


def _child_named(ppid: int, name: str) -> int | None:
    for child in Path("/proc").iterdir():
        if child.name.isdigit():
            try:
                stat = (child / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            if comm == name and int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
                return int(child.name)
    return None


def test_stops_with_75_before_a_known_slurm_time_limit(job, tmp_path):
    run = tmp_path / "run"
    # The job "ends" in 100 s and the margin is 1000 s: the first step boundary is already too late to go on.
    end = str(int(time.time()) + 100)
    proc = hpcdiff(
        "train",
        job,
        "--run-dir",
        run,
        "--quiet",
        "--set",
        "train.stop_margin_s=1000",
        env={"SLURM_JOB_ID": "4242", "SLURM_JOB_END_TIME": end},
    )
    assert proc.returncode == 75, proc.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["stop_reason"] == "time limit" and status["step"] == 1
    assert status["job_ids"] == ["4242"]
    assert json.loads(hpcdiff("inspect", run, "--json").stdout)["step"] == 1


def test_wall_clock_interval_checkpoints_between_step_multiples(job, tmp_path):
    run = tmp_path / "run"
    sets = [
        "--set",
        "train.checkpoint_every=1000",
        "--set",
        "train.checkpoint_every_s=0.001",
        "--set",
        "train.steps=5",
        "--set",
        "train.keep_last=10",
    ]
    assert_ok(hpcdiff("train", job, "--run-dir", run, "--quiet", *sets))
    steps = [c["step"] for c in json.loads(hpcdiff("inspect", run, "--json").stdout)["checkpoints"]]
    assert sorted(steps) == [1, 2, 3, 4, 5]


def test_a_full_disk_stops_with_exit_74_naming_the_file_and_keeps_the_last_checkpoint(job, tmp_path):
    """A file-size limit (`ulimit -f`) fails the checkpoint write as a full disk or quota would (EFBIG/ENOSPC)."""
    run = tmp_path / "run"
    assert_ok(mpirun(2, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet", "--set", "train.steps=3"], timeout=240))
    first = run / "checkpoints" / "step-000000003"
    assert (first / "COMPLETE.json").is_file()
    # 512 KiB: room for logs and metrics, not for the ~2 MB checkpoint due at step 6.
    # The limit applies to the ranks only: mpirun's own PMIx store needs more.
    limited = ["bash", "-c", 'ulimit -f 512 && exec "$@"', "limited", *HPCDIFF]
    argv = ["train", job, "--run-dir", run, "--quiet", "--allow-config-change"]
    proc = mpirun(2, [*limited, *argv], timeout=240)
    assert proc.returncode == 74, proc.stdout + proc.stderr
    assert "File too large writing" in proc.stderr and str(run / "checkpoints") in proc.stderr
    assert "Free space on that file system" in proc.stderr
    assert [c.name for c in (run / "checkpoints").iterdir() if c.name.startswith("step-")] == [first.name]
    assert not list((run / "checkpoints").glob(".step-*")), "the failed write must not leave a partial folder"
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    # Space freed (no limit): the same command resumes from step 3 and finishes.
    assert_ok(mpirun(2, [*HPCDIFF, "train", job, "--run-dir", run, "--quiet"], timeout=240))
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "restart"][-1] == 3
    assert _outcome(run)["step"] == STEPS


def test_supervisor_does_not_rerun_what_a_rerun_cannot_fix(tmp_path):
    """Exit 3 (bad data) is final: no restarts, no back-off, the status says failed."""
    job = job_yaml(tmp_path / "job.yaml", tmp_path / "no shards here")
    run = tmp_path / "run"
    proc = run_cmd(
        [PYTHON, "-m", "hpcdiff.launch.local", "--run-dir", run, "--ranks", "1", "--max-restarts", "3", job],
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    gave_up = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert [e["restarts"] for e in gave_up if e["event"] == "supervisor_gave_up"] == [0]
    assert "restart" not in {e["event"] for e in gave_up}
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
