"""A live or finished run directory meets a wrong command: refused with the promised exit code and the reason,
and every file of the run byte-identical afterwards (lock files and rank logs aside, which any start touches).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from hpcdiff.atomic import file_sha256
from hpcdiff.checkpoint import MARKER, STATE
from hpcdiff.errors import EXIT_BAD_CHECKPOINT, EXIT_NO_SPACE, EXIT_USAGE
from hpcdiff.runstate import RunDir
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, assert_ok, child_env, hpcdiff

pytestmark = pytest.mark.slow  # trains runs to refuse: left out of `make test-quick`


def snapshot(run) -> dict[str, str]:
    return {
        str(p.relative_to(run)): file_sha256(p)
        for p in sorted(run.rglob("*"))
        if p.is_file()
        and p.name not in ("lock", "lease.json", "supervisor.lock")
        and p.relative_to(run).parts[0] != "logs"
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-step run with a checkpoint at each step; each test works on its own copy."""
    root = tmp_path_factory.mktemp("trained")
    shards = blob_shards(root / "shards", num_subjects=4, per_shard=4)
    job = job_yaml(root / "job.yaml", shards, train={"steps": 2, "checkpoint_every": 1, "seed": 1})
    assert_ok(hpcdiff("train", job, "--run-dir", root / "run", "--quiet", timeout=300))
    return root


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


def _checkpoints(run):
    return sorted((run / "checkpoints").glob("step-*"))


def test_a_config_change_the_checkpoint_cannot_hold_is_refused_before_anything_is_written(trained, run, tmp_path):
    wider = job_yaml(tmp_path / "wider.yaml", trained / "shards", model={"base_channels": 16})
    wider.write_text(wider.read_text().replace("steps: 12", "steps: 2").replace("seed: 3", "seed: 1"))
    before = snapshot(run)
    proc = hpcdiff("train", wider, "--run-dir", run, "--allow-config-change", "--quiet", timeout=300)
    assert_ok(proc, EXIT_USAGE)
    assert f"{_checkpoints(run)[-1]} does not fit the model of this config after --allow-config-change" in proc.stderr
    assert "model.base_channels: 8 -> 16" in proc.stderr and "size mismatch" in proc.stderr
    assert "in a new --run-dir" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(run) == before
    # The plain rerun with the original config is still accepted (it was not refused as "config differs").
    assert_ok(hpcdiff("train", run / "config.yaml", "--run-dir", run, "--quiet", timeout=300))


def test_every_checkpoint_corrupt_exits_5_unless_told_to_start_over(run):
    for folder in _checkpoints(run):
        data = bytearray((folder / STATE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / STATE).write_bytes(bytes(data))
    before = snapshot(run)
    proc = hpcdiff("train", run / "config.yaml", "--run-dir", run, "--quiet", timeout=300)
    assert_ok(proc, EXIT_BAD_CHECKPOINT)
    assert f"every checkpoint in {run / 'checkpoints'} is invalid" in proc.stderr
    assert "step-000000002: state.pt checksum differs" in proc.stderr and "--start-over" in proc.stderr
    assert snapshot(run) == before
    assert_ok(hpcdiff("train", run / "config.yaml", "--run-dir", run, "--start-over", "--quiet", timeout=300))
    events = [json.loads(x)["event"] for x in (run / "events.jsonl").read_text().splitlines()]
    assert events[-3:] == ["start", "checkpoint", "checkpoint"] or events[-2:] == ["checkpoint", "completed"]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_a_checkpoint_refused_by_weights_only_exits_5_without_torchs_advice(run):
    newest = _checkpoints(run)[-1]
    state = torch.load(newest / STATE, weights_only=True)
    state["extra"] = argparse.Namespace(payload="not a tensor")  # what weights_only refuses to unpickle
    torch.save(state, newest / STATE)
    marker = json.loads((newest / MARKER).read_text())
    marker.update(size=(newest / STATE).stat().st_size, sha256=file_sha256(newest / STATE))
    (newest / MARKER).write_text(json.dumps(marker))
    before = snapshot(run)
    proc = hpcdiff("train", run / "config.yaml", "--run-dir", run, "--quiet", timeout=300)
    assert_ok(proc, EXIT_BAD_CHECKPOINT)
    assert f"refused to load {newest / STATE}: it holds Python objects" in proc.stderr
    assert "weights_only=False" not in proc.stderr and "weights_only` set to `False`" not in proc.stderr
    assert snapshot(run) == before


def test_a_runs_own_config_resumes_it_and_can_be_submitted(run, tmp_path):
    proc = hpcdiff("train", run / "config.yaml", "--run-dir", run, "--quiet", timeout=300)
    assert_ok(proc)
    assert "already complete" in proc.stderr
    proc = hpcdiff("submit", run / "config.yaml", "--run-dir", tmp_path / "new", "--backend", "slurm", "--dry-run")
    assert_ok(proc)
    assert "#SBATCH" in proc.stdout and str(run / "config.yaml") in proc.stdout


def test_a_second_launcher_on_a_live_run_is_refused_and_writes_nothing(run):
    job = run / "config.yaml"
    before = snapshot(run)
    live = RunDir(run)
    live.acquire_lock()  # this test process plays the trainer that holds the run
    try:
        proc = hpcdiff("submit", job, "--run-dir", run, "--backend", "local")
        assert_ok(proc, EXIT_USAGE)
        assert f"run directory {run} is in use by another live process" in proc.stderr
        assert snapshot(run) == before
        # The supervisor itself, started by hand: its trainer is refused (exit 2) and status.json stays.
        sup = subprocess.run(
            [sys.executable, "-m", "hpcdiff.launch.local", "--run-dir", str(run), "--max-restarts", "0", str(job)],
            capture_output=True,
            text=True,
            timeout=300,
            env=child_env(),
            check=False,
        )
        assert sup.returncode == EXIT_USAGE, sup.stderr
        assert "status.json not updated" in sup.stderr
        assert "supervisor_gave_up" in (run / "events.jsonl").read_text()  # said in the append-only log instead
        assert {k: v for k, v in snapshot(run).items() if k != "events.jsonl"} == {
            k: v for k, v in before.items() if k != "events.jsonl"
        }
    finally:
        live.release_lock()


@pytest.mark.parametrize("attempt", range(2))
def test_a_full_disk_during_sample_exits_74(run, tmp_path, attempt):
    limited = ["bash", "-c", 'ulimit -f 4 && exec "$@"', "limited", *HPCDIFF]
    args = ["sample", "--run-dir", run, "--out", tmp_path / "synth", "--n", 2, "--steps", 2]
    before = snapshot(run)
    proc = subprocess.run(
        [*limited, *map(str, args)], capture_output=True, text=True, timeout=300, env=child_env(), check=False
    )
    assert_ok(proc, EXIT_NO_SPACE)
    assert "File too large writing" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(run) == before


def test_a_run_dir_that_is_a_file_or_has_a_corrupt_config_exits_2(run, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a run\n")
    proc = hpcdiff("train", run / "config.yaml", "--run-dir", target, "--quiet")
    assert_ok(proc, EXIT_USAGE)
    assert "Not a directory; a file stands where a folder is needed" in proc.stderr
    assert target.read_text() == "not a run\n"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(yaml.safe_load((run / "config.yaml").read_text())))
    (run / "config.yaml").write_bytes(b"data: \xff\n")
    before = snapshot(run)
    proc = hpcdiff("train", job, "--run-dir", run, "--quiet")
    assert_ok(proc, EXIT_USAGE)
    assert f"{run / 'config.yaml'} is not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(run) == before
