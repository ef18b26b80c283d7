"""`hpcdiff stats randomise` as a Slurm job array on the real local Slurm, submitted with `hpcdiff submit`: three
tasks each compute their own batches of permutations, the one that finds every batch done writes the maps, and
the maps are the bytes of a one-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcdiff.cli import main
from tests.harness import assert_ok, hpcdiff, wait_for
from tests.stats_data import write_cohort_shards

pytestmark = pytest.mark.slurm

TASKS = 3
# 50 permutations in 5 batches of 10 over 3 tasks (batches 0 and 3, 1 and 4, 2), TFCE included.
OPTIONS = ["--permutations", "50", "--batch-size", "10", "--tfce"]


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_randomise_array_equals_one_process(slurm_cluster, tmp_path):
    shards = tmp_path / "shards"
    write_cohort_shards(shards, num_subjects=16, shape=(8, 9, 8), group_effect=0.3, seed=5)
    root = tmp_path / "randomise 'array'"
    spec = tmp_path / "randomise.yaml"
    stage = {"shards": str(shards), "group": "group", "covariates": ["age"], "tasks": TASKS}
    stage |= {"permutations": 50, "args": OPTIONS[2:]}
    spec.write_text(json.dumps({"dir": str(root), "slurm": {"max_restarts": 1}, "stages": {"randomise": stage}}))
    assert_ok(hpcdiff("submit", spec, "--backend", "slurm", env=slurm_cluster.env))

    def finished():
        proc = hpcdiff("status", root, "--json", env=slurm_cluster.env)
        assert_ok(proc)
        status = json.loads(proc.stdout)
        assert status["failed_stage"] is None, json.dumps(status, indent=1)
        return status if status["stages"][0]["state"] == "completed" else None

    status = wait_for(finished, 300, "the randomise array to complete", poll=1)
    assert status["stages"][0]["array"] == TASKS
    assert sorted(status["stages"][0]["tasks"]) == [str(t) for t in range(TASKS)]
    # Every batch was computed once, by its own task; the finish was claimed and done once.
    records = sorted((root / "randomise" / ".hpcdiff" / "records").iterdir())
    assert [p.name for p in records] == [f"{b:06d}.json" for b in range(5)]
    claim = json.loads((root / "randomise" / ".hpcdiff" / "finish.json").read_text())
    assert claim["done"] is True
    logs = [p.read_text() for p in sorted((root / "slurm").glob("randomise-*.out"))]
    assert len(logs) == TASKS
    computed = sorted(int(text.split(" of 5 batches computed here")[0].split()[-1]) for text in logs)
    assert computed == [1, 2, 2], logs

    one = tmp_path / "one process"
    argv = ["stats", "randomise", str(shards), "--group", "group", "--covariates", "age", *OPTIONS, "--out", str(one)]
    assert main(argv) == 0
    array = _outputs(root / "randomise")
    assert "summary.json" in array and "p_tfce_fwe.nii.gz" in array
    assert array == _outputs(one)
