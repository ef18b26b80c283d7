"""What a sampling plan pins: the checkpoint (copied into the output folder) and the intra-op thread count.

A tiny run (2 training steps on blob shards) is enough: these tests check which weights and which bytes, not what
the model learned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from hpcdiff.atomic import file_sha256
from hpcdiff.data.shards import MANIFEST, ShardSet, shard_name
from tests.datagen import blob_shards, job_yaml
from tests.harness import HPCDIFF, assert_ok, hpcdiff, mpirun

pytestmark = pytest.mark.slow  # trains models or runs ANTs/mpirun: left out of `make test-quick`

ARGS = ("--n", 6, "--subjects-per-shard", 2, "--steps", 3, "--seed", 4)


def _bytes(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def tiny(tmp_path) -> dict[str, Path]:
    shards = blob_shards(tmp_path / "blobs", num_subjects=6, per_shard=3)
    job = job_yaml(tmp_path / "job.yaml", shards, train={"steps": 2, "checkpoint_every": 2, "keep_last": 5})
    assert_ok(hpcdiff("train", job, "--run-dir", tmp_path / "run", "--quiet", timeout=300))
    return {"job": job, "run": tmp_path / "run", "root": tmp_path}


def _ema_digests(out: Path) -> set[str]:
    found = set()
    for path in out.glob("shard-*.h5"):
        with h5py.File(path, "r") as f:
            found.add(str(f.attrs["ema_sha256"]))
    return found


def test_tasks_started_before_and_after_a_new_checkpoint_use_the_pinned_weights(tiny):
    run, root = tiny["run"], tiny["root"]
    reference = root / "reference"
    assert_ok(hpcdiff("sample", "--run-dir", run, "--out", reference, *ARGS, timeout=300))
    tasks = root / "tasks"
    first = hpcdiff("sample", "--run-dir", run, "--out", tasks, *ARGS, "--task", 0, "--num-tasks", 2, timeout=300)
    assert_ok(first)
    assert "step 2" in first.stdout and "still missing" in first.stdout
    # Training goes on and its retention prunes the pinned checkpoint before the second task starts.
    more = ["--set", "train.steps=4", "--allow-config-change", "--quiet"]
    assert_ok(hpcdiff("train", tiny["job"], "--run-dir", run, *more, timeout=300))
    shutil.rmtree(run / "checkpoints" / "step-000000002")
    second = hpcdiff("sample", "--run-dir", run, "--out", tasks, *ARGS, "--task", 1, "--num-tasks", 2, timeout=300)
    assert_ok(second)
    assert "step 2" in second.stdout and "manifest written" in second.stdout
    assert _bytes(tasks) == _bytes(reference)
    pinned = json.loads((tasks / MANIFEST).read_text())["provenance"]
    assert pinned["step"] == 2 and _ema_digests(tasks) == {pinned["ema_sha256"]}
    # A new folder pins the newest checkpoint now: other weights, other digest.
    later = root / "later"
    assert_ok(hpcdiff("sample", "--run-dir", run, "--out", later, *ARGS, timeout=300))
    assert ShardSet.open(later).manifest["provenance"]["step"] == 4
    assert _ema_digests(later) != _ema_digests(tasks)


def test_checkpoint_option_pins_a_step_and_another_step_is_another_plan(tiny):
    run, root = tiny["run"], tiny["root"]
    assert_ok(hpcdiff("train", tiny["job"], "--run-dir", run, "--set", "train.steps=4", "--allow-config-change"))
    out = root / "at2"
    assert_ok(hpcdiff("sample", "--run-dir", run, "--out", out, *ARGS, "--checkpoint", 2, timeout=300))
    assert ShardSet.open(out).manifest["provenance"]["step"] == 2
    proc = hpcdiff("sample", "--run-dir", run, "--out", out, *ARGS, "--checkpoint", 4, timeout=300)
    assert proc.returncode == 2 and "another hpcdiff sample plan" in proc.stderr
    proc = hpcdiff("sample", "--run-dir", run, "--out", root / "x", *ARGS, "--checkpoint", 3)
    assert proc.returncode == 2 and "--checkpoint 3" in proc.stderr and "[4, 2]" in proc.stderr


def test_a_damaged_pinned_copy_exits_5_and_overwrite_pins_again(tiny):
    run, root = tiny["run"], tiny["root"]
    out = root / "out"
    assert_ok(hpcdiff("sample", "--run-dir", run, "--out", out, *ARGS, timeout=300))
    copy = out / ".hpcdiff" / "weights.pt"
    copy.write_bytes(copy.read_bytes()[:1000])
    (out / shard_name(1)).unlink()
    proc = hpcdiff("sample", "--run-dir", run, "--out", out, *ARGS, timeout=300)
    assert proc.returncode == 5 and str(copy) in proc.stderr and "--overwrite" in proc.stderr
    assert_ok(hpcdiff("sample", "--run-dir", run, "--out", out, *ARGS, "--overwrite", timeout=300))
    assert torch.load(copy, weights_only=True)["pin"]["step"] == 2


@pytest.mark.mpi
def test_bytes_follow_the_plans_thread_count_not_the_launcher_or_environment(tiny):
    run, root = tiny["run"], tiny["root"]
    reference = root / "reference"
    assert_ok(hpcdiff("sample", "--run-dir", run, "--out", reference, *ARGS, timeout=300))
    assert ShardSet.open(reference).manifest["provenance"]["threads"] == 1
    # A lone process that would use 2 threads, and 2 mpirun ranks, are both held to the plan's 1 thread.
    alone = root / "alone"
    assert_ok(hpcdiff("sample", "--run-dir", run, "--out", alone, *ARGS, env={"OMP_NUM_THREADS": "2"}, timeout=300))
    ranks = root / "ranks"
    assert_ok(mpirun(2, [*HPCDIFF, "sample", "--run-dir", run, "--out", ranks, *ARGS], timeout=300))
    assert _bytes(alone) == _bytes(reference) == _bytes(ranks)


def test_training_records_its_thread_count_and_warns_when_a_resume_uses_another(tiny):
    run = tiny["run"]
    state = torch.load(run / "checkpoints" / "step-000000002" / "state.pt", weights_only=True)
    assert state["num_threads"] == 1  # the harness runs children with OMP_NUM_THREADS=1
    more = ["--set", "train.steps=4", "--allow-config-change", "--quiet"]
    proc = hpcdiff("train", tiny["job"], "--run-dir", run, *more, env={"OMP_NUM_THREADS": "2"}, timeout=300)
    assert_ok(proc)
    assert "resumed with 2 intra-op thread(s), the checkpoint was written with 1" in proc.stderr
